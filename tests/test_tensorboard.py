"""TensorBoard gets each epoch's numbers as metrics.jsonl records them, when the tensorboard package is installed."""

import json

import pytest
import torch

import tiny_task
from frostline.config import DataConfig, FitConfig, RunConfig, StageConfig
from frostline.dataset import PreparedData
from frostline.sources import ModelSource
from frostline.train.trainer import Trainer

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")

STAGES = [
    StageConfig(name="head", freeze="head", epochs=2, lr=1e-2),
    StageConfig(name="last1", freeze="last:1", epochs=1, lr=1e-3),
]


def _fit(folder, **run):
    made = tiny_task.data()
    (tx, ty), (vx, vy) = made["train"], made["val"]
    data = PreparedData(tx, ty, vx, vy, made["label_names"], origin="digits")
    model, batch = tiny_task.model(10)
    config = FitConfig(
        data=DataConfig(batch_size=64),
        stages=STAGES,
        run=RunConfig(output=str(folder), precision="fp32", patience=5, **run),
    )
    return Trainer(config, source=ModelSource("py:test", model, batch, pretrained=True), data=data).fit()


def test_every_epoch_is_logged_with_the_numbers_of_metrics_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    _fit(tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    for tag, key in [
        ("loss/train", "train_loss"),
        ("loss/validation", "val_loss"),
        ("accuracy/validation", "val_accuracy"),
    ]:
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert logged == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in records]
    assert [e.step for e in events.Scalars("trainable/parameters")] == [1, 2, 3]
    assert any(tag.startswith("lr/") for tag in events.Tags()["scalars"])


def test_tensorboard_can_be_turned_off(tmp_path):
    _fit(tmp_path / "run", tensorboard=False)
    assert not (tmp_path / "run" / "tensorboard").exists()
