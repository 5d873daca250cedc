"""The learning-rate range test: sweep the rate exponentially, watch the loss, suggest a rate.

The model, its BatchNorm buffers, its requires_grad flags, the optimizer's state and the random
number generators are restored afterwards: `lr_find` leaves the model bit-identical.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from frostline.batches import batch_to, call_model, logits_of, split_batch
from frostline.errors import ConfigError


@dataclass(frozen=True)
class LRFinderResult:
    """The sweep, its smoothed loss, and the suggested base rate with the reason it was chosen."""

    lrs: list[float]
    """Base rate at each step (every group ran at base rate x its `lr_scale`)."""
    losses: list[float]
    """Raw training loss at each step."""
    smoothed: list[float]
    """Bias-corrected exponential moving average of the loss."""
    suggestion: float
    """The chosen base rate."""
    steepest: float | None
    """Rate where the smoothed loss falls fastest against log(rate)."""
    valley: float | None
    """Rate in the middle of the longest stretch over which the smoothed loss keeps falling."""
    method: str
    """Which of the two was chosen: valley or steepest."""
    reason: str
    """Why, in one sentence."""
    stopped: str
    """Why the sweep ended."""
    group_scales: list[float] = field(default_factory=list)
    """Each optimizer group's rate relative to the base rate, held through the sweep."""

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _cycle(loader: Iterable) -> Iterable:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ConfigError("the loader given to lr_find yields no batches")


