"""The feature cache: compute the frozen part of the model once, then train the rest on its outputs.

Valid only when the cached part is a deterministic function of the input: entirely frozen, its
BatchNorm in eval mode, its dropout inactive, and no random augmentation in the data. Caches are
keyed by a fingerprint of the frozen weights, the boundary, and the data, so a stale cache is never
used; they live in memory under a budget, else memory-mapped from the run folder.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from frostline.batches import Batch, TensorBatches, batch_len, take, trim_padding
from frostline.freeze import FreezePlan
from frostline.inspect import ModelMap
from frostline.train.runtime import Runtime
from frostline.train.tails import Features, Tail, block_tail, capture_together, head_tail


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
    # the plan's holds, not the model's: a plan not applied yet (a later stage's) is judged as it will run
    held = plan.held_in_eval
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


def fingerprint(
    model: nn.Module,
    boundary: str,
    inputs: list[Batch],
    dtype: torch.dtype,
    transform: str = "",
    trainable: frozenset[str] | None = None,
) -> str:
    """A key that changes with any frozen weight or buffer, the boundary, the data, its transform, or the dtype.

    Frozen: the parameters not in `trainable` (a freeze plan's), by default those that do not require grad.
    """
    digest = hashlib.blake2b(digest_size=12)
    digest.update(f"{type(model).__name__}|{boundary}|{dtype}|{transform}".encode())
    for name, param in model.named_parameters():
        if (name not in trainable) if trainable is not None else not param.requires_grad:
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


def _by_length(inputs: Batch) -> torch.Tensor | None:
    """The examples' order by number of tokens (stable), for a token batch with an attention mask; else None."""
    if not isinstance(inputs, dict) or "attention_mask" not in inputs or inputs["attention_mask"].dim() < 2:
        return None
    lengths = inputs["attention_mask"].ne(0).flatten(1).sum(1)
    return torch.sort(lengths, stable=True).indices


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


@dataclass
class Ahead:
    """Features a later stage will need, kept from the pass made for an earlier one."""

    tail: Tail
    key: str
    for_whom: str
    """Who will read them, for people: "stage 'last2'"."""


@dataclass
class CacheEntry:
    """Features for one key, with the seconds spent and where they are."""

    features: Features
    seconds: float
    where: str


class FeatureCache:
    """Cached frozen-part outputs, in memory within a budget, else memory-mapped files in `folder`."""

    def __init__(self, folder: Path | None, memory_budget_mb: float, dtype: torch.dtype):
        self.folder = folder
        self.budget = memory_budget_mb * 2**20
        self.dtype = dtype
        self.memory: dict[str, Features] = {}
        self.origin: dict[str, str] = {}
        """How features in memory came there, when not by their own pass."""

    def _path(self, key: str) -> Path | None:
        return self.folder / "cache" / f"{key}.pt" if self.folder is not None else None

    def _stored(self, key: str) -> tuple[Features | None, str]:
        """Features under `key` from memory or disk (None when there are none), and where they came from."""
        if key in self.memory:
            return self.memory[key], "memory (" + self.origin.get(key, "reused") + ")"
        path = self._path(key)
        if path is not None and path.is_file():
            try:
                # weights_only: a cache file is data; a pickled object in its place is refused, never run
                return torch.load(path, mmap=True, weights_only=True), f"{path} (reused)"
            except Exception as err:  # torch raises several types for damaged or foreign files
                return None, f" ({path} could not be read as a feature cache: {type(err).__name__}; recomputed)"
        return None, ""

    def has(self, key: str) -> bool:
        path = self._path(key)
        return key in self.memory or (path is not None and path.is_file())

    def _keep(self, key: str, features: Features) -> tuple[Features, str]:
        """Features kept in memory within the budget (or when there is no folder), else memory-mapped from a file."""
        path = self._path(key)
        if _nbytes(features) <= self.budget or path is None:
            self.memory[key] = features
            return features, "memory"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(features, tmp)
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        tmp.replace(path)
        return torch.load(path, mmap=True, weights_only=True), str(path)

    def get(
        self,
        model: nn.Module,
        tail: Tail,
        key: str,
        inputs: Batch,
        runtime: Runtime,
        batch_size: int,
        progress: Callable[[int, int, float], None] | None = None,
        transform: Callable[[Batch, torch.Generator | None], Batch] | None = None,
        ahead: list[Ahead] = (),
        gather: Callable[[dict[str, Features]], dict[str, Features]] | None = None,
    ) -> tuple[CacheEntry, list[tuple[Ahead, CacheEntry]]]:
        """Features of `model` for `inputs` under `key`: from memory, from disk, or computed now.

        A pass made now also keeps the features of `ahead` (later stages' tails) from the same forward pass, under
        their keys, where their entry runs in it and they are not stored yet; those it kept come second, each with
        its entry. `transform` (deterministic: the cache is only valid without augmentation) is applied to each chunk
        first. `gather` (several processes, each passing its share of the examples as `inputs`) joins the processes'
        features, every set of the pass by its key at once, before they are kept, so that every process keeps them all
        (it may leave out a later stage's set that another process did not make).
        """
        stored, where = self._stored(key)
        if stored is not None:
            return CacheEntry(stored, 0.0, where), []
        unreadable = where
        start = time.perf_counter()
        n = batch_len(inputs)
        chunks = math.ceil(n / batch_size)
        made = _Placed(n, self.dtype)
        # the later stages' features this pass keeps; one it cannot keep is dropped and left to its own stage's pass
        kept = {a.key: (a, _Placed(n, self.dtype)) for a in ahead if not self.has(a.key)}
        # texts by length: each chunk then holds texts of about one length, and trimming its padding saves the most
        # (the order of a cache pass changes no example's features); each chunk's features go to their examples' places
        order = _by_length(inputs)
        if order is None:
            order = torch.arange(n)
        with torch.inference_mode(), runtime.autocast():
            for i, begin in enumerate(range(0, n, batch_size)):
                places = order[begin : begin + batch_size]
                chunk = take(inputs, places)
                if transform is not None:
                    chunk = transform(chunk, None)
                chunk = (
                    {k: v.to(runtime.device) for k, v in chunk.items()}
                    if isinstance(chunk, dict)
                    else chunk.to(runtime.device)
                )
                # the frozen part runs on the batch without its shared padding; token states are padded back
                trimmed = trim_padding(chunk)
                captured, others = capture_together(model, tail, [a.tail for a, _ in kept.values()], trimmed)
                made.put(places, _padded_like(captured, chunk))
                for (other_key, (_, placed)), other in zip(list(kept.items()), others, strict=True):
                    if other is None:
                        del kept[other_key]
                    else:
                        placed.put(places, _padded_like(other, chunk))
                if progress is not None:
                    progress(i + 1, chunks, float("nan"))
        made_now = {key: made.features} | {a.key: placed.features for a, placed in kept.values()}
        if gather is not None:
            made_now = gather(made_now)
        seconds = time.perf_counter() - start
        features, where = self._keep(key, made_now[key])
        entries = []
        for a, _ in kept.values():
            if a.key not in made_now:
                continue
            features_a, where_a = self._keep(a.key, made_now[a.key])
            self.origin[a.key] = f"kept by the pass for {tail.describe}"
            entries.append((a, CacheEntry(features_a, 0.0, where_a)))
        return CacheEntry(features, seconds, where + unreadable), entries


class _Placed:
    """Features of `n` examples, written chunk by chunk into their examples' places: the pass holds one copy of
    them, whatever order it runs the examples in."""

    def __init__(self, n: int, dtype: torch.dtype):
        self.n = n
        self.dtype = dtype
        self.features: Features | None = None

    def put(self, places: torch.Tensor, chunk: Features) -> None:
        def dtype(value: torch.Tensor) -> torch.dtype:
            return self.dtype if value.is_floating_point() else value.dtype

        values = chunk if isinstance(chunk, dict) else {None: chunk}
        if self.features is None:
            # ordinary tensors, though the pass runs in inference mode: training reads them with autograd on
            with torch.inference_mode(False):
                made = {k: torch.empty((self.n, *v.shape[1:]), dtype=dtype(v)) for k, v in values.items()}
            self.features = made if isinstance(chunk, dict) else made[None]
        target = self.features if isinstance(self.features, dict) else {None: self.features}
        for k, v in values.items():
            target[k][places] = v.to("cpu", dtype(v))
