"""Linear probe on cached features: multinomial logistic regression, L2 chosen on held-out training data
(DINOv2's eval/log_regression.py, CLIP's C sweep)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

L2_SWEEP = tuple(float(x) for x in torch.logspace(-6, 1, 8))


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, iters: int) -> torch.nn.Linear:
    head = torch.nn.Linear(x.shape[1], num_classes).to(x.device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    correct = top == y.unsqueeze(1)
    return 100.0 * correct[:, 0].float().mean().item(), 100.0 * correct.any(1).float().mean().item()


def logistic_probe(train_f, train_l, val_f, val_l, num_classes: int, l2_sweep=L2_SWEEP, holdout: float = 0.1,
                   iters: int = 200, seed: int = 0, device: str | torch.device = "cpu") -> dict:
    """Standardised features, multinomial logistic regression (L-BFGS, full batch); the L2 strength with
    the best top-1 on a held-out `holdout` of the training split is refitted on all of it."""
    device = torch.device(device)
    mean, std = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    xt, xv = ((train_f - mean) / std).to(device), ((val_f - mean) / std).to(device)
    yt, yv = train_l.to(device), val_l.to(device)
    perm = torch.randperm(len(xt), generator=torch.Generator().manual_seed(seed)).to(device)
    n_hold = max(1, int(len(xt) * holdout))
    hold, fit = perm[:n_hold], perm[n_hold:]
    sweep = {}
    for l2 in l2_sweep:
        head = _fit_logistic(xt[fit], yt[fit], num_classes, l2, iters)
        with torch.no_grad():
            sweep[l2] = _accuracy(head(xt[hold]), yt[hold])[0]
    best = max(sweep, key=lambda k: (sweep[k], -k))
    head = _fit_logistic(xt, yt, num_classes, best, iters)
    with torch.no_grad():
        top1, top5 = _accuracy(head(xv), yv)
    return {"top1": top1, "top5": top5, "l2": best, "holdout_top1_by_l2": {f"{k:.0e}": v for k, v in sweep.items()},
            "holdout_fraction": holdout, "iterations": iters}
