"""The feature cache: compute the frozen part of the model once, then train the rest on its outputs.

Valid only when the cached part is a deterministic function of the input: entirely frozen, its
BatchNorm in eval mode, its dropout inactive, and no random augmentation in the data. Caches are
keyed by a fingerprint of the frozen weights, the boundary, and the data, so a stale cache is never
used; they live in memory under a budget, else memory-mapped from the run folder.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from frostline.batches import Batch, TensorBatches, trim_padding
from frostline.freeze import FreezePlan, held_in_eval
from frostline.inspect import ModelMap
from frostline.train.runtime import Runtime
from frostline.train.tails import Features, Tail, block_tail, head_tail


def plan_cache(mode: str, model: nn.Module, model_map: ModelMap, plan: FreezePlan, augment: bool) -> Tail | str:
    """The tail to train from a cache, or the one-line reason why the cache is off."""
    if mode == "off":
        return "off (run.cache=off)"
    if augment:
        return "off: the data has random augmentation, so the frozen part's output changes every epoch"
    trainable = plan.trainable
    entries = list(model_map.entries)
    first = next((i for i, e in enumerate(entries) if any(n in trainable for n in e.param_names)), None)
    if first is None or first == 0:
        return "off: nothing before the first trainable entry is frozen"
    frozen_before = entries[:first]
    if any(n in trainable for e in frozen_before for n in e.param_names):
        return "off: the part before the boundary is not entirely frozen"
    if plan.spec.bn == "train":
        return "off: BatchNorm in the frozen part updates its statistics (bn=train)"
    held = held_in_eval(model)
    order = list(model_map.call_order)
    boundary = entries[first].path
    # where the boundary first runs: its own call, or the first module inside it (a ModuleList is never called)
    starts = [i for i, path in enumerate(order) if path == boundary or path.startswith(boundary + ".")]
    if starts:
        for path in order[: starts[0]]:
            module = model.get_submodule(path) if path else model
            ancestors_held = any(path == h or path.startswith(h + ".") for h in held)
            if path and not ancestors_held and next(module.children(), None) is None and _stochastic(module):
                return f"off: {path} ({type(module).__name__}) in the frozen part is not held in eval mode"
    if entries[first].kind == "head":
        return head_tail(model, model_map)
    return block_tail(model, model_map, boundary)


def _stochastic(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm))


def fingerprint(model: nn.Module, boundary: str, inputs: list[Batch], dtype: torch.dtype, transform: str = "") -> str:
    """A key that changes with any frozen weight or buffer, the boundary, the data, its transform, or the dtype."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(f"{type(model).__name__}|{boundary}|{dtype}|{transform}".encode())
    for name, param in model.named_parameters():
        if not param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    for name, buffer in model.named_buffers():
        digest.update(name.encode())
        digest.update(buffer.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    for batch in inputs:
        tensors = batch.values() if isinstance(batch, dict) else [batch]
        for tensor in tensors:
            digest.update(tensor.reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class CachedSplit:
    """Cached features of one split, with its labels."""

    features: Features
    labels: torch.Tensor

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> TensorBatches:
        return TensorBatches(self.features, self.labels, batch_size, shuffle=shuffle, seed=seed)


def _nbytes(features: Features) -> int:
    tensors = features.values() if isinstance(features, dict) else [features]
    return sum(t.numel() * t.element_size() for t in tensors)


def _slices(inputs: Batch, size: int) -> list[Batch]:
    n = len(next(iter(inputs.values()))) if isinstance(inputs, dict) else len(inputs)
    if isinstance(inputs, dict):
        return [{k: v[i : i + size] for k, v in inputs.items()} for i in range(0, n, size)]
    return [inputs[i : i + size] for i in range(0, n, size)]


def _by_length(inputs: Batch) -> torch.Tensor | None:
    """The examples' order by number of tokens (stable), for a token batch with an attention mask; else None."""
    if not isinstance(inputs, dict) or "attention_mask" not in inputs or inputs["attention_mask"].dim() < 2:
        return None
    lengths = inputs["attention_mask"].ne(0).flatten(1).sum(1)
    return torch.sort(lengths, stable=True).indices


def _take(batch: Features, index: torch.Tensor) -> Features:
    return {k: v[index] for k, v in batch.items()} if isinstance(batch, dict) else batch[index]


def _padded_like(captured: Features, batch: Batch) -> Features:
    """Captured token states (shaped like the trimmed batch's attention mask) padded back to the batch's length,
    so that every chunk of the cache has the same shape; pooled features are returned as they are."""
    if not isinstance(captured, dict) or not isinstance(batch, dict) or "attention_mask" not in captured:
        return captured
    full, trimmed = batch["attention_mask"], captured["attention_mask"]
    if full.shape == trimmed.shape:
        return captured
    padded = {}
    for key, value in captured.items():
        if value.shape[: trimmed.dim()] != trimmed.shape:
            padded[key] = value
            continue
        out = value.new_zeros((*full.shape, *value.shape[trimmed.dim() :]))
        out[(slice(None), *(slice(0, n) for n in trimmed.shape[1:]))] = value
        padded[key] = out
    return padded


def _concat(parts: list[Features], dtype: torch.dtype) -> Features:
    def store(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    if isinstance(parts[0], dict):
        return {k: store(torch.cat([p[k] for p in parts])) for k in parts[0]}
    return store(torch.cat(parts))


class FeatureCache:
    """Cached frozen-part outputs, in memory within a budget, else memory-mapped files in `folder`."""

    def __init__(self, folder: Path | None, memory_budget_mb: float, dtype: torch.dtype):
        self.folder = folder
        self.budget = memory_budget_mb * 2**20
        self.dtype = dtype
        self.memory: dict[str, Features] = {}

    def get(
        self,
        tail: Tail,
        key: str,
        inputs: Batch,
        runtime: Runtime,
        batch_size: int,
        progress: Callable[[int, int, float], None] | None = None,
        transform: Callable[[Batch, torch.Generator | None], Batch] | None = None,
    ) -> tuple[Features, float, str]:
        """Features for `inputs` under `key`: from memory, from disk, or computed now; with seconds spent and where.

        `transform` (deterministic: the cache is only valid without augmentation) is applied to each chunk first.
        """
        if key in self.memory:
            return self.memory[key], 0.0, "memory (reused)"
        path = self.folder / "cache" / f"{key}.pt" if self.folder is not None else None
        unreadable = ""
        if path is not None and path.is_file():
            try:
                # weights_only: a cache file is data; a pickled object in its place is refused, never run
                return torch.load(path, mmap=True, weights_only=True), 0.0, f"{path} (reused)"
            except Exception as err:  # torch raises several types for damaged or foreign files
                unreadable = f" ({path} could not be read as a feature cache: {type(err).__name__}; recomputed)"
        start = time.perf_counter()
        parts = []
        # texts by length: each chunk then holds texts of about one length, and trimming its padding saves the most
        # (the order of a cache pass changes no example's features); the features are put back in the data's order
        order = _by_length(inputs)
        chunks = _slices(inputs if order is None else _take(inputs, order), batch_size)
        with torch.inference_mode(), runtime.autocast():
            for i, chunk in enumerate(chunks):
                if transform is not None:
                    chunk = transform(chunk, None)
                chunk = (
                    {k: v.to(runtime.device) for k, v in chunk.items()}
                    if isinstance(chunk, dict)
                    else chunk.to(runtime.device)
                )
                # the frozen part runs on the batch without its shared padding; token states are padded back
                captured = _padded_like(tail.capture(trim_padding(chunk)), chunk)
                parts.append(
                    {k: v.cpu() for k, v in captured.items()} if isinstance(captured, dict) else captured.cpu()
                )
                if progress is not None:
                    progress(i + 1, len(chunks), float("nan"))
        features = _concat(parts, self.dtype)
        if order is not None:
            features = _take(features, torch.argsort(order))
        seconds = time.perf_counter() - start
        if _nbytes(features) <= self.budget or path is None:
            self.memory[key] = features
            return features, seconds, "memory" + unreadable
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(features, tmp)
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        tmp.replace(path)
        return torch.load(path, mmap=True, weights_only=True), seconds, str(path) + unreadable
