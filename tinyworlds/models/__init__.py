"""The three Genie models (video tokenizer, latent actions, dynamics), their shared blocks,
FSQ, pixel conversion and checkpoints."""

from tinyworlds.models.checkpoint import count_parameters, load_model, save_model
from tinyworlds.models.dynamics import MASK_SCHEDULES, DynamicsConfig, DynamicsModel
from tinyworlds.models.fsq import FSQ
from tinyworlds.models.lam import LatentActionConfig, LatentActionModel
from tinyworlds.models.pixels import to_model, to_uint8
from tinyworlds.models.tokenizer import TokenizerConfig, VideoTokenizer

__all__ = [
    "FSQ",
    "MASK_SCHEDULES",
    "DynamicsConfig",
    "DynamicsModel",
    "LatentActionConfig",
    "LatentActionModel",
    "TokenizerConfig",
    "VideoTokenizer",
    "count_parameters",
    "load_model",
    "save_model",
    "to_model",
    "to_uint8",
]
