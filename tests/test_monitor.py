from frostline.recipe import EpochRecord
from frostline.train.monitor import OverfitMonitor


def _history(train, val_loss, val_acc, stages=None):
    stages = stages or ["s"] * len(train)
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
        )
        for i, (t, v, a) in enumerate(zip(train, val_loss, val_acc, strict=True))
    ]


def test_flags_overfitting_at_the_epoch_after_the_best():
    history = _history(
        train=[1.20, 0.70, 0.45, 0.30, 0.18, 0.10],
        val_loss=[1.10, 0.80, 0.62, 0.66, 0.74, 0.85],
        val_acc=[0.60, 0.75, 0.82, 0.81, 0.82, 0.80],
    )
    monitor = OverfitMonitor(patience=2)

    assert monitor.diagnose(history[:4]).verdict == "improving"
    diagnosis = monitor.diagnose(history[:5])
    assert diagnosis.verdict == "overfitting"
    assert diagnosis.best_epoch == 3
    assert diagnosis.began_epoch == 4
    assert diagnosis.gap == 0.74 - 0.18
    assert "memorising the training data" in diagnosis.message
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


def test_flat_training_and_validation_is_a_plateau_not_overfitting():
    history = _history(
        train=[0.50, 0.40, 0.399, 0.398], val_loss=[0.45, 0.40, 0.41, 0.41], val_acc=[0.90, 0.93, 0.93, 0.92]
    )
    diagnosis = OverfitMonitor(patience=2).diagnose(history)
    assert diagnosis.verdict == "plateau"
    assert diagnosis.should_stop
    assert diagnosis.began_epoch is None


def test_a_later_stage_that_never_beats_the_earlier_best_overfits_from_its_first_epoch():
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
    assert diagnosis.verdict == "overfitting"
    assert diagnosis.best_epoch == 3
    assert diagnosis.began_epoch == 4


def test_ties_on_accuracy_prefer_the_lower_validation_loss():
    history = _history(train=[1, 0.8, 0.7], val_loss=[0.5, 0.4, 0.45], val_acc=[0.9, 0.9, 0.9])
    assert OverfitMonitor().best_index(history) == 1


def test_validation_loss_rising_for_patience_epochs_is_overfitting_even_if_accuracy_creeps_up():
    history = _history(
        train=[1.0, 0.5, 0.2, 0.08, 0.03, 0.01],
        val_loss=[0.9, 0.6, 0.55, 0.70, 0.80, 0.95],
        val_acc=[0.70, 0.78, 0.80, 0.80, 0.81, 0.815],
    )
    diagnosis = OverfitMonitor(patience=3).diagnose(history)

    assert diagnosis.verdict == "overfitting"
    assert diagnosis.began_epoch == 4
    assert "validation loss rose from its low of 0.5500 at epoch 3" in diagnosis.message
    assert OverfitMonitor(patience=3).diagnose(history[:5]).verdict == "improving"


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


def test_validation_loss_still_falling_is_not_a_plateau_though_accuracy_wobbles():
    # measured on MiniLM / BBC News (seed 1, 64 tokens): the head's accuracy moved by one or two of 426
    # articles while its validation loss fell by a quarter; ending the stage there left it unconverged
    history = _history(
        train=[0.4614, 0.1536, 0.1125, 0.0900, 0.0850, 0.0849],
        val_loss=[0.1891, 0.1506, 0.1424, 0.1423, 0.1425, 0.1424],
        val_acc=[0.9577, 0.9554, 0.9507, 0.9530, 0.9530, 0.9530],
    )
    monitor = OverfitMonitor(patience=2)

    assert monitor.diagnose(history[:3]).verdict == "improving"
    assert monitor.diagnose(history[:4]).verdict == "improving"  # the low of epoch 3 is still in the window
    diagnosis = monitor.diagnose(history[:5])  # no new low for two epochs while training loss fell: it stops
    assert diagnosis.should_stop
    assert diagnosis.best_epoch == 1


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
