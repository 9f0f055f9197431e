"""int8 latents with one float32 scale per token, and the error they make.

    q     = round(x / scale) in [-127, 127]      int8  [..., D]
    scale = max |x| over the token's D values / 127   float32 [...]   (absmax: nothing is clipped)
    x    ~= q * scale

The quantised tokens are the float16 latents an fp16 store holds (the teacher's output rounded to
float16), so converting an fp16 store gives the same bytes as extracting int8 directly. The targets
are L2-normalised per token by the losses, so a token's scale only sets its length: the error that
matters is the angle, reported as the token cosine against the teacher's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LATENT_FORMATS = ("fp16", "int8")
QMAX = 127


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float latents [..., D] -> (int8 [..., D], float32 scales [...]), from their float16 values."""
    x = x.to(torch.float16).float()
    scale = x.abs().amax(-1) / QMAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / safe.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(int8 [..., D], scales [...]) -> float32 [..., D]."""
    return q.float() * scale.float().unsqueeze(-1)


def token_errors(reference: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: cosine of the dequantised latents to `reference` (1 for two zero tokens) and the
    largest absolute error."""
    ref, approx = reference.float(), dequantize(q, scale)
    cos = F.cosine_similarity(ref, approx, dim=-1)
    both_zero = (ref.abs().amax(-1) == 0) & (approx.abs().amax(-1) == 0)
    return torch.where(both_zero, torch.ones_like(cos), cos), (ref - approx).abs().amax(-1)


@dataclass
class QuantStats:
    """Quantisation error over a set of views (a unit, a run): what a completion marker records."""

    min_cosine: float = 1.0
    cosine_sum: float = 0.0
    tokens: int = 0
    max_abs_error: float = 0.0
    worst: dict | None = None
    """Where the minimum is: key, row, view, token."""

    def add(self, cos: torch.Tensor, abs_err: torch.Tensor, key: str = "", row: int = -1) -> None:
        """cos, abs_err: [K, T] of one image's views."""
        flat = cos.flatten()
        i = int(flat.argmin())
        if self.worst is None or float(flat[i]) < self.min_cosine:
            view, token = divmod(i, cos.shape[-1])
            self.min_cosine, self.worst = float(flat[i]), {"key": key, "row": row, "view": view, "token": token}
        self.cosine_sum += float(cos.double().sum())
        self.tokens += cos.numel()
        self.max_abs_error = max(self.max_abs_error, float(abs_err.max()))

    def merge(self, other: QuantStats) -> None:
        if other.tokens and (other.min_cosine < self.min_cosine or self.worst is None):
            self.worst = other.worst
        self.min_cosine = min(self.min_cosine, other.min_cosine)
        self.cosine_sum += other.cosine_sum
        self.tokens += other.tokens
        self.max_abs_error = max(self.max_abs_error, other.max_abs_error)

    def failure(self, unit: str, min_cosine: float, against: str, remedy: str) -> str | None:
        """Why a unit fails `min_cosine` (naming the worst key, row, view and token), or None when it passes."""
        if not self.tokens or self.min_cosine >= min_cosine or self.worst is None:
            return None
        w = self.worst
        return (f"unit {unit}: int8 latents of key {w['key']} (row {w['row']}, view {w['view']}, token {w['token']}) "
                f"reach a token cosine of {self.min_cosine:.6f} to {against}, below --min-cosine {min_cosine}; the "
                f"unit is left incomplete: {remedy}")

    @property
    def mean_cosine(self) -> float:
        return self.cosine_sum / self.tokens if self.tokens else 1.0

    def record(self) -> dict:
        return {"format": "int8", "min_token_cosine": self.min_cosine, "mean_token_cosine": self.mean_cosine,
                "max_abs_error": self.max_abs_error, "tokens": self.tokens, "worst": self.worst}

    def summary(self) -> str:
        return (f"int8 latents vs the teacher: min token cosine {self.min_cosine:.6f}, mean "
                f"{self.mean_cosine:.6f}, max abs error {self.max_abs_error:.3g} over {self.tokens} tokens")
