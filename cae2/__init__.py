"""cae2: CAE v2 (Context Autoencoder with CLIP latent alignment) model library; no I/O."""

from cae2.config import LossCombine, LossKind, MaskStrategy, ModelConfig, Preset, TrainDefaults
from cae2.losses import AlignmentLoss, alignment_loss
from cae2.masking import BlockMaskGenerator, RandomMaskGenerator, create_mask_generator
from cae2.model import CAEv2, create_model
from cae2.presets import get_preset, list_presets, resolve_model_config

__version__ = "0.1.0"

__all__ = [
    "AlignmentLoss", "BlockMaskGenerator", "CAEv2", "LossCombine", "LossKind", "MaskStrategy", "ModelConfig",
    "Preset", "RandomMaskGenerator", "TrainDefaults", "alignment_loss", "create_mask_generator", "create_model",
    "get_preset", "list_presets", "resolve_model_config", "__version__",
]
