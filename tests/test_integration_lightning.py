"""The recipe in a Lightning Trainer: the same stages, groups and rates as frostline's engine, proved, and resumable."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lightning", reason="the lightning extra is not installed (pip install 'frostline[lightning]')")

import lightning.pytorch as L  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import tiny_task  # noqa: E402
from conftest import TinyCNN  # noqa: E402
from frostline.config import DataConfig, FitConfig, ModelConfig, RunConfig, StageConfig  # noqa: E402
from frostline.errors import ConfigError  # noqa: E402
from frostline.inspect import inspect_model  # noqa: E402
from frostline.integrations.lightning import FrostlineRecipe  # noqa: E402
from frostline.recipe import EpochRecord, Recipe  # noqa: E402
from frostline.train.monitor import Diagnosis, OverfitMonitor  # noqa: E402
from frostline.train.trainer import Trainer  # noqa: E402

STAGES = [
    StageConfig(name="head", freeze="head", epochs=2, lr=1e-2),
    StageConfig(name="last1", freeze="last:1", epochs=2, lr=1e-3, head_lr_mult=3, layer_decay=0.5, warmup=0.2),
]
DATA = tiny_task.data()


class Digits(L.LightningModule):
    """A LightningModule around tiny_task's DigitsNet (or another classifier), as a user writes one."""

    def __init__(self, net, example=None, data=DATA):
        super().__init__()
        self.net = net
        self.example_input_array = torch.zeros(2, 64) if example is None else example
        self.data = data

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)  # replaced by FrostlineRecipe before the first step

    def on_train_epoch_start(self):
        # dropout depends on the epoch alone, so a resumed run replays the uninterrupted one
        torch.manual_seed(100 + self.current_epoch)

    def train_dataloader(self):
        # tiny_task's examples come shuffled: a fixed order, and a loader that draws nothing from the global RNG
        # (its iterator is made before on_train_epoch_start on resume, after it otherwise)
        return DataLoader(TensorDataset(*self.data["train"]), batch_size=64, generator=torch.Generator().manual_seed(0))

    def val_dataloader(self):
        return DataLoader(TensorDataset(*self.data["val"]), batch_size=300)


