"""Labelled data made ready for training: split, tokenized or decoded once, served as tensor batches."""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from frostline.batches import Batch, TensorBatches
from frostline.config import DataConfig
from frostline.errors import ConfigError
from frostline.sources.data import check_classifiable, encode_texts, open_text_data, stratified_split
from frostline.sources.images import Progress, is_image_ref, open_image_data
from frostline.transforms import IMAGENET_MEAN, IMAGENET_STD, Augment, ImageTransform

Transform = Callable[[Batch, "torch.Generator | None"], Batch]


@dataclass
class PreparedData:
    """Train and validation tensors with their class names and per-batch input transforms."""

    train_inputs: Batch
    train_labels: torch.Tensor
    val_inputs: Batch
    val_labels: torch.Tensor
    label_names: list[str]
    origin: str
    notes: list[str] = field(default_factory=list)
    train_transform: Transform | None = None
    """Applied to each training batch (with the batch generator): images to normalised floats, augmentation."""
    val_transform: Transform | None = None
    """Applied to each validation batch and to the inputs of the feature cache; never random."""
    fingerprint: str | None = None
    """SHA-256 of the examples `data.ref` held when read (None for py: factories)."""
    val_indices: list[int] | None = None
    """Which of those examples form the validation split (None when it comes from `val_ref` or a factory)."""

    @property
    def augment(self) -> bool:
        """Whether training inputs are randomly augmented (the feature cache is off then)."""
        return bool(getattr(self.train_transform, "random", False))

    def train_batches(self, batch_size: int, seed: int) -> TensorBatches:
        return TensorBatches(
            self.train_inputs, self.train_labels, batch_size, shuffle=True, seed=seed, transform=self.train_transform
        )

    def val_batches(self, batch_size: int) -> TensorBatches:
        return TensorBatches(self.val_inputs, self.val_labels, batch_size, transform=self.val_transform)

    def describe(self) -> str:
        return (
            f"{self.origin}: {len(self.train_labels):,d} training and {len(self.val_labels):,d} validation examples, "
            f"{len(self.label_names)} classes"
        )


