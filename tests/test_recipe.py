"""The stage engine: each stage's freeze and groups, and the decision after each epoch, made in one place."""

import pytest
import torch

import tiny_task
from frostline import EpochRecord, Recipe, StageConfig, inspect_model
from frostline.errors import ConfigError, FrozenWeightsChanged
from frostline.train.monitor import Diagnosis, OverfitMonitor

STAGES = [
    StageConfig(name="head", freeze="head", epochs=3, lr=1e-2),
    StageConfig(name="last1", freeze="last:1", epochs=2, lr=1e-3, head_lr_mult=4, layer_decay=0.5),
]


def _model():
    torch.manual_seed(0)
    model, example = tiny_task.model(10)
    return model, inspect_model(model, example)


def _record(stage, history, train, val, acc):
    return stage.record(history, train, val, acc)


def test_each_stage_freezes_and_gets_fresh_groups_with_their_rates():
    model, model_map = _model()
    recipe = Recipe(STAGES)
    head = recipe.start(0, model, model_map)
    assert [g["name"] for g in head.groups] == ["classifier", "classifier (no decay)"]
    assert {p for p, t in model.named_parameters() if t.requires_grad} == {"classifier.weight", "classifier.bias"}

    history = [_record(head, [], 2.0, 1.5, 0.4)]
    second = recipe.start(1, model, model_map, history)
    rates = {g["name"]: g["lr"] for g in second.groups}
    # the head at 4x the base rate; the last block one layer_decay step below the base rate
    assert rates["classifier"] == pytest.approx(4e-3) and rates["features.3"] == pytest.approx(5e-4)
    assert second.since == 1 and second.record(history, 1.0, 1.0, 0.5).stage_epoch == 1


def test_a_spec_that_names_nothing_is_found_before_any_stage_starts():
    model, model_map = _model()
    with pytest.raises(ConfigError, match=r"stages.1.freeze \('late'\) = 'from:features.9'"):
        Recipe([STAGES[0], StageConfig(name="late", freeze="from:features.9")]).check(model, model_map)


def test_the_guard_catches_a_frozen_tensor_that_moved():
    model, model_map = _model()
    stage = Recipe(STAGES).start(0, model, model_map)
    stage.attach(torch.optim.AdamW(stage.groups))
    with torch.no_grad():
        model.features[0].weight.add_(1e-3)
    with pytest.raises(FrozenWeightsChanged, match="features.0.weight"):
        stage.finish()


class _OverfitsAt(OverfitMonitor):
    def __init__(self, epoch, **kwargs):
        super().__init__(**kwargs)
        object.__setattr__(self, "epoch", epoch)

    def diagnose(self, history, since=0):
        if len(history) == self.epoch:
            return Diagnosis("overfitting", best_epoch=1, epochs_since_best=1, began_epoch=2, message="overfitting: x")
        return super().diagnose(history, since)


def test_head_overfitting_ends_the_stage_and_hands_over_to_the_next_one():
    model, model_map = _model()
    recipe = Recipe(STAGES, patience=5)
    recipe.monitor = _OverfitsAt(2, patience=5)
    stage = recipe.start(0, model, model_map)
    history = [_record(stage, [], 2.0, 1.0, 0.5)]
    first = recipe.decide(history, stage)
    assert first.best and not first.end_stage and history[0].best and history[0].verdict == "improving"
    history.append(_record(stage, history, 1.5, 1.2, 0.45))
    second = recipe.decide(history, stage)
    assert second.end_stage and not second.end_run and second.stop_reason is None
    assert "stage 'last1' (last:1) adapts them next" in second.diagnosis.message
    assert recipe.endings(history) == ["head: overfitting after 2 of 3 epochs"]


def test_overfitting_in_the_last_stage_ends_the_run_with_the_reason():
    model, model_map = _model()
    recipe = Recipe(STAGES[:1], patience=5)
    recipe.monitor = _OverfitsAt(2, patience=5)
    stage = recipe.start(0, model, model_map)
    history = [_record(stage, [], 2.0, 1.0, 0.5)]
    recipe.decide(history, stage)
    history.append(_record(stage, history, 1.5, 1.2, 0.45))
    decision = recipe.decide(history, stage)
    assert decision.end_run and decision.stop_reason == "overfitting began at epoch 2 (stage head); stopped at epoch 2"


def test_records_round_trip_through_json_dicts():
    record = EpochRecord(
        epoch=1,
        stage="head",
        stage_index=0,
        stage_epoch=1,
        freeze="head",
        train_loss=1.0,
        val_loss=0.9,
        val_accuracy=0.5,
        lr={"classifier": 0.01},
    )
    assert EpochRecord.from_dict({**record.to_dict(), "unknown": 3}) == record
