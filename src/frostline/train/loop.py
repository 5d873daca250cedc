"""The loop body as plain functions: one training epoch, one evaluation pass. No state of their own."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from frostline.batches import Batch, batch_to, call_model, logits_of
from frostline.errors import FrostlineError
from frostline.train.runtime import Runtime, eval_mode

Forward = Callable[[Batch], torch.Tensor]
StepHook = Callable[[int, int, float], None]


class NonFiniteLoss(FrostlineError):
    """The training loss became NaN or infinite."""

    def __init__(self, value: float, step: int):
        self.value = value
        self.step = step
        super().__init__(
            f"the training loss became {value} at step {step} of this epoch; training stopped and the last good "
            "checkpoint is kept. Lower the learning rate, or keep gradient clipping on (run.clip_grad)"
        )


@dataclass
class EpochResult:
    """What one training epoch did."""

    loss: float
    accuracy: float
    steps: int
    seconds: float
    lr_trace: dict[str, list[float]] = field(default_factory=dict)
    """Learning rate of each group (bias groups left out) at up to 20 evenly spaced steps."""
    seen: int = 0
    """Examples the loss and accuracy are averaged over."""


def model_forward(model: nn.Module) -> Forward:
    """The plain forward pass: the model on a batch, its logits out."""
    return lambda inputs: logits_of(call_model(model, inputs))


def _trace_lr(optimizer: torch.optim.Optimizer, trace: dict[str, list[float]]) -> None:
    for group in optimizer.param_groups:
        name = group.get("name", "group")
        if not name.endswith("(no decay)"):
            trace.setdefault(name, []).append(group["lr"])


def train_epoch(
    forward: Forward,
    params: list[nn.Parameter],
    batches: Iterable,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler | None,
    runtime: Runtime,
    grad_accum: int = 1,
    clip_grad: float | None = None,
    on_step: StepHook | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> EpochResult:
    """One pass over `batches`: forward, loss (`loss_fn`, default cross-entropy), backward, (every `grad_accum`
    batches) clip and step.

    Raises:
        NonFiniteLoss: the loss became NaN or infinite; no step was taken with it.
    """
    start = time.perf_counter()
    total_loss, correct, seen, steps = 0.0, 0, 0, 0
    batches = list(batches) if not hasattr(batches, "__len__") else batches
    n_batches = len(batches)
    every = max(1, n_batches // (20 * grad_accum))
    trace: dict[str, list[float]] = {}
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(batches):
        # a process's shard of a global batch comes with its loss weight (train/distributed.py)
        inputs, labels, weight = batch if len(batch) == 3 else (*batch, 1.0)
        inputs, labels = batch_to(inputs, runtime.device), labels.to(runtime.device)
        with runtime.autocast():
            logits = forward(inputs)
            loss = loss_fn(logits, labels) if loss_fn is not None else F.cross_entropy(logits.float(), labels)
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLoss(value, i + 1)
        (loss * weight / grad_accum).backward()
        if weight > 0:
            total_loss += value * len(labels)
            correct += (logits.argmax(dim=-1) == labels).sum().item()
            seen += len(labels)
        if (i + 1) % grad_accum == 0 or i + 1 == n_batches:
            if clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(params, clip_grad)
            if steps % every == 0:
                _trace_lr(optimizer, trace)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if schedule is not None:
                schedule.step()
            steps += 1
        if on_step is not None:
            on_step(i + 1, n_batches, total_loss / max(seen, 1))
    return EpochResult(
        total_loss / max(seen, 1), correct / max(seen, 1), steps, time.perf_counter() - start, trace, seen
    )


@dataclass
class EvalResult:
    """Loss, accuracy and predictions on a labelled set."""

    loss: float
    accuracy: float
    predictions: torch.Tensor
    probabilities: torch.Tensor
    seconds: float
    losses: torch.Tensor
    """Each example's loss (float32), in the order of the batches."""
    correct: torch.Tensor
    """Whether each example was predicted right (bool)."""

    @classmethod
    def of(
        cls,
        losses: torch.Tensor,
        correct: torch.Tensor,
        predictions: torch.Tensor,
        probabilities: torch.Tensor,
        seconds: float,
    ) -> EvalResult:
        """The result of per-example losses, correctness, predictions and probabilities (the means from them)."""
        seen = max(len(losses), 1)
        return cls(
            losses.double().sum().item() / seen,
            correct.sum().item() / seen,
            predictions,
            probabilities,
            seconds,
            losses,
            correct,
        )


@torch.inference_mode()
def evaluate(
    forward: Forward, batches: Iterable, runtime: Runtime, modules: list[nn.Module] | None = None
) -> EvalResult:
    """Loss and accuracy of `forward` on `batches`, in eval mode (the modules' flags are restored)."""
    start = time.perf_counter()
    with eval_mode(*(modules or [])):
        losses, rights, preds, probs = [], [], [], []
        for inputs, labels in batches:
            inputs, labels = batch_to(inputs, runtime.device), labels.to(runtime.device)
            with runtime.autocast():
                logits = forward(inputs).float()
            predicted = logits.argmax(dim=-1)
            losses.append(F.cross_entropy(logits, labels, reduction="none").cpu())
            rights.append((predicted == labels).cpu())
            preds.append(predicted.cpu())
            probs.append(logits.softmax(dim=-1).cpu())
    return EvalResult.of(
        torch.cat(losses), torch.cat(rights), torch.cat(preds), torch.cat(probs), time.perf_counter() - start
    )