class Probe(Callback):
    """Listed after the recipe: what each epoch trains, with which groups, and the weights after each epoch."""

    def __init__(self):
        self.epochs, self.after = [], []

    def on_train_epoch_start(self, trainer, pl_module):
        net = pl_module.net
        names = {p: n for n, p in net.named_parameters()}
        self.epochs.append(
            {
                "trainable": {n for n, p in net.named_parameters() if p.requires_grad},
                "groups": [_group(g, names, "initial_lr") for g in trainer.optimizers[0].param_groups],
                "optimizer_state": sorted(names[p] for p in trainer.optimizers[0].state),
                "weights": _weights(net),
            }
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            dropout = [m.training for m in pl_module.net.modules() if isinstance(m, torch.nn.Dropout)]
            self.epochs[-1]["dropout_training"] = dropout

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.after.append(_weights(pl_module.net))


def _group(group, names, rate):
    return (group["name"], group[rate], group["weight_decay"], [names[p] for p in group["params"]])


def _weights(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _engine_stage(index, stages=STAGES):
    """What frostline's own engine gives for stage `index` on an identical fresh copy of the model."""
    torch.manual_seed(0)
    fresh, example = tiny_task.model(10)
    recipe, model_map = Recipe(stages, patience=5), inspect_model(fresh, example)
    for earlier in range(index + 1):
        stage = recipe.start(earlier, fresh, model_map)
    names = {p: n for n, p in fresh.named_parameters()}
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    return recipe, stage, trainable, [_group(g, names, "lr") for g in stage.groups]


def _trainer(callbacks, max_epochs=4, **settings):
    settings = {"enable_checkpointing": False, "num_sanity_val_steps": 2, **settings}
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=callbacks,
        **settings,
    )


def _net():
    L.seed_everything(0, verbose=False)
    net, _ = tiny_task.model(10)
    return net


def _frostline_fit(stages, monitor=None):
    """frostline fit's own trainer on the same model, data and recipe (in memory)."""
    config = FitConfig(
        ModelConfig("py:tiny_task:model"),
        DataConfig(ref="py:tiny_task:data", batch_size=64),
        stages,
        RunConfig(patience=5, precision="fp32"),
    )
    trainer = Trainer(config)
    if monitor is not None:
        trainer.recipe.monitor = monitor
    return trainer.fit(write=False)


def test_each_stage_trains_what_the_engine_says_at_its_rates_and_frozen_tensors_never_move():
    net = _net()
    initial = _weights(net)
    recipe, probe = FrostlineRecipe(STAGES, model="net", patience=5), Probe()
    _trainer([recipe, probe]).fit(Digits(net))

    assert [(r.stage, r.stage_epoch) for r in recipe.history] == [("head", 1), ("head", 2), ("last1", 1), ("last1", 2)]
    assert probe.epochs[0]["weights"].keys() == initial.keys()
    assert all(torch.equal(v, initial[k]) for k, v in probe.epochs[0]["weights"].items())
    for index, first_epoch in ((0, 0), (1, 2)):
        _, stage, trainable, groups = _engine_stage(index)
        seen = probe.epochs[first_epoch]
        assert seen["trainable"] == trainable
        assert seen["groups"] == groups
        assert recipe.stage_plans[stage.config.name] == stage.plan.to_dict()
        # the stage's epochs: frozen tensors bit-identical from its first step to its last, trainable ones moved
        start, end = seen["weights"], probe.after[first_epoch + 1]
        frozen = set(start) - trainable
        assert frozen and all(torch.equal(start[n], end[n]) for n in frozen)
        assert all(not torch.equal(start[n], end[n]) for n in trainable)
        # frozen dropout held in eval through Lightning's mode changes; the stage's trainable block trains with it
        assert seen["dropout_training"] == ([False, False] if index == 0 else [False, True])
    assert probe.epochs[0]["trainable"] == {"classifier.weight", "classifier.bias"}
    assert probe.epochs[2]["trainable"] == {
        "classifier.weight",
        "classifier.bias",
        "features.3.weight",
        "features.3.bias",
    }
    assert probe.epochs[2]["groups"][0][:3] == ("features.3", 1e-3 * 0.5, 0.01)
    assert recipe.guard_reports["head"].tensors == 4 and recipe.guard_reports["last1"].tensors == 2
    assert torch.equal(net.features[0].weight, initial["features.0.weight"])

    # frostline fit's own trainer: the same plans, and each group at the same rate at every epoch's end
    result = _frostline_fit(STAGES)
    assert result.stage_plans == recipe.stage_plans
    for ours, theirs in zip(recipe.history, result.history, strict=True):
        assert (ours.stage, ours.trainable_tensors, ours.trainable_params, ours.steps) == (
            theirs.stage,
            theirs.trainable_tensors,
            theirs.trainable_params,
            theirs.steps,
        )
        assert ours.lr == pytest.approx(theirs.lr, rel=1e-9)
        # other batch orders, the same learning: each epoch's validation loss within 0.01 of frostline fit's
        assert ours.val_loss == pytest.approx(theirs.val_loss, abs=0.01)
    assert recipe.history[-1].val_loss == pytest.approx(2.1586, abs=1e-4)
    assert recipe.history[-1].val_accuracy > 0.4  # 10 classes: it learned
    assert recipe.stop_reason == result.stop_reason == "every stage done (head: all 2 epochs; last1: all 2 epochs)"
    # the best weights are the model's at the end
    best = max(recipe.history, key=lambda r: (r.val_accuracy, -r.val_loss))
    assert recipe.best_epoch == best.epoch
    assert all(torch.equal(v, recipe.best_state[k]) for k, v in net.state_dict().items())


class _HeadOverfitsAtEpoch2(OverfitMonitor):
    def diagnose(self, history, since=0):
        if len(history) == 2:
            return Diagnosis("overfitting", best_epoch=1, epochs_since_best=1, began_epoch=2, message="overfitting: x")
        return super().diagnose(history, since)


def test_an_overfitting_verdict_stops_the_lightning_trainer_with_the_engines_diagnosis():
    stages = [StageConfig(name="head", freeze="head", epochs=4, lr=1e-2)]
    recipe = FrostlineRecipe(stages, model="net", patience=5)
    recipe.recipe.monitor = _HeadOverfitsAtEpoch2(patience=5)
    trainer = _trainer([recipe], num_sanity_val_steps=0)
    trainer.fit(Digits(_net()))

    assert trainer.current_epoch == 2 and len(recipe.history) == 2
    assert recipe.stop_reason == "overfitting began at epoch 2 (stage head); stopped at epoch 2"
    engine, stage, _, _ = _engine_stage(0, stages)
    engine.monitor = _HeadOverfitsAtEpoch2(patience=5)
    history = [EpochRecord.from_dict(r.to_dict()) for r in recipe.history]
    decision = engine.decide(history, stage)
    assert decision.end_run and decision.diagnosis == recipe.diagnosis
    assert recipe.diagnosis.verdict == "overfitting" and recipe.diagnosis.began_epoch == 2
    result = _frostline_fit(stages, _HeadOverfitsAtEpoch2(patience=5))
    assert (result.diagnosis, result.stop_reason) == (recipe.diagnosis, recipe.stop_reason)


def test_a_head_that_overfits_hands_over_to_the_next_stage_as_in_frostline_fit():
    recipe = FrostlineRecipe(
        [StageConfig(name="head", freeze="head", epochs=3, lr=1e-2), STAGES[1]], model="net", patience=5
    )
    recipe.recipe.monitor = _HeadOverfitsAtEpoch2(patience=5)
    _trainer([recipe], max_epochs=10, num_sanity_val_steps=0).fit(Digits(_net()))

    assert [r.stage for r in recipe.history] == ["head", "head", "last1", "last1"]
    assert recipe.history[1].verdict == "overfitting"
    assert recipe.stop_reason == "every stage done (head: overfitting after 2 of 3 epochs; last1: all 2 epochs)"


def test_a_checkpoint_taken_after_stage_one_resumes_into_stage_two(tmp_path):
    net = _net()
    initial = _weights(net)
    recipe = FrostlineRecipe(STAGES, model="net", patience=5)
    saving = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    _trainer([recipe, saving], enable_checkpointing=True).fit(DigitsRecorded(net, recipe))
    _, stage, trainable, groups = _engine_stage(1)

    # after stage 1 (epoch=1.ckpt): stage 2 begins with fresh groups; inside stage 2 (epoch=2.ckpt): its AdamW state
    for checkpoint, epochs_left, optimizer_state in (("epoch=1", 2, []), ("epoch=2", 1, sorted(trainable))):
        resumed_net = _net()
        resumed, probe = FrostlineRecipe(STAGES, model="net", patience=5), Probe()
        _trainer([resumed, probe]).fit(DigitsRecorded(resumed_net, resumed), ckpt_path=tmp_path / f"{checkpoint}.ckpt")

        assert len(probe.epochs) == epochs_left
        assert probe.epochs[0]["trainable"] == trainable
        assert probe.epochs[0]["groups"] == groups
        assert probe.epochs[0]["optimizer_state"] == optimizer_state
        assert resumed.stage_plans == recipe.stage_plans
        # the resumed run replays the uninterrupted one: the same records, the same final weights
        keys = ("epoch", "stage", "stage_epoch", "trainable_params", "steps", "train_loss", "val_loss", "val_accuracy")
        assert [[r.to_dict()[k] for k in (*keys, "lr")] for r in resumed.history] == [
            [r.to_dict()[k] for k in (*keys, "lr")] for r in recipe.history
        ]
        assert (resumed.stop_reason, resumed.best_epoch) == (recipe.stop_reason, recipe.best_epoch)
        # each epoch's per-example evidence, from before the checkpoint too, as the monitor saw it uninterrupted
        for a, b in zip(resumed.history, recipe.history, strict=True):
            assert torch.equal(a.examples.losses, b.examples.losses) and a.verdict == b.verdict
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in resumed_net.state_dict().items())
        assert torch.equal(resumed_net.features[0].weight, initial["features.0.weight"])