def _limit(labels: list[int], limit: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded random subset of `limit` examples (all of them when `limit` is None)."""
    order = np.random.default_rng(seed).permutation(len(labels))
    if limit is None or limit >= len(labels):
        return np.sort(order)
    return np.sort(order[:limit])


def prepare_data(
    config: DataConfig,
    tokenizer: Any,
    seed: int,
    preprocess: dict | None = None,
    progress: Progress | None = None,
) -> PreparedData:
    """Read, split and encode the data a config names.

    Args:
        config: the data section.
        tokenizer: the text model's tokenizer (text data), else None.
        seed: fixes the split and `limit`'s subset.
        preprocess: the image model's input conventions (`ModelSource.preprocess`) for image data.
        progress: called as (done, total, nan) while images are decoded.

    Raises:
        ConfigError: the data cannot train a classifier, or validation holds classes training lacks.
    """
    if config.ref.startswith("py:"):
        return _from_factory(config.ref)
    if is_image_ref(config.ref):
        if config.windows > 1:
            raise ConfigError(
                f"data.windows={config.windows} reads long texts in several windows, and {config.ref!r} is image "
                "data; set data.windows to 1"
            )
        return _prepare_images(config, tokenizer, preprocess, seed, progress)
    if tokenizer is None:
        raise ConfigError(
            f"data {config.ref!r} is text, and the model has no tokenizer; use a text model such as hf:minilm"
        )
    check_max_length(config.max_length, tokenizer)
    train, val, split = _split(read_text(config), config, seed)
    return PreparedData(
        train_inputs=encode_texts(tokenizer, train.texts, config.max_length, config.windows),
        train_labels=torch.tensor(train.labels),
        val_inputs=encode_texts(tokenizer, val.texts, config.max_length, config.windows),
        val_labels=torch.tensor(val.labels),
        label_names=train.label_names,
        origin=train.origin,
        notes=_notes(train, val, config),
        **split,
    )


def read_text(config: DataConfig) -> Callable[[str], Any]:
    """The reader of text data references with the config's columns, encoding and bad-row policy."""
    return lambda ref: open_text_data(
        ref, config.text_column, config.label_column, config.encoding, config.skip_bad_rows
    )


def check_max_length(max_length: int, tokenizer: Any) -> None:
    """Refuse a `data.max_length` beyond what the model reads (its position embeddings end there).

    Raises:
        ConfigError: naming both numbers.
    """
    from frostline.sources.text import token_limit

    limit = token_limit(tokenizer)
    if limit is not None and max_length > limit:
        raise ConfigError(
            f"data.max_length={max_length:,d} is more tokens than this model reads ({limit:,d}: its position "
            f"embeddings end there); set data.max_length to {limit:,d} or less"
        )


def _prepare_images(
    config: DataConfig, tokenizer: Any, preprocess: dict | None, seed: int, progress: Progress | None
) -> PreparedData:
    size, crop_pct, transform = image_settings(config, tokenizer, preprocess)
    train, val, split = _split(lambda ref: open_image_data(ref, size, crop_pct, progress), config, seed)
    augment = Augment.parse(config.augment, config.crop_scale)
    return PreparedData(
        train_inputs=train.images,
        train_labels=torch.tensor(train.labels),
        val_inputs=val.images,
        val_labels=torch.tensor(val.labels),
        label_names=train.label_names,
        origin=train.origin,
        notes=_notes(train, val, config) + ([f"training augmentation: {augment}"] if augment else []),
        train_transform=dataclasses.replace(transform, augment=augment),
        val_transform=transform,
        **split,
    )


def image_settings(config: DataConfig, tokenizer: Any, preprocess: dict | None) -> tuple[int, float, ImageTransform]:
    """Image size, centre-crop share and normalisation for image data, from the model's conventions."""
    if tokenizer is not None:
        raise ConfigError(
            f"data {config.ref!r} is images, and the model is a text model; "
            "use an image model such as efficientnet-lite0, timm:NAME or torchvision:NAME"
        )
    preprocess = preprocess or {}
    native = preprocess.get("input_size", (3, None, None))[-1]
    size = config.image_size or native
    if size is None:
        raise ConfigError(
            f"data {config.ref!r} is images and the model does not say its input size; set data.image_size"
        )
    if preprocess.get("fixed_input_size") and size != native:
        raise ConfigError(f"this model takes {native} x {native} pixel images only; set data.image_size to {native}")
    mean = tuple(preprocess.get("mean") or IMAGENET_MEAN)
    std = tuple(preprocess.get("std") or IMAGENET_STD)
    # MNIST fills its frame: resize it whole; photos get the model's centre crop
    crop_pct = 1.0 if config.ref == "mnist" else float(preprocess.get("crop_pct", 0.875))
    return size, crop_pct, ImageTransform(mean=mean, std=std)


def _split(read: Any, config: DataConfig, seed: int) -> tuple[Any, Any, dict[str, Any]]:
    """Training and validation examples: `val_ref` when given, else a stratified split; `limit` applied.

    Also returns the record that lets the split be found again: the data's fingerprint and the validation indices.

    Raises:
        ConfigError: the data cannot train a classifier, or a class is left without training examples.
    """
    data = read(config.ref)
    record: dict[str, Any] = {"fingerprint": data.fingerprint(), "val_indices": None}
    if config.val_ref:
        val = relabel(read(config.val_ref), data.label_names, f"validation data {config.val_ref}", "the training data")
        train = data.subset(_limit(data.labels, config.limit, seed))
    else:
        chosen = _limit(data.labels, config.limit, seed)
        data = data.subset(chosen)
        check_classifiable(data)
        train_idx, val_idx = stratified_split(data.labels, config.val_fraction, seed)
        train, val = data.subset(train_idx), data.subset(val_idx)
        record["val_indices"] = [int(i) for i in chosen[val_idx]]
    check_classifiable(train)
    untrained = [name for k, name in enumerate(train.label_names) if k not in set(train.labels)]
    if untrained:
        raise ConfigError(
            f"{len(untrained)} class(es) of {data.origin} have no training example"
            + (f" among the data.limit={config.limit:,d} chosen" if config.limit else "")
            + f": {', '.join(untrained[:10])}; the head could never learn them; "
            + ("raise data.limit, or " if config.limit else "")
            + "add examples of them to the training data"
        )
    if len(val) == 0:
        raise ConfigError(
            f"the validation split is empty; raise data.val_fraction (now {config.val_fraction}) or add data"
        )
    return train, val, record


def _copies(train: Any, val: Any) -> int:
    """How many validation examples are exact copies of a training example (texts, or decoded image bytes)."""
    if hasattr(train, "texts"):
        seen = {text.strip() for text in train.texts}
        return sum(text.strip() in seen for text in val.texts)
    seen = {hash(image.numpy().tobytes()) for image in train.images}
    return sum(hash(image.numpy().tobytes()) in seen for image in val.images)


def validation_subset(data: Any, config: DataConfig, fingerprint: str, val_indices: list[int]) -> Any:
    """The validation examples of a finished run, found again by the indices it recorded.

    Raises:
        ConfigError: the data changed since the run read it, so the indices no longer name the same examples.
    """
    if data.fingerprint() != fingerprint:
        raise ConfigError(
            f"{config.ref} has changed since the run was trained (its examples no longer match the fingerprint the "
            "run recorded), so its recorded validation split would mix in other examples, training ones among them; "
            "evaluate on a file of held-out examples with --data FILE"
        )
    if val_indices and max(val_indices) >= len(data):
        raise ConfigError(f"the run's recorded validation indices do not fit {config.ref}; evaluate with --data FILE")
    return data.subset(val_indices)


def relabel(data: Any, label_names: list[str], what: str, known: str) -> Any:
    """`data` (TextData or ImageData) with its labels renumbered into `label_names`' order.

    Raises:
        ConfigError: `data` has classes that `label_names` lacks.
    """
    unknown = sorted(set(data.label_names) - set(label_names))
    if unknown:
        raise ConfigError(f"{what} has classes {known} lacks: {unknown}; it has {label_names}")
    index = {name: i for i, name in enumerate(label_names)}
    return dataclasses.replace(data, labels=[index[data.label_names[y]] for y in data.labels], label_names=label_names)


def _notes(train: Any, val: Any, config: DataConfig) -> list[str]:
    """What reading the data did, and a warning when validation examples copy training ones."""
    notes = list(train.notes)
    if config.val_ref:
        notes += [f"validation: {note}" for note in val.notes]
    copies = _copies(train, val)
    if copies:
        notes.append(
            f"warning: {copies:,d} of {len(val):,d} validation examples are exact copies of training examples "
            "(duplicates in the data, or a validation file that overlaps the training one); they flatter validation "
            "accuracy: remove the duplicates"
        )
    return notes


def _from_factory(ref: str) -> PreparedData:
    """`py:module:factory` returning {"train": (inputs, labels), "val": (inputs, labels), "label_names": [...]}."""
    module_name, _, factory_name = ref[3:].partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"data {ref}: cannot load {module_name}.{factory_name} ({err})") from err
    made = factory()
    try:
        (train_x, train_y), (val_x, val_y) = made["train"], made["val"]
        names = list(made.get("label_names") or [str(i) for i in range(int(torch.as_tensor(train_y).max()) + 1)])
    except (TypeError, KeyError, ValueError) as err:
        raise ConfigError(
            f"data {ref} must return {{'train': (inputs, labels), 'val': (inputs, labels), 'label_names': [...]}}"
        ) from err
    train_y, val_y = torch.as_tensor(train_y).long(), torch.as_tensor(val_y).long()
    if len(train_y) == 0 or len(torch.unique(train_y)) < 2:
        raise ConfigError(
            f"data {ref}: the training set needs two or more classes, got {torch.unique(train_y).tolist()}"
        )
    unknown = sorted(set(torch.unique(val_y).tolist()) - set(torch.unique(train_y).tolist()))
    if unknown:
        raise ConfigError(f"data {ref}: validation has classes the training data lacks: {unknown}")
    return PreparedData(train_x, train_y, val_x, val_y, names, origin=ref)
