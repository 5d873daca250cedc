"""Labelled data made ready for training: split, tokenized once, served as tensor batches."""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from frostline.batches import Batch, TensorBatches
from frostline.config import DataConfig
from frostline.errors import ConfigError
from frostline.sources.data import check_classifiable, encode_texts, open_text_data, stratified_split


@dataclass
class PreparedData:
    """Train and validation tensors with their class names."""

    train_inputs: Batch
    train_labels: torch.Tensor
    val_inputs: Batch
    val_labels: torch.Tensor
    label_names: list[str]
    origin: str
    notes: list[str] = field(default_factory=list)
    augment: bool = False
    """Whether training inputs are randomly augmented (the feature cache is off then)."""

    def train_batches(self, batch_size: int, seed: int) -> TensorBatches:
        return TensorBatches(self.train_inputs, self.train_labels, batch_size, shuffle=True, seed=seed)

    def val_batches(self, batch_size: int) -> TensorBatches:
        return TensorBatches(self.val_inputs, self.val_labels, batch_size)

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


def prepare_data(config: DataConfig, tokenizer: Any, seed: int) -> PreparedData:
    """Read, split and encode the data a config names.

    Raises:
        ConfigError: the data cannot train a classifier, or validation holds classes training lacks.
    """
    if config.ref.startswith("py:"):
        return _from_factory(config.ref)
    if tokenizer is None:
        raise ConfigError(
            f"data {config.ref!r} is text, and the model has no tokenizer; use a text model such as hf:minilm"
        )
    data = open_text_data(config.ref, config.text_column, config.label_column)
    notes = list(data.notes)
    if config.val_ref:
        val = open_text_data(config.val_ref, config.text_column, config.label_column)
        unknown = sorted(set(val.label_names) - set(data.label_names))
        if unknown:
            raise ConfigError(
                f"validation data {config.val_ref} has classes the training data lacks: {unknown}; "
                f"training has {data.label_names}"
            )
        index = {name: i for i, name in enumerate(data.label_names)}
        train = data.subset(_limit(data.labels, config.limit, seed))
        val_labels = [index[val.label_names[y]] for y in val.labels]
        val_texts = val.texts
    else:
        keep = _limit(data.labels, config.limit, seed)
        data = data.subset(keep)
        check_classifiable(data)
        train_idx, val_idx = stratified_split(data.labels, config.val_fraction, seed)
        train = data.subset(train_idx)
        val_texts = [data.texts[i] for i in val_idx]
        val_labels = [data.labels[i] for i in val_idx]
    check_classifiable(train)
    if not val_labels:
        raise ConfigError(
            f"the validation split is empty; raise data.val_fraction (now {config.val_fraction}) or add data"
        )
    return PreparedData(
        train_inputs=encode_texts(tokenizer, train.texts, config.max_length),
        train_labels=torch.tensor(train.labels),
        val_inputs=encode_texts(tokenizer, val_texts, config.max_length),
        val_labels=torch.tensor(val_labels),
        label_names=data.label_names,
        origin=data.origin,
        notes=notes,
    )


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
