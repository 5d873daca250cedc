"""How far apart two epochs' validation numbers are, measured against the noise of the validation set.

A validation set of n examples moves accuracy in steps of 1/n (426 articles: 0.23 points) and measures it with a
standard error near sqrt(p(1 - p)/n). Two epochs are judged on the same examples, so the comparison is paired: the
examples both epochs got right (or both wrong) cancel, and only the ones that changed carry the difference. With each
example's loss and correctness (`ValidationExamples`) the standard errors are exact; with only the number of examples
and the spread of their losses, they are the unpaired, wider ones; with neither, the accuracy's step is read off the
history itself (the smallest change between epochs is one example) and the loss falls back to a relative tolerance.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from frostline.recipe import EpochRecord

RELATIVE_LOSS_NOISE = 0.025
"""With nothing known of the examples, a validation-loss change within 2.5% per standard error counts as noise."""
SIGNIFICANT = 2.0
"""A change counts beyond noise at two standard errors (about 95% two-sided)."""


@dataclass(frozen=True)
class ValidationExamples:
    """Each validation example's loss and whether it was predicted right, in the same order every epoch."""

    losses: torch.Tensor
    """float32, one per example."""
    correct: torch.Tensor
    """bool, one per example."""
    predicted: torch.Tensor | None = None
    """The predicted class of each example (what per-class metrics such as macro-F1 need)."""
    labels: torch.Tensor | None = None
    """The true class of each example."""

    def __post_init__(self) -> None:
        if self.losses.shape != self.correct.shape or self.losses.dim() != 1:
            raise ValueError(
                f"per-example losses {tuple(self.losses.shape)} and correctness {tuple(self.correct.shape)} must be "
                "two vectors of the same length"
            )
        if (self.predicted is None) != (self.labels is None):
            raise ValueError("predicted classes and true labels come together, or neither")
        if self.predicted is not None and not (self.predicted.shape == self.labels.shape == self.losses.shape):
            raise ValueError(
                f"predicted classes {tuple(self.predicted.shape)} and labels {tuple(self.labels.shape)} must have "
                f"one entry per example ({len(self.losses)})"
            )

    @property
    def classes(self) -> bool:
        """Whether each example's predicted and true class are recorded."""
        return self.predicted is not None

    def __len__(self) -> int:
        return len(self.losses)

    @property
    def loss_sd(self) -> float:
        return float(self.losses.double().std()) if len(self) > 1 else 0.0


@dataclass(frozen=True)
class Change:
    """A validation number at two epochs, with the standard error of the difference."""

    name: str
    """"loss" or the metric's name."""
    before: float
    after: float
    before_epoch: int
    after_epoch: int
    se: float
    examples: int | None
    basis: str
    """How the error was measured: "paired", "unpaired", "scatter" (the history's epoch-to-epoch scatter) or
    "relative" (a relative tolerance) or "none" (no error: nothing known of the examples)."""

    @property
    def paired(self) -> bool:
        return self.basis == "paired"

    @property
    def delta(self) -> float:
        return self.after - self.before

    @property
    def z(self) -> float:
        """The difference in standard errors (0 for no change; infinite for a change with no noise at all)."""
        if self.delta == 0:
            return 0.0
        return self.delta / self.se if self.se > 0 else math.copysign(math.inf, self.delta)

    def beyond_noise(self, direction: int) -> bool:
        """Whether the number moved in `direction` (+1 up, -1 down) by more than `SIGNIFICANT` standard errors."""
        return self.z * direction > SIGNIFICANT

    def describe(self) -> str:
        """'0.0913 (epoch 6) -> 0.0914 (epoch 8), +0.0001 ± 0.0021 (paired, 426 examples)'."""
        basis = {
            "paired": f"paired, {self.examples or 0:,d} examples",
            "unpaired": f"unpaired, {self.examples or 0:,d} examples",
            "scatter": "from the epoch-to-epoch scatter; examples not recorded",
            "none": "examples not recorded: every change counts",
        }.get(self.basis, "relative tolerance; examples not recorded")
        return (
            f"{self.before:.4f} (epoch {self.before_epoch}) -> {self.after:.4f} (epoch {self.after_epoch}), "
            f"{self.delta:+.4f} ± {self.se:.4f} ({basis})"
        )


@dataclass(frozen=True)
class Noise:
    """What is known of the validation set's noise across a history, beyond each record's own examples."""

    count: int | None
    """Validation examples (recorded, or read off the accuracy's steps)."""
    loss_jitter: float | None = None
    """The validation loss's epoch-to-epoch scatter around its trend, when nothing else tells its noise."""


