"""Batches as frostline passes them to models: a tensor, or a mapping of keyword tensors."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

Batch = torch.Tensor | Mapping[str, torch.Tensor]


def call_model(model: nn.Module, batch: Batch) -> Any:
    """Run `model` on `batch`: keyword arguments for a mapping (transformers style), else one argument."""
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(batch)


def logits_of(output: Any) -> torch.Tensor:
    """The logits tensor of a model output: a tensor, a transformers `ModelOutput`, a tuple or a dict."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if "logits" in output:
            return output["logits"]
        return next(v for v in output.values() if isinstance(v, torch.Tensor))
    if isinstance(output, (tuple, list)):
        return next(v for v in output if isinstance(v, torch.Tensor))
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(f"cannot find a logits tensor in a model output of type {type(output).__name__}")


def split_batch(batch: Any) -> tuple[Batch, torch.Tensor]:
    """(inputs, targets) from a loader's batch: an (inputs, targets) pair, or a mapping with a `labels` key."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping) and "labels" in batch:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return inputs, batch["labels"]
    raise TypeError(f"a batch must be (inputs, targets) or a mapping with a 'labels' key, got {type(batch).__name__}")


def batch_to(batch: Batch, device: torch.device | str) -> Batch:
    """Move a tensor or mapping batch to `device`."""
    if isinstance(batch, Mapping):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


def batch_len(batch: Batch) -> int:
    """How many examples a batch holds (a tensor, or a dict of tensors of one length)."""
    return len(next(iter(batch.values()))) if isinstance(batch, Mapping) else len(batch)


def take(batch: Batch, index: torch.Tensor | slice) -> Batch:
    """The examples of a batch at `index` (indices or a slice), every tensor of a dict alike."""
    return {k: v[index] for k, v in batch.items()} if isinstance(batch, Mapping) else batch[index]


def trim_padding(batch: Batch) -> Batch:
    """A token batch without the trailing positions (and windows) that are padding in every one of its examples.

    Texts are padded to `data.max_length` once, when tokenized; a batch of short texts then spends most of its
    compute on padding that the attention mask hides. Every tensor shaped like the attention mask at its front
    (token ids, type ids, cached token states) is cut to the longest example of the batch: the examples' results
    are the same (the mask already hid those positions), only cheaper. Other batches are returned as they are.
    """
    if not isinstance(batch, Mapping) or "attention_mask" not in batch:
        return batch
    mask = batch["attention_mask"]
    if mask.dim() < 2 or mask.numel() == 0:
        return batch
    keep = []
    for dim in range(1, mask.dim()):
        last = mask.ne(0).movedim(dim, 0).flatten(1).any(1).nonzero()
        keep.append(int(last[-1]) + 1 if len(last) else 1)
    if keep == list(mask.shape[1:]):
        return batch
    index = (slice(None), *(slice(0, k) for k in keep))
    return {k: v[index] if v.shape[: mask.dim()] == mask.shape else v for k, v in batch.items()}


class TensorBatches:
    """Pre-made tensors served in batches, reshuffled each pass with a seeded generator.

    A plain loop over slices: per-step framework overhead would dominate once epochs take milliseconds.
    """

    def __init__(
        self,
        inputs: Batch,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        transform: Callable[[Batch, torch.Generator], Batch] | None = None,
    ):
        self.inputs = inputs
        self.labels = labels
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.transform = transform
        """Applied to each batch's inputs with the generator (images: scaling, normalisation, augmentation)."""
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self):
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            inputs = take(self.inputs, idx)
            if self.transform is not None:
                inputs = self.transform(inputs, self.generator)
            yield trim_padding(inputs), self.labels[idx]