def test_frozen_batchnorm_keeps_its_statistics_through_lightnings_mode_changes():
    L.seed_everything(0, verbose=False)
    net = TinyCNN(num_classes=3)
    images = torch.randn(96, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(96) % 3
    data = {"train": (images[:64], labels[:64]), "val": (images[64:], labels[64:])}
    before = _weights(net)
    recipe = FrostlineRecipe([StageConfig(name="last1", freeze="last:1", epochs=2, lr=1e-2)], model="net")
    _trainer([recipe], max_epochs=2).fit(Digits(net, torch.zeros(2, 3, 8, 8), data))

    after = net.state_dict()
    for frozen in ("blocks.0.1", "blocks.1.1"):  # BatchNorm of frozen blocks: held in eval, statistics untouched
        for buffer in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(after[f"{frozen}.{buffer}"], before[f"{frozen}.{buffer}"])
    assert not torch.equal(after["blocks.2.1.running_mean"], before["blocks.2.1.running_mean"])  # trains: updates
    assert after["blocks.2.1.num_batches_tracked"] == 2  # one batch per epoch
    assert recipe.guard_reports["last1"].buffers == 6


def test_a_recipe_comes_from_a_config_file(tmp_path):
    path = tmp_path / "fit.yaml"
    path.write_text(
        "stages:\n  - {name: probe, freeze: head, epochs: 2, lr: 0.01}\n  - {name: tune, freeze: 'last:1', lr: 1e-4}\n"
        "run: {patience: 3}\n"
    )
    recipe = FrostlineRecipe(path, model="net")
    assert [s.name for s in recipe.recipe.stages] == ["probe", "tune"] and recipe.recipe.monitor.patience == 3


@pytest.mark.parametrize(
    ("settings", "recipe_settings", "freeze", "message"),
    [
        ({}, {"model": "nett"}, "head", "model='nett' names no module of Digits (did you mean net or"),
        ({"check_val_every_n_epoch": 2}, {"model": "net"}, "head", "one validation at the end of every epoch"),
        ({}, {"model": "net", "val_loss": "validation_loss"}, "head", "(did you mean val_loss?)"),
        ({}, {"model": "net"}, "last:3", "stages.0.freeze ('tune') = 'last:3': last:3 asks for 3 blocks"),
    ],
)
def test_what_the_recipe_cannot_run_with_is_named_before_the_first_step(settings, recipe_settings, freeze, message):
    net = _net()
    before = _weights(net)
    recipe = FrostlineRecipe([StageConfig(name="tune", freeze=freeze, epochs=1, lr=1e-2)], **recipe_settings)
    with pytest.raises(ConfigError) as err:
        _trainer([recipe], max_epochs=1, **settings).fit(Digits(net))
    assert message in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


class DigitsRecorded(Digits):
    """Digits whose validation_step hands the recipe each example's logits and label."""

    def __init__(self, net, recipe):
        super().__init__(net)
        self.recipe = recipe

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.recipe.record_validation(self.net(batch[0]), batch[1])


def test_record_validation_gives_the_monitor_each_validation_example():
    recipe = FrostlineRecipe(STAGES, model="net", patience=5)
    _trainer([recipe]).fit(DigitsRecorded(_net(), recipe))

    size = len(DATA["val"][1])
    for record in recipe.history:
        assert record.val_count == len(record.examples) == size
        assert record.examples.correct.double().mean().item() == pytest.approx(record.val_accuracy)
