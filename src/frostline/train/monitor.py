"""Knowing when to stop: the overfitting monitor, a pure function of the epoch history.

When the training loss keeps falling while the validation metric stops improving and the validation
loss no longer falls, the model is memorising the training data instead of generalising: that is
overfitting, and training on only makes it worse. When neither improves, training has converged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from frostline.recipe import EpochRecord

Verdict = Literal["improving", "plateau", "overfitting"]

ADVICE = [
    "stop here: the best weights are kept",
    "freeze more of the model (fewer trainable blocks), or train the head alone",
    "lower the learning rate",
    "add data, or augmentation for images",
]
AUGMENTED_ADVICE = (
    "add data: augmentation is already on, so a stronger one (a smaller data.crop_scale) or more examples"
)


@dataclass(frozen=True)
class Diagnosis:
    """What the history says, and since when."""

    verdict: Verdict
    best_epoch: int
    """Epoch (1-based, across stages) with the best validation result so far."""
    epochs_since_best: int
    began_epoch: int | None = None
    """First epoch of overfitting (the epoch after the best one)."""
    gap: float | None = None
    """Validation loss minus training loss at the last epoch."""
    message: str = ""
    advice: list[str] = field(default_factory=list)

    @property
    def should_stop(self) -> bool:
        return self.verdict != "improving"

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class OverfitMonitor:
    """Compares the trend of the training loss with the validation metric and loss after each epoch.

    Each history record (an `EpochRecord`) gives `train_loss`, `val_loss` and `val_accuracy` (or the field named
    by `metric`).
    """

    patience: int = 2
    """Epochs without a better validation result before the verdict changes from improving."""
    min_delta: float = 0.0
    """Smallest rise in the metric that counts as better."""
    train_drop: float = 0.02
    """Relative fall of the training loss that counts as 'still falling'."""
    val_rise: float = 0.05
    """Relative rise of the validation loss above its low that counts as 'rising'."""
    val_fall: float = 0.01
    """Relative fall of the validation loss below the stage's earlier low that counts as 'still improving'."""
    metric: str = "val_accuracy"
    augmented: bool = False
    """The training data is already augmented: the advice says so instead of suggesting augmentation."""

    @property
    def advice(self) -> list[str]:
        return [*ADVICE[:-1], AUGMENTED_ADVICE if self.augmented else ADVICE[-1]]

    def best_index(self, history: Sequence[EpochRecord]) -> int:
        """Index of the best record: highest metric, then lowest validation loss."""
        best = 0
        for i, record in enumerate(history):
            top = history[best]
            better = getattr(record, self.metric) > getattr(top, self.metric) + self.min_delta
            tie = abs(getattr(record, self.metric) - getattr(top, self.metric)) <= self.min_delta and record.val_loss < top.val_loss
            if better or (tie and getattr(record, self.metric) >= getattr(top, self.metric)):
                best = i
        return best

    def val_loss_still_falling(self, history: Sequence[EpochRecord], since: int = 0) -> bool:
        """Whether the last `patience` epochs set a validation-loss low of the stage, `val_fall` below its earlier low."""
        window = len(history) - self.patience
        earlier = [r.val_loss for r in history[since:window]]
        recent = [r.val_loss for r in history[max(since, window) :]]
        return bool(earlier) and min(recent) < min(earlier) * (1 - self.val_fall)

    def diagnose(self, history: Sequence[EpochRecord], since: int = 0) -> Diagnosis:
        """The verdict on `history` (one record per epoch); `since` is where the current stage began.

        Overfitting is named when the training loss keeps falling while either the validation loss
        has stayed above its low for `patience` epochs, or the validation metric has not improved
        for `patience` epochs and the validation loss no longer falls. A plateau is neither getting better:
        while the validation loss still sets lows of the stage, the stage goes on. The best record is searched
        over the whole history, so a stage that never beats an earlier stage's best is stopped after
        `patience` epochs of its own.
        """
        if not history:
            return Diagnosis("improving", best_epoch=0, epochs_since_best=0)
        best = self.best_index(history)
        last = history[-1]
        waited = len(history) - 1 - best
        gap = last.val_loss - last.train_loss
        low = min(range(since, len(history)), key=lambda i: history[i].val_loss)
        name = self.metric.removeprefix("val_")

        def fell_since(i: int) -> bool:
            return last.train_loss < history[i].train_loss * (1 - self.train_drop)

        above_low = len(history) - 1 - low
        rising = above_low >= self.patience and all(
            history[i].val_loss > history[low].val_loss * (1 + self.val_rise)
            for i in range(low + 1, len(history))
        )
        if rising and fell_since(low):
            began = low + 2
            message = (
                f"overfitting: training loss fell {history[low].train_loss:.4f} -> {last.train_loss:.4f} while validation "
                f"loss rose from its low of {history[low].val_loss:.4f} at epoch {low + 1} to {last.val_loss:.4f} over "
                f"{above_low} epochs; the model is memorising the training data instead of generalising. It began at epoch "
                f"{began}; validation loss is now {gap:+.4f} above training loss."
            )
            return Diagnosis(
                "overfitting", best + 1, waited, began_epoch=began, gap=gap, message=message, advice=self.advice
            )
        if waited < self.patience or len(history) - since < self.patience:
            return Diagnosis("improving", best + 1, waited, gap=gap)
        # the training loss is compared with where it stood at the best epoch, or at the stage's start
        reference = best if best >= since else since
        val_stalled = last.val_loss > history[low].val_loss or last.val_loss >= history[best].val_loss
        if fell_since(reference) and val_stalled and best < since <= len(history) - 1:
            if last.train_loss >= history[best].train_loss:
                # a later stage still fits the training data worse than the best epoch did: not memorising
                message = (
                    f"no gain: this stage has not beaten epoch {best + 1} (validation {name} "
                    f"{getattr(history[best], self.metric):.4f}) in {len(history) - since} epochs, and its training loss "
                    f"{last.train_loss:.4f} is still above the {history[best].train_loss:.4f} of that epoch, so the "
                    "model is not memorising: unfreezing set it back further than this stage recovered. Try a lower "
                    "learning rate for the stage, fewer unfrozen blocks, or bn=fixed for models with BatchNorm."
                )
                return Diagnosis("plateau", best + 1, waited, gap=gap, message=message)
        if fell_since(reference) and val_stalled:
            began = max(best, since - 1) + 2
            if last.val_loss >= history[best].val_loss:
                where_low = f"against {history[best].val_loss:.4f} at the best epoch {best + 1}"
            else:
                where_low = f"above its low of {history[low].val_loss:.4f} at epoch {low + 1}"
            message = (
                f"overfitting: training loss fell {history[reference].train_loss:.4f} -> {last.train_loss:.4f} while "
                f"validation {name} has not improved for {waited} epochs (best {getattr(history[best], self.metric):.4f} at epoch "
                f"{best + 1}) and validation loss stopped falling ({last.val_loss:.4f}, {where_low}); the model is "
                "memorising the training data instead of generalising. It began at epoch "
                f"{began}; validation loss is now {gap:+.4f} above training loss."
            )
            return Diagnosis(
                "overfitting", best + 1, waited, began_epoch=began, gap=gap, message=message, advice=self.advice
            )
        if self.val_loss_still_falling(history, since):
            # accuracy on a small validation set moves in steps of one example; a falling loss is the finer signal
            return Diagnosis("improving", best + 1, waited, gap=gap)
        trend = "also falling" if last.val_loss < history[best].val_loss else "no longer falling"
        message = (
            f"plateau: validation {name} has not improved for {waited} epochs (best {getattr(history[best], self.metric):.4f} at "
            f"epoch {best + 1}); training loss {'fell' if fell_since(reference) else 'barely moved'} "
            f"({history[reference].train_loss:.4f} -> {last.train_loss:.4f}) and validation loss is {trend} "
            f"({history[best].val_loss:.4f} -> {last.val_loss:.4f}): more epochs of this stage are unlikely to pay off."
        )
        return Diagnosis("plateau", best + 1, waited, gap=gap, message=message)
