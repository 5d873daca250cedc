"""Knowing when to stop: the overfitting monitor, a pure function of the epoch history.

When the training loss keeps falling while validation stops getting better, the model is memorising the training
data instead of generalising: overfitting, and training on only makes it worse. Every comparison between epochs is
made against the noise of the validation set (`frostline.train.evidence`): paired over the same examples when each
example's loss and correctness were recorded, so a step of one example is not read as a trend. The verdicts:

- improving: validation set a new best within `patience` epochs, or its loss or metric still moves the right way
  beyond noise;
- converged: neither validation nor training loss moves beyond what the validation set can resolve;
- overfitting, onset: the training loss keeps falling by more than the validation set resolves while validation
  stalls within noise (the seed's question 4);
- overfitting, proved: validation loss has risen above its low, or the metric fallen below its best, beyond noise,
  while the training loss fell;
- plateau: a later stage that has not beaten an earlier stage's best and still fits the training data worse than
  that epoch did (unfreezing set the model back; not memorising).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from frostline.train.evidence import SIGNIFICANT, Change, Noise, loss_change, loss_resolution, metric_change, noise_of

if TYPE_CHECKING:
    from frostline.recipe import EpochRecord

Verdict = Literal["improving", "converged", "overfitting", "plateau"]
Level = Literal["onset", "proved"]

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
    """What the history says, on what evidence, and since when."""

    verdict: Verdict
    best_epoch: int
    """Epoch (1-based, across stages) with the best validation result so far."""
    epochs_since_best: int
    began_epoch: int | None = None
    """First epoch of overfitting (the epoch after validation last improved)."""
    gap: float | None = None
    """Validation loss minus training loss at the last epoch."""
    message: str = ""
    advice: list[str] = field(default_factory=list)
    level: Level | None = None
    """For overfitting: its onset (training improves, validation stalls within noise) or proved (validation got
    worse beyond noise)."""
    continues: bool = False
    """Overfitting is proved in the loss, but the metric still sets bests: training goes on while it does."""
    evidence: list[str] = field(default_factory=list)
    """The numbers the verdict rests on, with their standard errors and the number of examples (also in `message`)."""

    @property
    def should_stop(self) -> bool:
        return self.verdict != "improving" and not self.continues

    @property
    def label(self) -> str:
        """The verdict in words: 'onset of overfitting', 'overfitting proved', 'converged', ..."""
        if self.verdict == "overfitting":
            return "onset of overfitting" if self.level == "onset" else "overfitting proved"
        return self.verdict

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class OverfitMonitor:
    """Compares the trend of the training loss with the validation metric and loss after each epoch.

    Each history record (an `EpochRecord`) gives `train_loss`, `val_loss` and `val_accuracy` (or the field named
    by `metric`); with `examples` (each validation example's loss and correctness) or `val_count` and
    `val_loss_sd`, the comparisons know the validation set's noise (see `frostline.train.evidence`).
    """

    patience: int = 2
    """Epochs without a better validation result before the verdict changes from improving."""
    min_delta: float = 0.0
    """Smallest rise in the metric that counts as better."""
    train_drop: float = 0.02
    """Smallest relative fall of the training loss that counts as 'still falling'."""
    val_rise: float = 0.05
    """Smallest relative rise of the validation loss above its low that counts as overfitting, however certain."""
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
            tie = (
                abs(getattr(record, self.metric) - getattr(top, self.metric)) <= self.min_delta
                and record.val_loss < top.val_loss
            )
            if better or (tie and getattr(record, self.metric) >= getattr(top, self.metric)):
                best = i
        return best

    def diagnose(self, history: Sequence[EpochRecord], since: int = 0) -> Diagnosis:
        """The verdict on `history` (one record per epoch); `since` is where the current stage began.

        The best record is searched over the whole history, so a stage that never beats an earlier stage's best is
        judged against it; a stage always gets `patience` epochs of its own.
        """
        if not history:
            return Diagnosis("improving", best_epoch=0, epochs_since_best=0)
        best = self.best_index(history)
        t = len(history) - 1
        waited = t - best
        noise = noise_of(history, self.metric)
        proof = self._proof(history, since, best, noise)
        if proof is not None:
            return self._proved(history, best, proof, continues=waited < self.patience)
        if waited < self.patience or t - since + 1 < self.patience or self._progress(history, since, noise):
            return Diagnosis("improving", best + 1, waited, gap=history[-1].val_loss - history[-1].train_loss)
        return self._stalled(history, since, best, noise)

    def _progress(self, history: Sequence[EpochRecord], since: int, noise: Noise) -> Change | None:
        """Progress beyond noise that a new best alone does not show, or None. The lowest validation loss of the
        last `patience` epochs, below the stage's earlier low (a loss still falling is the finer signal on a small
        validation set) or below the loss of `2 * patience` epochs ago; or the metric now above where it stood then
        (a metric climbing in steps smaller than its noise sets no clear new best every `patience` epochs, yet shows
        its climb over twice that)."""
        t = len(history) - 1
        window = t - self.patience + 1
        if window <= since:
            return None
        recent = history[min(range(window, t + 1), key=lambda i: history[i].val_loss)]
        then = t - 2 * self.patience
        earlier = [min(range(since, window), key=lambda i: history[i].val_loss)] + ([then] if then >= since else [])
        for before in earlier:
            change = loss_change(history[before], recent, noise)
            if change.beyond_noise(-1):
                return change
        if then >= since:
            change = metric_change(history[then], history[-1], self.metric, noise)
            if change.beyond_noise(+1) and change.delta > self.min_delta:
                return change
        return None

    def _proof(self, history: Sequence[EpochRecord], since: int, best: int, noise: Noise) -> Change | None:
        """Evidence that validation got worse beyond noise while the training loss fell: the validation loss above
        the stage's low (at least `patience` epochs back), or the metric below its best on each of the last
        `patience` epochs with the validation loss above where it stood at the best epoch (the best is the highest of
        many noisy epochs, so a metric drop alone, against a loss still falling, is not taken as proof)."""
        last = history[-1]
        t = len(history) - 1
        low = min(range(since, t + 1), key=lambda i: history[i].val_loss)
        if t - low >= self.patience and self._fell(history[low], last):
            rise = loss_change(history[low], last, noise)
            if rise.beyond_noise(+1) and rise.delta > self.val_rise * history[low].val_loss:
                return rise
        recent = range(max(t - self.patience + 1, best + 1, since), t + 1)
        worse = last.val_loss > history[best].val_loss
        if t - best >= self.patience and len(recent) == self.patience and worse and self._fell(history[best], last):
            drops = [metric_change(history[best], history[i], self.metric, noise) for i in recent]
            if all(d.beyond_noise(-1) and -d.delta > self.min_delta for d in drops):
                return drops[-1]
        return None

    def _fell(self, before: EpochRecord, after: EpochRecord) -> bool:
        return after.train_loss < before.train_loss * (1 - self.train_drop)

    def _proved(self, history: Sequence[EpochRecord], best: int, proof: Change, continues: bool) -> Diagnosis:
        last, top = history[-1], history[best]
        began = proof.before_epoch + 1
        then = history[proof.before_epoch - 1]
        name = self.metric.removeprefix("val_")
        what = (
            "validation loss rose above its low" if proof.name == "loss" else f"validation {name} fell below its best"
        )
        headline = (
            f"overfitting proved: {what} beyond noise while the training loss fell; the model is memorising the "
            f"training data instead of generalising. It began at epoch {began}."
        )
        if continues:
            ago = len(history) - 1 - best
            when = "at this epoch" if ago == 0 else f"{ago} epoch{'s' if ago > 1 else ''} ago"
            headline += (
                f" Validation {name} set its best {when}, so training goes on while it may set new ones (up to "
                f"{self.patience} epochs without one; the best weights are kept)."
            )
        evidence = [
            f"validation {proof.name if proof.name == 'loss' else name} {proof.describe()}, z = {proof.z:+.1f}",
            f"training loss {then.train_loss:.4f} (epoch {then.epoch}) -> {last.train_loss:.4f} (epoch {last.epoch})",
            f"best validation {name} {getattr(top, self.metric):.4f} at epoch {top.epoch}; validation loss is now "
            f"{last.val_loss - last.train_loss:+.4f} above training loss",
        ]
        return Diagnosis(
            "overfitting",
            best + 1,
            len(history) - 1 - best,
            began_epoch=began,
            gap=last.val_loss - last.train_loss,
            message=_message(headline, evidence),
            advice=[] if continues else self.advice,
            level="proved",
            continues=continues,
            evidence=evidence,
        )

    def _stalled(self, history: Sequence[EpochRecord], since: int, best: int, noise: Noise) -> Diagnosis:
        """No new best for `patience` epochs and nothing moving beyond noise: converged, the onset of overfitting
        (the training loss still falls by more than the validation set resolves), or a later stage's plateau."""
        last, top = history[-1], history[best]
        t = len(history) - 1
        waited = t - best
        gap = last.val_loss - last.train_loss
        name = self.metric.removeprefix("val_")
        if best < since and last.train_loss >= top.train_loss:
            headline = (
                f"no gain: this stage has not beaten epoch {best + 1} in {t - since + 1} epochs, and it still fits the "
                "training data worse than that epoch did, so the model is not memorising: unfreezing set it back "
                "further than this stage recovered. Try a lower learning rate for the stage, fewer unfrozen blocks, "
                "or bn=fixed for models with BatchNorm."
            )
            evidence = [
                f"validation {name} {metric_change(top, last, self.metric, noise).describe()}",
                f"validation loss {loss_change(top, last, noise).describe()}",
                f"training loss {last.train_loss:.4f} (epoch {last.epoch}), still above {top.train_loss:.4f} "
                f"(epoch {top.epoch})",
            ]
            return Diagnosis(
                "plateau", best + 1, waited, gap=gap, message=_message(headline, evidence), evidence=evidence
            )
        low = min(range(len(history)), key=lambda i: history[i].val_loss)
        # validation last improved at the later of its best metric and its lowest loss; the training loss is
        # compared with where it stood then, or at the stage's start when that was in an earlier stage
        improved = max(best, low)
        start = history[max(improved, since)]
        # relative changes; a loss of exactly 0 (a perfect fit) has none to speak of
        fall = (start.train_loss - last.train_loss) / start.train_loss if start.train_loss > 0 else 0.0
        resolution = loss_resolution(last, noise) / last.val_loss if last.val_loss > 0 else 0.0
        rise = loss_change(history[low], last, noise)
        evidence = [
            f"validation {name} {metric_change(top, last, self.metric, noise).describe()}: no new best in {waited} epochs",
            f"validation loss {rise.describe()}, z = {rise.z:+.1f}",
            f"training loss {start.train_loss:.4f} (epoch {start.epoch}) -> {last.train_loss:.4f} (epoch {last.epoch}), "
            f"{-100 * fall:+.0f}%; one standard error of the validation loss is {100 * resolution:.0f}% of it",
        ]
        # had validation improved in proportion to the training loss's fall, the validation set would have seen it
        # (the fall is larger than two of its standard errors, relative to the loss); or validation loss rose
        visible = fall > SIGNIFICANT * resolution
        falling = self._fell(start, last)
        if falling and (visible or rise.beyond_noise(+1)):
            began = max(improved, since - 1) + 2
            why = (
                "by more than the validation set would have missed"
                if visible
                else "while the validation loss began to rise beyond noise"
            )
            headline = (
                f"onset of overfitting: the training loss keeps falling, {why}, and validation has not improved "
                "beyond noise: the model has begun to fit the training data better without generalising better, "
                f"memorising rather than learning. It began at epoch {began}."
            )
            return Diagnosis(
                "overfitting",
                best + 1,
                waited,
                began_epoch=began,
                gap=gap,
                message=_message(headline, evidence),
                advice=self.advice,
                level="onset",
                evidence=evidence,
            )
        if falling:
            headline = (
                f"converged: validation has not improved beyond noise in {waited} epochs. The training loss still fell "
                f"{100 * fall:.0f}%, but had validation followed in proportion this validation set could not have shown "
                f"it (one standard error is {100 * resolution:.0f}% of its loss), so that is no evidence of memorising "
                "either; more epochs of this stage are unlikely to pay off."
            )
        else:
            headline = (
                "converged: neither validation nor the training loss moves beyond what the validation set can tell "
                "apart, so more epochs of this stage are unlikely to pay off."
            )
        return Diagnosis(
            "converged", best + 1, waited, gap=gap, message=_message(headline, evidence), evidence=evidence
        )


def _message(headline: str, evidence: list[str]) -> str:
    """The headline, then one line per number it rests on."""
    return headline + "".join(f"\n  - {line}" for line in evidence)
