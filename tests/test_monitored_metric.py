"""Macro-F1 as the monitored metric: recorded each epoch, its changes measured paired against the validation noise,
and the best epoch chosen by it when run.monitor says so."""

import pytest
import torch
from sklearn.metrics import f1_score

import tiny_task
from frostline.config import DataConfig, FitConfig, RunConfig, StageConfig
from frostline.dataset import PreparedData
from frostline.errors import ConfigError
from frostline.recipe import EpochRecord, Recipe
from frostline.sources import ModelSource
from frostline.train.evidence import (
    ValidationExamples,
    attach_examples,
    examples_from_logits,
    examples_tensors,
    macro_f1_change_se,
)
from frostline.train.trainer import Trainer

SHARES = torch.tensor([0.5, 0.3, 0.15, 0.05])


def _epochs(n, generator):
    """Two epochs' predictions on n examples of imbalanced classes: 80% right, the second epoch changing 10%."""
    labels = torch.multinomial(SHARES, n, replacement=True, generator=generator)
    wrong = (labels + torch.randint(1, 4, (n,), generator=generator)) % 4
    first = torch.where(torch.rand(n, generator=generator) < 0.8, labels, wrong)
    other = torch.where(first == labels, wrong, labels)
    second = torch.where(torch.rand(n, generator=generator) < 0.1, other, first)
    return labels, first, second


def _examples(labels, predicted):
    return ValidationExamples(torch.zeros(len(labels)), predicted == labels, predicted, labels)


def _f1(labels, predicted):
    return f1_score(labels, predicted, average="macro", zero_division=0)


def test_the_paired_error_of_a_macro_f1_change_matches_its_spread_over_validation_sets():
    generator = torch.Generator().manual_seed(0)
    changes = []
    for _ in range(300):
        labels, first, second = _epochs(400, generator)
        changes.append(_f1(labels, second) - _f1(labels, first))
    spread = torch.tensor(changes).std().item()
    labels, first, second = _epochs(400, generator)
    estimated = macro_f1_change_se(_examples(labels, first), _examples(labels, second))
    assert estimated == pytest.approx(spread, rel=0.35)
    assert macro_f1_change_se(_examples(labels, first), _examples(labels, first)) == 0.0


def test_the_best_epoch_follows_the_monitored_metric():
    def record(epoch, accuracy, f1):
        return EpochRecord(epoch, "s", 0, epoch, "head", 0.5, 0.4, accuracy, val_macro_f1=f1)

    # epoch 2 is more accurate, epoch 3 treats the small classes better
    history = [record(1, 0.80, 0.60), record(2, 0.90, 0.62), record(3, 0.85, 0.80)]
    stages = [StageConfig(name="s", freeze="head", epochs=5)]
    assert Recipe(stages).monitor.best_index(history) == 1
    assert Recipe(stages, monitor="macro_f1").monitor.best_index(history) == 2


def test_macro_f1_cannot_be_monitored_without_each_examples_classes():
    from frostline.recipe import Stage

    recipe = Recipe([StageConfig(name="s", freeze="head", epochs=5)], monitor="macro_f1")
    history = [EpochRecord(1, "s", 0, 1, "head", 0.5, 0.4, 0.8)]
    with pytest.raises(ValueError, match="examples=examples_from_logits"):
        recipe.decide(history, Stage.__new__(Stage))
    with pytest.raises(ConfigError, match="run.monitor must be accuracy or macro_f1, got 'f1'"):
        RunConfig(monitor="f1")


def test_each_examples_classes_survive_a_checkpoint():
    logits = torch.tensor([[2.0, 0.1, 0.0], [0.1, 0.2, 3.0], [1.0, 2.0, 0.0]])
    examples = examples_from_logits(logits, torch.tensor([0, 1, 1]))
    record = EpochRecord(1, "s", 0, 1, "head", 0.5, 0.4, 2 / 3, examples=examples)
    again = EpochRecord(1, "s", 0, 1, "head", 0.5, 0.4, 2 / 3)
    attach_examples([again], examples_tensors([record]))
    assert torch.equal(again.examples.predicted, torch.tensor([0, 2, 1]))
    assert torch.equal(again.examples.labels, torch.tensor([0, 1, 1]))


def test_a_run_monitored_by_macro_f1_records_it_and_keeps_its_best_epoch():
    made = tiny_task.data()
    (tx, ty), (vx, vy) = made["train"], made["val"]
    keep = (ty != 9) | (torch.arange(len(ty)) % 8 == 0)  # class 9 rare in training
    data = PreparedData(tx[keep], ty[keep], vx, vy, made["label_names"], origin="digits")
    torch.manual_seed(0)
    model, batch = tiny_task.model(10)
    config = FitConfig(
        data=DataConfig(batch_size=64),
        stages=[StageConfig(name="all", freeze="none", epochs=4, lr=3e-3)],
        run=RunConfig(precision="fp32", cache="off", patience=5, monitor="macro_f1", class_weights="auto"),
    )
    trainer = Trainer(config, source=ModelSource("py:test", model, batch, pretrained=True), data=data)
    result = trainer.fit(write=False)
    f1s = [r.val_macro_f1 for r in result.history]
    assert all(0 < f <= 1 for f in f1s)
    assert result.history[result.best_epoch - 1].val_macro_f1 == max(f1s)
    # the kept weights give the recorded macro-F1, as scikit-learn computes it
    trainer.model.eval()
    with torch.no_grad():
        predicted = trainer.model(vx).argmax(dim=-1)
    assert max(f1s) == pytest.approx(_f1(vy, predicted), abs=1e-9)