def _steepest(log_lrs: np.ndarray, smoothed: np.ndarray) -> int | None:
    if len(smoothed) < 5:
        return None
    slope = np.gradient(smoothed, log_lrs)
    # the first and last points of a sweep are noise and blow-up
    lo, hi = max(1, len(slope) // 10), max(2, len(slope) - len(slope) // 20)
    return int(lo + np.argmin(slope[lo:hi]))


def _valley(smoothed: np.ndarray) -> int | None:
    """Middle of the longest falling subsequence of the smoothed loss (O(n^2), n is small)."""
    n = len(smoothed)
    if n < 5:
        return None
    length = np.ones(n, dtype=int)
    start = np.arange(n)
    for i in range(n):
        for j in range(i):
            if smoothed[j] > smoothed[i] and length[j] + 1 > length[i]:
                length[i] = length[j] + 1
                start[i] = start[j]
    end = int(np.argmax(length))
    if length[end] < 3:
        return None
    # skip the flat head of the valley, where the rate is still too small to change anything
    begin = int(start[end])
    drop = smoothed[begin] - smoothed[end]
    while begin < end and smoothed[begin] > smoothed[int(start[end])] - 0.05 * drop:
        begin += 1
    return (begin + end) // 2


def lr_find(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    start_lr: float = 1e-7,
    end_lr: float = 1.0,
    num_steps: int = 100,
    smoothing: float = 0.9,
    diverge_factor: float = 4.0,
    device: torch.device | str | None = None,
    progress: Callable[[int, int, float, float], None] | None = None,
) -> LRFinderResult:
    """Run the range test and restore everything it touched.

    Args:
        model: the (frozen) model; only tensors that require grad move during the sweep.
        loader: yields (inputs, targets) or mappings with `labels`; cycled when shorter than the sweep.
        optimizer: optimizer over the trainable tensors; its groups' `lr_scale` (from `param_groups`),
            or else their current rates relative to the largest, fix the ratios held during the sweep.
            Default: AdamW over the trainable tensors, one group.
        loss_fn: maps (logits, targets) to a scalar loss.
        start_lr: first base rate.
        end_lr: last base rate.
        num_steps: optimizer steps in the sweep.
        smoothing: weight of the exponential moving average of the loss.
        diverge_factor: stop once the smoothed loss exceeds this multiple of its best value.
        device: where to run; default the device of the model's first parameter.
        progress: called after each step with (step, num_steps, base rate, smoothed loss).

    Returns:
        The `LRFinderResult`.

    Raises:
        ConfigError: the range or step count is unusable, or nothing is trainable.
    """
    problems = []
    if not 0 < start_lr < end_lr:
        problems.append(f"the rate range must satisfy 0 < start_lr < end_lr, got {start_lr} .. {end_lr}")
    if num_steps < 5:
        problems.append(f"num_steps must be >= 5 to suggest a rate, got {num_steps}")
    if not 0 <= smoothing < 1:
        problems.append(f"smoothing must be in [0, 1), got {smoothing}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        problems.append("no trainable tensors: freeze less (e.g. freeze(model, 'head')) before lr_find")
    if problems:
        raise ConfigError(problems)
    device = torch.device(device) if device is not None else trainable[0].device
    if optimizer is None:
        optimizer = torch.optim.AdamW(trainable, lr=start_lr)
    peak = max(g["lr"] for g in optimizer.param_groups)
    scales = [float(g.get("lr_scale", g["lr"] / peak)) for g in optimizer.param_groups]

    saved = _save(model, optimizer)
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    stopped = f"reached end_lr={end_lr:g} after {num_steps} steps"
    try:
        model.train()
        average, best = 0.0, math.inf
        batches = _cycle(loader)
        for step in range(num_steps):
            lr = start_lr * (end_lr / start_lr) ** (step / (num_steps - 1))
            for group, scale in zip(optimizer.param_groups, scales, strict=True):
                group["lr"] = lr * scale
            inputs, targets = split_batch(next(batches))
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(logits_of(call_model(model, batch_to(inputs, device))), targets.to(device))
            value = loss.item()
            if not math.isfinite(value):
                stopped = f"loss became {value} at rate {lr:.3g} (step {step + 1})"
                break
            loss.backward()
            optimizer.step()
            average = smoothing * average + (1 - smoothing) * value
            debiased = average / (1 - smoothing ** (step + 1))
            lrs.append(lr)
            losses.append(value)
            smoothed.append(debiased)
            best = min(best, debiased)
            if progress is not None:
                progress(step + 1, num_steps, lr, debiased)
            if step > num_steps // 10 and debiased > diverge_factor * best:
                stopped = f"loss diverged at rate {lr:.3g} (smoothed loss {debiased:.3g} > {diverge_factor:g} x best {best:.3g})"
                break
    finally:
        _restore(model, optimizer, saved)
    return _suggest(lrs, losses, smoothed, stopped, scales)


def _suggest(
    lrs: list[float], losses: list[float], smoothed: list[float], stopped: str, scales: list[float]
) -> LRFinderResult:
    log_lrs = np.log10(np.asarray(lrs)) if lrs else np.asarray([])
    curve = np.asarray(smoothed)
    steep = _steepest(log_lrs, curve)
    valley = _valley(curve)
    steep_lr = lrs[steep] if steep is not None else None
    valley_lr = lrs[valley] if valley is not None else None
    if valley_lr is not None:
        method, suggestion = "valley", valley_lr
        reason = (
            "valley: the middle of the longest stretch over which the smoothed loss keeps falling; "
            "it is less sensitive to noise than the single steepest point"
        )
        if steep_lr is not None and not 0.1 <= steep_lr / valley_lr <= 10:
            reason += f" (the steepest point, {steep_lr:.2g}, is more than 10x away: a noisy curve)"
    elif steep_lr is not None:
        method, suggestion = "steepest", steep_lr
        reason = "steepest: the loss never fell for long, so the rate where it falls fastest is used"
    else:
        raise ConfigError(
            f"the sweep ran only {len(lrs)} steps before it stopped ({stopped}); "
            "lower start_lr or raise num_steps so the loss can be seen falling"
        )
    return LRFinderResult(
        lrs=lrs,
        losses=losses,
        smoothed=smoothed,
        suggestion=suggestion,
        steepest=steep_lr,
        valley=valley_lr,
        method=method,
        reason=reason,
        stopped=stopped,
        group_scales=scales,
    )


def _save(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "training": {m: m.training for m in model.modules()},
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _restore(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    with torch.no_grad():
        for key, value in model.state_dict(keep_vars=True).items():
            value.copy_(saved["state"][key])
    for param in model.parameters():
        param.grad = None
    for module, flag in saved["training"].items():
        module.training = flag
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    if saved["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
