"""frostline: fine-tune pretrained PyTorch models the way practitioners know works, and prove each step."""

from frostline.adapters import Adapters, add_lora, merge_lora
from frostline.config import DataConfig, FitConfig, ModelConfig, RunConfig, StageConfig, load_config
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
from frostline.lr_finder import LRFinderResult, lr_find
from frostline.optim import build_schedule, param_groups
from frostline.recipe import Decision, EpochRecord, Recipe, Stage
from frostline.sources import ModelSource, load_model, open_model
from frostline.train.evidence import ValidationExamples, examples_from_logits
from frostline.train.monitor import Diagnosis, OverfitMonitor
from frostline.train.trainer import FitResult, Trainer, fit

__version__ = "0.1.0"

__all__ = [
    "Adapters",
    "ConfigError",
    "DataConfig",
    "Decision",
    "Diagnosis",
    "EpochRecord",
    "Finding",
    "FitConfig",
    "FitResult",
    "FreezeGuard",
    "FreezePlan",
    "FreezeSpec",
    "FreezeSpecError",
    "FrostlineError",
    "FrozenWeightsChanged",
    "LRFinderResult",
    "MapEntry",
    "ModelConfig",
    "ModelMap",
    "ModelRefError",
    "ModelSource",
    "OverfitMonitor",
    "Recipe",
    "RunConfig",
    "SetupError",
    "Stage",
    "StageConfig",
    "Trainer",
    "ValidationExamples",
    "__version__",
    "add_lora",
    "build_schedule",
    "check_setup",
    "examples_from_logits",
    "fit",
    "freeze",
    "inspect_model",
    "load_config",
    "load_model",
    "lr_find",
    "merge_lora",
    "open_model",
    "param_groups",
    "plan_freeze",
]
