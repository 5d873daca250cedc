"""frostline: fine-tune pretrained PyTorch models the way practitioners know works, and prove each step."""

from frostline.errors import (
    ConfigError,
    FreezeSpecError,
    FrostlineError,
    FrozenWeightsChanged,
    ModelRefError,
    SetupError,
)
from frostline.freeze import FreezePlan, FreezeSpec, freeze, plan_freeze
from frostline.guard import Finding, FreezeGuard, check_setup
from frostline.inspect import MapEntry, ModelMap, inspect_model
from frostline.sources import ModelSource, load_model, open_model

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Finding",
    "FreezeGuard",
    "FreezePlan",
    "FreezeSpec",
    "FreezeSpecError",
    "FrostlineError",
    "FrozenWeightsChanged",
    "MapEntry",
    "ModelMap",
    "ModelRefError",
    "ModelSource",
    "SetupError",
    "__version__",
    "check_setup",
    "freeze",
    "inspect_model",
    "load_model",
    "open_model",
    "plan_freeze",
]
