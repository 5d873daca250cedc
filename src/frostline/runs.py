"""Reading a run folder back, as data: the model with its verified best weights, its labels, its config, its split."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from frostline.adapters import add_lora
from frostline.checkpoint import load_weights
from frostline.config import MAX_WINDOWS, FitConfig
from frostline.dataset import image_settings, read_text, relabel, validation_subset
from frostline.errors import ConfigError, FreezeSpecError
from frostline.freeze_spec import FreezeSpec
from frostline.run_folder import read_run_config, read_weights
from frostline.sources import open_model
from frostline.sources.images import is_image_ref, open_image_data


@dataclass
class LabelledSet:
    """Examples to evaluate a run on, encoded as its model reads them."""

    inputs: Any
    labels: torch.Tensor
    """Class indices in the run's label order."""
    transform: Any
    """The per-batch input transform (images), or None."""
    where: str
    """Where the examples came from, for people."""
    describe: Callable[[int], str]
    """Example i for people (its text, or where its image came from)."""


@dataclass
class TrainedRun:
    """A fine-tuned model as its run folder left it."""

    folder: Path
    config: FitConfig
    model: nn.Module
    tokenizer: Any
    labels: list[str]
    max_length: int
    windows: int = 1
    """Windows of `max_length` tokens each text is read in (data.windows)."""
    preprocess: dict[str, Any] = field(default_factory=dict)
    """The image model's input conventions (empty for text models)."""
    notes: list[str] = field(default_factory=list)
    """What people should know about how the run was read (weights that could not be verified)."""

    @property
    def reads_images(self) -> bool:
        return self.tokenizer is None and bool(self.preprocess)

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        from frostline.sources.data import encode_texts

        return encode_texts(self.tokenizer, texts, self.max_length, self.windows)

    def encode_images(self, paths: list[str]) -> torch.Tensor:
        """Image files as the run's validation batches saw them (size, crop, normalisation).

        Raises:
            ConfigError: a file is missing or cannot be decoded.
        """
        from frostline.sources.images import read_image

        size, crop_pct, transform = image_settings(self.config.data, None, self.preprocess)
        images = []
        for path in paths:
            try:
                images.append(read_image(Path(path), size, crop_pct))
            except Exception as err:  # PIL raises many types for broken files
                raise ConfigError(f"cannot read image {path}: {type(err).__name__}: {err}") from err
        return transform(torch.stack(images))

    def labelled(self, ref: str) -> LabelledSet:
        """All examples of a data reference.

        Raises:
            ConfigError: the data has classes the trained model lacks, or cannot be read.
        """
        data, transform = self._read(ref)
        return self._as_set(relabel(data, self.labels, ref, "the trained model"), transform, ref)

    def validation(self) -> LabelledSet:
        """The run's own validation examples, found again by the split it recorded.

        Raises:
            ConfigError: the run recorded no split (written by an older frostline, or data from a py: factory), or
                the data changed since: re-splitting it would put training examples into validation.
        """
        config = self.config.data
        path = self.folder / "data.json"
        record = _read_json(path, "the record of the run's data") if path.is_file() else {}
        if not isinstance(record, dict) or not isinstance(record.get("fingerprint"), str):
            raise ConfigError(
                f"{self.folder} records no validation split (data.json is missing: the run is from an older frostline, "
                "or its data came from a py: factory); evaluate on held-out examples with --data FILE"
            )
        if config.val_ref:
            data, transform = self._read(config.val_ref)
            where = f"{config.val_ref} (the run's validation file)"
        else:
            full, transform = self._read(config.ref)
            indices = record.get("val_indices")
            if not isinstance(indices, list) or not all(isinstance(i, int) and i >= 0 for i in indices):
                raise ConfigError(f"{self.folder / 'data.json'} is damaged: val_indices is not a list of indices")
            data = validation_subset(full, config, record["fingerprint"], indices)
            where = f"{full.origin} validation split (the {len(indices):,d} examples the run held out)"
        return self._as_set(relabel(data, self.labels, config.ref, "the trained model"), transform, where)

    def _read(self, ref: str) -> tuple[Any, Any]:
        data_config = self.config.data
        if is_image_ref(ref):
            size, crop_pct, transform = image_settings(data_config, self.tokenizer, self.preprocess)
            return open_image_data(ref, size, crop_pct), transform
        return read_text(data_config)(ref), None

    def _as_set(self, data: Any, transform: Any, where: str) -> LabelledSet:
        inputs = data.images if transform is not None else self.encode(data.texts)
        return LabelledSet(inputs, torch.tensor(data.labels), transform, where, data.describe)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} ({what}) is damaged: {err}") from err