def noise_of(history: Sequence[EpochRecord], metric: str = "val_accuracy") -> Noise:
    """The validation set's size and, for a history without per-example results or their spread, the scatter of
    its validation loss from epoch to epoch (the median absolute second difference, scaled to a standard deviation:
    a steady trend does not count, a zig-zag does)."""
    last = history[-1]
    count = count_of(last, history, metric)
    if examples_of(last) is not None or getattr(last, "val_loss_sd", None) is not None or len(history) < 6:
        return Noise(count)
    values = [r.val_loss for r in history]
    second = sorted(abs(a - 2 * b + c) for a, b, c in zip(values, values[1:], values[2:], strict=False))
    median = second[len(second) // 2]
    return Noise(count, median / 0.6745 / math.sqrt(6))


def examples_of(record: EpochRecord | Any) -> ValidationExamples | None:
    return getattr(record, "examples", None)


def count_of(
    record: EpochRecord | Any, history: Sequence[EpochRecord] = (), metric: str = "val_accuracy"
) -> int | None:
    """How many validation examples the record was measured on: recorded, or read off the accuracy's steps."""
    examples = examples_of(record)
    if examples is not None:
        return len(examples)
    count = getattr(record, "val_count", None)
    if count:
        return int(count)
    return _count_from_steps([getattr(r, metric) for r in history] or [getattr(record, metric)])


def _count_from_steps(values: Sequence[float]) -> int | None:
    """The validation-set size implied by the smallest change of accuracy between epochs (one example), if the
    history shows one; conservative when the smallest change is several examples (the error comes out wider)."""
    levels = sorted(set(round(v, 9) for v in values))
    steps = [b - a for a, b in zip(levels, levels[1:], strict=False) if b - a > 1e-9]
    if len(values) < 3 or not steps:
        return None
    return max(10, round(1 / min(steps)))


def loss_change(before: EpochRecord, after: EpochRecord, noise: Noise | None = None) -> Change:
    """Validation loss from `before` to `after`: paired over the examples when both epochs recorded them; else from
    the spread of their losses, the history's epoch-to-epoch scatter, or a relative tolerance."""
    count = noise.count if noise else None
    a, b = examples_of(before), examples_of(after)
    if a is not None and b is not None and len(a) == len(b) and len(a) > 1:
        se = float((b.losses.double() - a.losses.double()).std()) / math.sqrt(len(a))
        return Change("loss", before.val_loss, after.val_loss, before.epoch, after.epoch, se, len(a), "paired")
    sds = [getattr(r, "val_loss_sd", None) for r in (before, after)]
    if count and all(sd is not None for sd in sds):
        se = math.sqrt(sds[0] ** 2 + sds[1] ** 2) / math.sqrt(count)
        return Change("loss", before.val_loss, after.val_loss, before.epoch, after.epoch, se, count, "unpaired")
    if noise and noise.loss_jitter:
        se = noise.loss_jitter * math.sqrt(2)
        return Change("loss", before.val_loss, after.val_loss, before.epoch, after.epoch, se, count, "scatter")
    se = RELATIVE_LOSS_NOISE * min(before.val_loss, after.val_loss)
    return Change("loss", before.val_loss, after.val_loss, before.epoch, after.epoch, se, None, "relative")


def metric_change(before: EpochRecord, after: EpochRecord, metric: str, noise: Noise | None = None) -> Change:
    """An accuracy-like metric from `before` to `after`: paired over the examples (only the ones whose correctness
    changed carry the difference) when both recorded them, else two binomial errors for `count` examples."""
    name = metric.removeprefix("val_")
    count = noise.count if noise else None
    x, y = getattr(before, metric), getattr(after, metric)
    a, b = examples_of(before), examples_of(after)
    if metric == "val_accuracy" and a is not None and b is not None and len(a) == len(b) and len(a) > 0:
        n = len(a)
        gained = int((b.correct & ~a.correct).sum())
        lost = int((a.correct & ~b.correct).sum())
        se = math.sqrt(max(gained + lost - (gained - lost) ** 2 / n, 0.0)) / n
        return Change(name, x, y, before.epoch, after.epoch, se, n, "paired")
    if (
        metric == "val_macro_f1"
        and a is not None
        and b is not None
        and a.classes
        and b.classes
        and torch.equal(a.labels, b.labels)
    ):
        return Change(name, x, y, before.epoch, after.epoch, macro_f1_change_se(a, b), len(a), "paired")
    if count:
        # macro-F1 without each example's classes: the accuracy's binomial error, an approximation (narrower than
        # macro-F1's own where classes are small)
        se = math.hypot(binomial_se(x, count), binomial_se(y, count))
        return Change(name, x, y, before.epoch, after.epoch, se, count, "unpaired")
    return Change(name, x, y, before.epoch, after.epoch, 0.0, None, "none")


BOOTSTRAP_SAMPLES = 400
"""Resamples of the validation set behind a macro-F1 change's standard error (seeded: the same error every time)."""


@functools.lru_cache(maxsize=2)
def _resamples(n: int) -> torch.Tensor:
    """How often each of n examples is drawn in each bootstrap resample, (BOOTSTRAP_SAMPLES, n); seeded, so made
    once per validation-set size and shared by every comparison the monitor makes."""
    draws = torch.randint(n, (BOOTSTRAP_SAMPLES, n), generator=torch.Generator().manual_seed(0))
    ones = torch.ones(BOOTSTRAP_SAMPLES, n, dtype=torch.float64)
    return torch.zeros(BOOTSTRAP_SAMPLES, n, dtype=torch.float64).scatter_add_(1, draws, ones)


def macro_f1_change_se(before: ValidationExamples, after: ValidationExamples) -> float:
    """The standard error of the change in macro-F1 between two epochs on the same examples: the spread of that
    change over bootstrap resamples of the examples, each resample scoring both epochs on the same draws (paired)."""
    classes = int(max(before.predicted.max(), after.predicted.max(), before.labels.max())) + 1
    weights = _resamples(len(before))
    truth = torch.nn.functional.one_hot(before.labels.long(), classes).double()

    def macro_f1(predicted: torch.Tensor) -> torch.Tensor:
        guessed = torch.nn.functional.one_hot(predicted.long(), classes).double()
        hits, true, said = weights @ (truth * guessed), weights @ truth, weights @ guessed
        present = (true + said) > 0
        f1 = torch.where(present, 2 * hits / (true + said).clamp(min=1e-12), torch.zeros_like(hits))
        return f1.sum(dim=1) / present.sum(dim=1).clamp(min=1)

    return float((macro_f1(after.predicted) - macro_f1(before.predicted)).std())


def loss_resolution(record: EpochRecord, noise: Noise | None = None) -> float:
    """The standard error of one epoch's mean validation loss: the smallest change of a loss the validation set can
    tell from chance (sd / sqrt(n)). Without the spread of the losses it is estimated from the accuracy: a
    classifier's cross-entropy sits mostly on the examples it gets wrong, a share 1 - a of them, which gives a spread
    near loss * sqrt(a / (1 - a)); with nothing to go on, the relative tolerance."""
    examples = examples_of(record)
    sd = examples.loss_sd if examples is not None else getattr(record, "val_loss_sd", None)
    n = len(examples) if examples is not None else (noise.count if noise else None)
    accuracy = getattr(record, "val_accuracy", None)
    if sd is None and n and accuracy is not None and 0 < accuracy < 1:
        sd = record.val_loss * math.sqrt(accuracy / (1 - accuracy))
    if sd is not None and n:
        return sd / math.sqrt(n)
    return RELATIVE_LOSS_NOISE * record.val_loss


def binomial_se(p: float, n: int) -> float:
    """The standard error of an accuracy p measured on n examples: sqrt(p (1 - p) / n)."""
    p = min(max(p, 0.0), 1.0)
    return math.sqrt(p * (1 - p) / max(n, 1))


def examples_tensors(history: Sequence[EpochRecord]) -> dict[str, torch.Tensor]:
    """The history's per-example results as named tensors (`<epoch>.losses`, `<epoch>.correct`) for a checkpoint."""
    tensors = {}
    for record in history:
        if record.examples is not None:
            tensors[f"{record.epoch}.losses"] = record.examples.losses.float().contiguous()
            tensors[f"{record.epoch}.correct"] = record.examples.correct.bool().contiguous()
            if record.examples.classes:
                tensors[f"{record.epoch}.predicted"] = record.examples.predicted.int().contiguous()
                tensors[f"{record.epoch}.labels"] = record.examples.labels.int().contiguous()
    return tensors


def attach_examples(history: Sequence[EpochRecord], tensors: dict[str, torch.Tensor]) -> None:
    """Give each record read back from a checkpoint its per-example results (records without them keep None)."""
    for record in history:
        losses, correct = tensors.get(f"{record.epoch}.losses"), tensors.get(f"{record.epoch}.correct")
        predicted, labels = tensors.get(f"{record.epoch}.predicted"), tensors.get(f"{record.epoch}.labels")
        if losses is not None and correct is not None:
            classes = (
                (predicted.long(), labels.long()) if predicted is not None and labels is not None else (None, None)
            )
            record.examples = ValidationExamples(losses, correct, *classes)


def examples_from_logits(logits: torch.Tensor | Any, labels: torch.Tensor | Any) -> ValidationExamples:
    """Each example's cross-entropy and correctness from a classifier's logits (tensors or numpy arrays)."""
    logits = torch.as_tensor(logits).detach().float().cpu()
    labels = torch.as_tensor(labels).detach().long().cpu()
    losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    predicted = logits.argmax(dim=-1)
    return ValidationExamples(losses, predicted == labels, predicted, labels)


def join_examples(parts: Sequence[ValidationExamples]) -> ValidationExamples | None:
    """One epoch's results from its batches' (None for none)."""
    if not parts:
        return None
    classes = (
        (torch.cat([p.predicted for p in parts]), torch.cat([p.labels for p in parts]))
        if all(p.classes for p in parts)
        else (None, None)
    )
    return ValidationExamples(torch.cat([p.losses for p in parts]), torch.cat([p.correct for p in parts]), *classes)


def within_noise_of_best(history: Sequence[EpochRecord], best: int, metric: str = "val_accuracy") -> list[int]:
    """The other epochs whose metric is not beyond noise below the best epoch's (less than `SIGNIFICANT` standard
    errors of the difference, paired when recorded): the validation set cannot tell them from the best one."""
    noise = noise_of(history, metric)
    return [
        r.epoch
        for i, r in enumerate(history)
        if i != best and not metric_change(history[best], r, metric, noise).beyond_noise(-1)
    ]
