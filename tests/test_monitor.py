import math

import pytest
import torch

from frostline.recipe import EpochRecord
from frostline.train.evidence import ValidationExamples, count_of, examples_from_logits, metric_change
from frostline.train.monitor import OverfitMonitor


def _history(train, val_loss, val_acc, stages=None, examples=None, val_count=0):
    stages = stages or ["s"] * len(train)
    examples = examples or [None] * len(train)
    return [
        EpochRecord(
            epoch=i + 1,
            stage=stages[i],
            stage_index=sorted(set(stages), key=stages.index).index(stages[i]),
            stage_epoch=1 + stages[:i].count(stages[i]),
            freeze="head",
            train_loss=t,
            val_loss=v,
            val_accuracy=a,
            val_count=val_count,
            examples=examples[i],
        )
        for i, (t, v, a) in enumerate(zip(train, val_loss, val_acc, strict=True))
    ]


def _paired(n, right_counts, losses, seed=0):
    """Per-example results for a run of epochs on `n` examples: epoch e gets the first right_counts[e] examples
    right (nested sets: each epoch keeps the previous one's right answers), and per-example losses whose mean is
    losses[e], skewed as cross-entropy is (small on the examples it gets right, large on the others) and built
    from one fixed draw, so that consecutive epochs are strongly paired."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g)
    out = []
    for right, loss in zip(right_counts, losses, strict=True):
        correct = torch.arange(n) < right
        each = torch.where(correct, 0.2 * u, 20 * (1 + u))
        out.append(ValidationExamples((each * (loss / each.mean())).float(), correct))
    return out


def _from(examples_list, train):
    accs = [float(e.correct.double().mean()) for e in examples_list]
    losses = [float(e.losses.double().mean()) for e in examples_list]
    return _history(train, losses, accs, examples=examples_list)


def test_flags_overfitting_at_the_epoch_after_the_best():
    history = _history(
        train=[1.20, 0.70, 0.45, 0.30, 0.18, 0.10],
        val_loss=[1.10, 0.80, 0.62, 0.66, 0.74, 0.85],
        val_acc=[0.60, 0.75, 0.82, 0.81, 0.82, 0.80],
    )
    monitor = OverfitMonitor(patience=2)

    assert monitor.diagnose(history[:4]).verdict == "improving"
    diagnosis = monitor.diagnose(history[:5])
    assert diagnosis.verdict == "overfitting" and diagnosis.level == "proved" and diagnosis.should_stop
    assert diagnosis.label == "overfitting proved"
    assert diagnosis.best_epoch == 3
    assert diagnosis.began_epoch == 4
    assert diagnosis.gap == 0.74 - 0.18
    assert "memorising the training data" in diagnosis.message
    assert "0.6200 (epoch 3) -> 0.7400 (epoch 5), +0.1200" in diagnosis.message
    assert any("freeze more" in a for a in diagnosis.advice)


def test_a_healthy_history_is_not_flagged():
    history = _history(
        train=[1.20, 0.80, 0.60, 0.48, 0.40, 0.35],
        val_loss=[1.00, 0.75, 0.60, 0.52, 0.47, 0.44],
        val_acc=[0.65, 0.75, 0.80, 0.83, 0.85, 0.86],
    )
    for n in range(1, len(history) + 1):
        assert OverfitMonitor(patience=2).diagnose(history[:n]).verdict == "improving"


def test_accuracy_saturated_but_validation_loss_still_falling_counts_as_improving():
    history = _history(train=[0.9, 0.5, 0.3, 0.2], val_loss=[0.6, 0.4, 0.3, 0.25], val_acc=[0.95, 0.97, 0.97, 0.97])
    assert OverfitMonitor(patience=2).diagnose(history).verdict == "improving"


def test_flat_training_and_validation_is_converged_not_overfitting():
    history = _history(
        train=[0.50, 0.40, 0.399, 0.398], val_loss=[0.45, 0.40, 0.41, 0.41], val_acc=[0.90, 0.93, 0.93, 0.92]
    )
    diagnosis = OverfitMonitor(patience=2).diagnose(history)
    assert diagnosis.verdict == "converged"
    assert diagnosis.should_stop
    assert diagnosis.began_epoch is None
    assert "memorising" not in diagnosis.message


def test_a_later_stage_that_never_beats_the_earlier_best_is_the_onset_of_overfitting():
    # the seed's question 4: unfreezing after a converged head lowers training loss, validation stays flat
    history = _history(
        train=[0.60, 0.25, 0.16, 0.14, 0.09, 0.06],
        val_loss=[0.30, 0.20, 0.17, 0.18, 0.19, 0.21],
        val_acc=[0.93, 0.96, 0.97, 0.965, 0.97, 0.965],
        stages=["head", "head", "head", "last2", "last2", "last2"],
    )
    monitor = OverfitMonitor(patience=2)

    assert monitor.diagnose(history[:4], since=3).verdict == "improving"  # the stage gets `patience` epochs
    diagnosis = monitor.diagnose(history[:5], since=3)
    assert diagnosis.verdict == "overfitting" and diagnosis.level == "onset" and diagnosis.should_stop
    assert diagnosis.label == "onset of overfitting"
    assert diagnosis.best_epoch == 3
    assert diagnosis.began_epoch == 4
    assert "memorising" in diagnosis.message


def test_ties_on_accuracy_prefer_the_lower_validation_loss():
    history = _history(train=[1, 0.8, 0.7], val_loss=[0.5, 0.4, 0.45], val_acc=[0.9, 0.9, 0.9])
    assert OverfitMonitor().best_index(history) == 1


def test_validation_loss_rising_is_proved_while_accuracy_still_sets_bests_and_training_goes_on():
    history = _history(
        train=[1.0, 0.5, 0.2, 0.08, 0.03, 0.01],
        val_loss=[0.9, 0.6, 0.55, 0.70, 0.80, 0.95],
        val_acc=[0.70, 0.78, 0.80, 0.80, 0.81, 0.815],
    )
    monitor = OverfitMonitor(patience=3)
    assert monitor.diagnose(history[:5]).verdict == "improving"  # the low is two epochs back: not yet

    diagnosis = monitor.diagnose(history)
    assert diagnosis.verdict == "overfitting" and diagnosis.level == "proved"
    assert diagnosis.began_epoch == 4
    assert "validation loss rose above its low beyond noise" in diagnosis.message
    assert diagnosis.evidence[0].startswith("validation loss 0.5500 (epoch 3) -> 0.9500 (epoch 6), +0.4000 ±")
    # accuracy set a new best at this very epoch: keep training while it does, keep the best weights
    assert diagnosis.continues and not diagnosis.should_stop
    assert "training goes on" in diagnosis.message


def test_a_steady_rise_is_caught_although_one_epoch_sat_close_to_the_low():
    # the case: 1.15 -> 2.03 over epochs 7 to 14 while training loss fell; epoch 8 was 0.6% above the low
    val = [2.0, 1.7, 1.5, 1.35, 1.25, 1.18, 1.15, 1.157, 1.30, 1.45, 1.60, 1.75, 1.90, 2.03]
    train = [2.0, 1.6, 1.3, 1.0, 0.8, 0.6, 0.45, 0.33, 0.24, 0.17, 0.12, 0.08, 0.05, 0.03]
    acc = [0.40, 0.50, 0.56, 0.60, 0.62, 0.64, 0.65, 0.65, 0.645, 0.64, 0.635, 0.63, 0.625, 0.62]
    history = _history(train, val, acc, val_count=600)
    monitor = OverfitMonitor(patience=2)

    verdicts = [monitor.diagnose(history[:n]) for n in range(1, len(history) + 1)]
    first = next(i for i, d in enumerate(verdicts) if d.verdict == "overfitting")
    assert 8 <= first + 1 <= 10  # caught within patience of the rise, not before the low
    assert verdicts[first].began_epoch == 8
    assert verdicts[-1].verdict == "overfitting" and verdicts[-1].level == "proved"


def test_a_later_stage_still_fitting_worse_than_the_best_epoch_is_no_gain_not_overfitting():
    # measured on EfficientNet-Lite0 / MNIST-5k: unfreezing two blocks with BatchNorm in train mode set the
    # model back (training loss 0.016 -> 1.49); both losses then fell, but not below the head stage's best
    history = _history(
        train=[0.56, 0.24, 0.05, 0.016, 1.49, 0.45],
        val_loss=[0.27, 0.40, 0.21, 0.19, 0.49, 0.36],
        val_acc=[0.923, 0.908, 0.950, 0.952, 0.909, 0.917],
        stages=["head"] * 4 + ["last2"] * 2,
    )

    diagnosis = OverfitMonitor(patience=2).diagnose(history, since=4)

    assert diagnosis.verdict == "plateau" and diagnosis.should_stop
    assert diagnosis.best_epoch == 4
    assert "not memorising" in diagnosis.message and "bn=fixed" in diagnosis.message


def test_a_flat_validation_loss_with_a_slowly_falling_training_loss_is_converged_not_memorising():
    # the default demo's head: validation loss 0.0913 -> 0.0914 on 426 articles while training loss crept down;
    # the best accuracy was one article above the last epochs'
    n = 426
    right = [414, 417, 418, 419, 420, 421, 420, 420]
    losses = [0.160, 0.112, 0.100, 0.0938, 0.0921, 0.0913, 0.0914, 0.0914]
    train = [0.4807, 0.1513, 0.1088, 0.0887, 0.0777, 0.0704, 0.0668, 0.0654]
    history = _from(_paired(n, right, losses), train)

    diagnosis = OverfitMonitor(patience=2).diagnose(history)

    assert diagnosis.verdict == "converged" and diagnosis.should_stop
    assert diagnosis.best_epoch == 6
    assert "no evidence of memorising" in diagnosis.message
    assert "memorising the training data" not in diagnosis.message and "rather than learning" not in diagnosis.message
    assert "426 examples" in diagnosis.message and "paired" in diagnosis.message


def test_a_step_of_one_example_below_the_best_is_not_proof_of_overfitting():
    n = 400
    right = [300, 340, 360, 361, 360, 360, 360]
    losses = [0.8, 0.6, 0.5, 0.49, 0.5, 0.5, 0.5]
    train = [0.9, 0.6, 0.45, 0.40, 0.39, 0.389, 0.388]
    history = _from(_paired(n, right, losses), train)

    diagnosis = OverfitMonitor(patience=2).diagnose(history)

    assert diagnosis.verdict == "converged"
    assert diagnosis.began_epoch is None


def test_a_metric_climbing_back_beyond_noise_is_not_stopped_for_want_of_a_new_best():
    # no new best for three epochs, but the last epoch is far above where the stage stood two epochs before
    n = 500
    right = [300, 350, 430, 400, 415, 428]
    losses = [0.9, 0.8, 0.62, 0.66, 0.64, 0.63]
    train = [1.0, 0.85, 0.72, 0.63, 0.60, 0.58]
    history = _from(_paired(n, right, losses), train)
    monitor = OverfitMonitor(patience=2)

    assert monitor.diagnose(history[:5]).should_stop  # epoch 5 is within noise of epoch 3: nothing to wait for
    assert monitor.diagnose(history).verdict == "improving"


def test_a_metric_below_its_best_beyond_noise_for_patience_epochs_is_proved():
    n = 1000
    right = [700, 800, 850, 800, 780, 760]
    losses = [0.8, 0.6, 0.50, 0.51, 0.515, 0.52]
    train = [0.9, 0.6, 0.40, 0.30, 0.20, 0.10]
    history = _from(_paired(n, right, losses), train)

    diagnosis = OverfitMonitor(patience=2).diagnose(history)

    assert diagnosis.verdict == "overfitting" and diagnosis.level == "proved"
    assert diagnosis.began_epoch == 4
    assert "validation accuracy fell below its best beyond noise" in diagnosis.message


def test_advice_does_not_suggest_augmentation_when_the_data_is_already_augmented():
    history = _history(
        train=[1.20, 0.70, 0.45, 0.30, 0.18],
        val_loss=[1.10, 0.80, 0.62, 0.66, 0.74],
        val_acc=[0.60, 0.75, 0.82, 0.81, 0.82],
    )
    plain = OverfitMonitor(patience=2).diagnose(history)
    augmented = OverfitMonitor(patience=2, augmented=True).diagnose(history)

    assert plain.verdict == augmented.verdict == "overfitting"
    assert any("augmentation for images" in a for a in plain.advice)
    assert not any("augmentation for images" in a for a in augmented.advice)
    assert any("already on" in a and "crop_scale" in a for a in augmented.advice)


# ---- the evidence: standard errors ---------------------------------------------------------------


def test_paired_accuracy_error_counts_only_the_examples_that_changed():
    n = 100
    a = torch.zeros(n, dtype=torch.bool)
    a[:80] = True
    b = a.clone()
    b[:2] = False  # lost 2
    b[80:86] = True  # gained 6
    before = _history([1.0], [0.5], [0.80], examples=[ValidationExamples(torch.ones(n), a)])[0]
    after = EpochRecord(2, "s", 0, 2, "head", 0.9, 0.5, 0.84, examples=ValidationExamples(torch.ones(n), b))

    change = metric_change(before, after, "val_accuracy")

    assert change.paired and change.examples == 100
    assert change.delta == pytest.approx(0.04)
    assert change.se == pytest.approx(math.sqrt(8 - 16 / 100) / 100)


def test_the_validation_size_is_read_off_the_accuracy_steps_when_not_recorded():
    history = _history([1, 0.9, 0.8, 0.7], [1, 0.9, 0.8, 0.7], [400 / 426, 402 / 426, 405 / 426, 404 / 426])
    assert count_of(history[-1], history) == 426
    history[-1].val_count = 1000
    assert count_of(history[-1], history) == 1000


def test_examples_from_logits_give_each_examples_loss_and_correctness():
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.5]])
    labels = torch.tensor([0, 1, 0])
    examples = examples_from_logits(logits, labels)

    assert examples.correct.tolist() == [True, True, False]
    expected = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert torch.equal(examples.losses, expected)


def test_per_example_results_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="same length"):
        ValidationExamples(torch.zeros(3), torch.zeros(4, dtype=torch.bool))