def read_head(folder: Path) -> dict[str, Any]:
    """head.json, checked: a list of distinct label names and a class count that agrees with it.

    Raises:
        ConfigError: the file is damaged or was edited into something that does not describe a head.
    """
    path = folder / "head.json"
    head = _read_json(path, "the run's labels")
    labels = head.get("labels") if isinstance(head, dict) else None
    problems = []
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        problems.append("labels must be a non-empty list of label names")
    elif len(set(labels)) != len(labels):
        problems.append("labels must be distinct")
    elif head.get("num_classes") != len(labels):
        problems.append(f"num_classes is {head.get('num_classes')!r}, but {len(labels)} labels are listed")
    max_length = head.get("max_length", 128) if isinstance(head, dict) else None
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        problems.append(f"max_length must be a whole number >= 2, got {max_length!r}")
    windows = head.get("windows", 1) if isinstance(head, dict) else None
    if not isinstance(windows, int) or isinstance(windows, bool) or not 1 <= windows <= MAX_WINDOWS:
        problems.append(f"windows must be a whole number from 1 to {MAX_WINDOWS}, got {windows!r}")
    lora = head.get("lora") if isinstance(head, dict) else None
    if lora is not None and not (isinstance(lora, str) and _is_lora(lora)):
        problems.append(f"lora must be the spec of the run's adapters (lora:r=...,targets=...), got {lora!r}")
    if problems:
        raise ConfigError(f"{path} does not describe the run's head ({'; '.join(problems)}); restore it from the run")
    return head


def _is_lora(text: str) -> bool:
    try:
        return FreezeSpec.parse(text).mode == "lora"
    except FreezeSpecError:
        return False


def load_run(folder: str | Path, trust_code: bool = False) -> TrainedRun:
    """Rebuild the model of a run (with the LoRA adapters head.json records) and load its best weights
    (best.safetensors), verified against their SHA-256.

    Args:
        folder: a run folder written by `frostline fit`.
        trust_code: import the `py:` references its config names (a run folder is data: off by default).

    Raises:
        ConfigError: the folder is not a finished frostline run, a file in it is damaged, or it names code and
            `trust_code` is False.
        WeightFileError: best.safetensors changed since the run wrote it.
    """
    folder = Path(folder)
    missing = [name for name in ("config.json", "head.json", "best.safetensors") if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"{folder} is not a frostline run folder with best weights: {', '.join(missing)} missing")
    config = read_run_config(folder, trust_code)
    head = read_head(folder)
    state, note = read_weights(folder, "best.safetensors")
    source = open_model(config.model.ref, num_classes=head["num_classes"])
    if "lora" in head:
        # the same adapters the run trained, on the same modules, before their weights are loaded
        add_lora(source.model, head["lora"], example_batch=source.example_batch)
    load_weights(source.model, state, folder / "best.safetensors")
    source.model.eval()
    return TrainedRun(
        folder,
        config,
        source.model,
        source.tokenizer,
        head["labels"],
        head.get("max_length", config.data.max_length),
        head.get("windows", 1),
        source.preprocess,
        notes=[note] if note else [],
    )
