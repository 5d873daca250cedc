"""Class weights and label smoothing change the training loss only; validation loss stays plain cross-entropy."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight

import tiny_task
from frostline.config import DataConfig, FitConfig, RunConfig, StageConfig
from frostline.dataset import PreparedData
from frostline.errors import ConfigError
from frostline.sources import ModelSource
from frostline.train.loop import evaluate, model_forward
from frostline.train.loss import balanced_weights, training_loss
from frostline.train.runtime import select_runtime
from frostline.train.trainer import Trainer


def test_auto_weights_are_scikit_learns_balanced_weights():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 5)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels.numpy())
    torch.testing.assert_close(balanced_weights(labels, 3), torch.tensor(expected, dtype=torch.float32))
    # a class with no training examples weighs nothing rather than dividing by zero
    assert balanced_weights(labels, 4)[3] == 0


def test_the_loss_is_torchs_cross_entropy_with_weights_and_smoothing():
    generator = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(16, 3, generator=generator), torch.randint(0, 3, (16,), generator=generator)
    train = torch.tensor([0] * 10 + [1] * 4 + [2] * 2)
    loss, note = training_loss("auto", 0.1, train, ["a", "b", "c"])
    expected = F.cross_entropy(logits, labels, weight=balanced_weights(train, 3), label_smoothing=0.1)
    torch.testing.assert_close(loss(logits, labels), expected)
    assert note == (
        "training loss: cross-entropy with class weights (auto: inverse frequency over 16 training examples): "
        "a 0.53, b 1.33, c 2.67; label smoothing 0.1 (validation loss: plain cross-entropy)"
    )
    plain, none = training_loss("none", 0.0, train, ["a", "b", "c"])
    torch.testing.assert_close(plain(logits, labels), F.cross_entropy(logits, labels))
    assert none is None


def _imbalanced():
    made = tiny_task.data()
    (tx, ty), (vx, vy) = made["train"], made["val"]
    keep = (ty != 9) | (torch.arange(len(ty)) % 10 == 0)  # class 9 rare in training
    return PreparedData(tx[keep], ty[keep], vx, vy, made["label_names"], origin="digits")


@pytest.mark.parametrize("run", [{"class_weights": "auto"}, {"label_smoothing": 0.2}])
def test_a_run_trains_on_the_chosen_loss_and_reports_plain_validation_loss(run):
    def fit(**options):
        torch.manual_seed(0)
        model, batch = tiny_task.model(10)
        config = FitConfig(
            data=DataConfig(batch_size=64),
            stages=[StageConfig(name="all", freeze="none", epochs=1, lr=3e-3)],
            run=RunConfig(precision="fp32", cache="off", **options),
        )
        trainer = Trainer(config, source=ModelSource("py:test", model, batch, pretrained=True), data=_imbalanced())
        return trainer, trainer.fit(write=False)

    trainer, result = fit(**run)
    _, plain = fit()
    record = result.history[0]
    assert record.train_loss != pytest.approx(plain.history[0].train_loss, rel=1e-3)
    data = trainer.data
    recomputed = evaluate(
        model_forward(trainer.model), data.val_batches(64), select_runtime("cpu", "fp32"), [trainer.model]
    )
    assert record.val_loss == pytest.approx(recomputed.loss, rel=1e-5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"class_weights": "balanced"}, "run.class_weights must be none or auto, got 'balanced'"),
        ({"label_smoothing": 1.0}, "run.label_smoothing is a share of each target in [0, 1), got 1.0"),
    ],
)
def test_bad_loss_settings_are_refused(options, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        RunConfig(**options)
