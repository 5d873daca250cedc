"""frostline's recipe inside transformers.Trainer: the same stages, groups and rates as Recipe.start, frozen
tensors bit-identical, the monitor's decisions acted on, and the Trainer's checkpoints resumed in the right stage."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers", reason="the transformers extra is not installed")
pytest.importorskip(
    "accelerate", reason="transformers.Trainer needs accelerate>=1.1 (pip install 'transformers[torch]')"
)

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from conftest import TinyCNN, tiny_bert  # noqa: E402
from frostline.config import StageConfig  # noqa: E402
from frostline.errors import ConfigError, FrozenWeightsChanged  # noqa: E402
from frostline.inspect import inspect_model  # noqa: E402
from frostline.integrations.transformers import FrostlineCallback, compute_accuracy  # noqa: E402
from frostline.recipe import Recipe  # noqa: E402
from frostline.train.monitor import Diagnosis, OverfitMonitor  # noqa: E402

STAGES = [
    StageConfig(name="head", freeze="head", epochs=2, lr=1e-2, head_lr_mult=1.0),
    StageConfig(name="last2", freeze="last:2", epochs=2, lr=1e-3, head_lr_mult=5.0, layer_decay=0.5),
]


class Tokens(torch.utils.data.Dataset):
    """Token sequences whose label is the bucket of their first token: learnable from the [CLS] position."""

    def __init__(self, n: int, seed: int):
        self.ids = torch.randint(1, 120, (n, 12), generator=torch.Generator().manual_seed(seed))
        self.labels = self.ids[:, 0] * 3 // 120

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": self.labels[i]}


class Probe(TrainerCallback):
    """What the Trainer really trains with, read after the frostline callback at each epoch's end."""

    def __init__(self, model):
        self.names = {p: n for n, p in model.named_parameters()}
        self.model = model
        self.epochs: list[dict] = []
        self.start: dict[str, torch.Tensor] = {}

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.start = {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
        self.epochs.append(
            {
                "trainable": sorted(n for p, n in self.names.items() if p.requires_grad),
                "groups": [
                    (g["name"], g["initial_lr"], g["weight_decay"], [self.names[p] for p in g["params"]])
                    for g in optimizer.param_groups
                ],
                "moments": {self.names[p] for p in optimizer.state},
                "start": self.start,
                "end": {n: p.detach().clone() for n, p in self.model.named_parameters()},
                "buffers": {n: b.clone() for n, b in self.model.named_buffers()},
                "step": state.global_step,
            }
        )


class OverfitsAt(OverfitMonitor):
    """The real monitor, except that the epochs in `at` read as overfitting."""

    def __init__(self, at: tuple[int, ...], **kwargs):
        super().__init__(**kwargs)
        object.__setattr__(self, "at", at)

    def diagnose(self, history, since=0):
        if len(history) in self.at:
            n = len(history)
            return Diagnosis(
                "overfitting", best_epoch=1, epochs_since_best=n - 1, began_epoch=n, message="overfitting: x"
            )
        return super().diagnose(history, since)


def _args(tmp_path, epochs: int, **more) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path),
        eval_strategy="epoch",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=32,
        num_train_epochs=epochs,
        disable_tqdm=True,
    )
    settings.update(more)
    return TrainingArguments(**settings)


def _trainer(model, callback, args, *extra) -> Trainer:
    return Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(64, seed=1),
        eval_dataset=Tokens(32, seed=2),
        compute_metrics=compute_accuracy,
        callbacks=[callback, *extra],
        optimizers=callback.optimizers(),
    )


def _reference(stages, history=()):
    """What frostline's own engine gives on a fresh copy of the same model: per stage, trainable set and groups."""
    model, batch = tiny_bert()
    model_map = inspect_model(model, batch)
    recipe = Recipe(stages)
    names = {p: n for n, p in model.named_parameters()}
    expected = {}
    for index, config in enumerate(stages):
        stage = recipe.start(index, model, model_map, history)
        groups = [(g["name"], g["lr"], g["weight_decay"], [names[p] for p in g["params"]]) for g in stage.groups]
        expected[config.name] = (sorted(stage.plan.trainable), groups, stage)
    return expected, recipe


def test_stages_train_the_sets_groups_and_rates_of_the_recipe_and_frozen_tensors_never_move(tmp_path):
    model, _ = tiny_bert()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    callback = FrostlineCallback(STAGES)
    probe = Probe(model)
    dropout_seen: dict[str, list[bool]] = {
        "bert.encoder.layer.0.output.dropout": [],
        "bert.encoder.layer.3.output.dropout": [],
    }
    for path, seen in dropout_seen.items():
        model.get_submodule(path).register_forward_hook(
            lambda m, i, o, seen=seen: seen.append(m.training) if model.training else None
        )
    args = _args(tmp_path, callback.epochs, gradient_accumulation_steps=2, logging_steps=1)
    trainer = _trainer(model, callback, args, probe)
    trainer.train()

    expected, _ = _reference(STAGES)
    assert [r.stage for r in callback.history] == ["head", "head", "last2", "last2"]
    for record, seen in zip(callback.history, probe.epochs, strict=True):
        trainable, groups, _ = expected[record.stage]
        assert seen["trainable"] == trainable
        assert seen["groups"] == groups
        # a fresh AdamW per stage: moments only for the tensors this stage trains
        assert seen["moments"] == set(trainable)
        # 64 examples in batches of 16, gradients accumulated over 2: 2 optimizer steps per epoch
        assert record.steps == 2
    assert [g[0] for g in expected["last2"][1]] == [
        "bert.encoder.layer.2",
        "bert.encoder.layer.2 (no decay)",
        "bert.encoder.layer.3",
        "bert.encoder.layer.3 (no decay)",
        "bert.pooler",
        "bert.pooler (no decay)",
        "classifier",
        "classifier (no decay)",
    ]
    assert [g[1] for g in expected["last2"][1][::2]] == pytest.approx([2.5e-4, 5e-4, 1e-3, 5e-3])
    assert callback.stage_plans["last2"]["trainable_tensors"] == len(expected["last2"][0])

    ever_trained = set(expected["last2"][0])
    last = probe.epochs[-1]["end"]
    for name, start in initial.items():
        if name in ever_trained:
            assert not torch.equal(last[name], start), f"{name} trained but never moved"
        else:
            assert torch.equal(dict(model.named_parameters())[name], start), f"frozen {name} moved"
    # each epoch's training loss is the Trainer's logged loss over that epoch's steps
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert callback.history[0].train_loss == pytest.approx(sum(logged[:2]) / 2)
    # frozen dropout is held in eval through the Trainer's model.train(): layer 0 always, layer 3 in the head stage
    steps_per_stage = 4 * 2
    assert dropout_seen["bert.encoder.layer.0.output.dropout"] == [False] * 2 * steps_per_stage
    assert dropout_seen["bert.encoder.layer.3.output.dropout"] == [False] * steps_per_stage + [True] * steps_per_stage
    # pinned with seed 0 (the Trainer's logged training loss sums the 2 accumulated batches' mean losses)
    assert [round(r.val_loss, 4) for r in callback.history] == [1.1004, 1.099, 1.0936, 1.0919]
    assert [r.val_accuracy for r in callback.history] == [0.3125, 0.3125, 0.5, 0.40625]
    assert [round(r.train_loss, 4) for r in callback.history] == [2.2092, 2.192, 2.1897, 2.1794]
    # the best epoch's weights are restored
    best = callback.history[callback.recipe.monitor.best_index(callback.history)]
    assert best.best and callback.stop_reason == "every stage done (head: all 2 epochs; last2: all 2 epochs)"
    assert all(torch.equal(v, callback.best_state[k]) for k, v in model.state_dict().items())


def test_overfitting_stops_the_trainer_with_the_diagnosis_of_recipe_decide(tmp_path):
    stages = [
        StageConfig(name="head", freeze="head", epochs=3, lr=1e-2),
        StageConfig(name="last2", freeze="last:2", epochs=2, lr=1e-3),
    ]
    model, _ = tiny_bert()
    callback = FrostlineCallback(stages)
    callback.recipe.monitor = OverfitsAt((2, 3), patience=5)
    trainer = _trainer(model, callback, _args(tmp_path, 6))
    trainer.train()

    # epoch 2: the head alone overfits, its stage ends and last:2 adapts the features; epoch 3: the run stops
    assert [(r.stage, r.verdict) for r in callback.history] == [
        ("head", "improving"),
        ("head", "overfitting"),
        ("last2", "overfitting"),
    ]
    assert trainer.state.global_step == 3 * 4
    # no step logs (logging_steps=500): the callback's epoch-end log gives each epoch its training loss
    logged = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    assert [r.train_loss for r in callback.history] == [logged[4], logged[8], logged[12]]
    assert callback.stop_reason == "overfitting began at epoch 3 (stage last2); stopped at epoch 3"
    expected, recipe = _reference(stages, copy.deepcopy(callback.history[:2]))
    recipe.monitor = OverfitsAt((2, 3), patience=5)
    decision = recipe.decide(copy.deepcopy(callback.history), expected["last2"][2])
    assert decision.end_run and callback.diagnosis == decision.diagnosis
    assert callback.stop_reason == decision.stop_reason


def test_a_tensor_frozen_after_training_in_an_earlier_stage_never_moves_again(tmp_path):
    stages = [
        StageConfig(name="all", freeze="none", epochs=1, lr=1e-3),
        StageConfig(name="head", freeze="head", epochs=1, lr=1e-2),
    ]
    model, _ = tiny_bert()
    callback = FrostlineCallback(stages)
    probe = Probe(model)
    _trainer(model, callback, _args(tmp_path, 2), probe).train()

    first, second = probe.epochs
    assert second["moments"] == {"classifier.weight", "classifier.bias"}
    body = [n for n in first["start"] if not n.startswith("classifier.")]
    assert any(not torch.equal(first["end"][n], first["start"][n]) for n in body)
    assert all(torch.equal(second["end"][n], second["start"][n]) for n in body)
    assert not torch.equal(second["end"]["classifier.weight"], second["start"]["classifier.weight"])


def test_a_checkpoint_after_stage_one_resumes_in_stage_two_with_its_set_and_groups(tmp_path):
    stages = [
        StageConfig(name="head", freeze="head", epochs=1, lr=1e-2),
        StageConfig(name="last2", freeze="last:2", epochs=2, lr=1e-3),
    ]
    model, _ = tiny_bert()
    whole = FrostlineCallback(stages)
    whole_trainer = _trainer(model, whole, _args(tmp_path / "whole", 3, save_strategy="epoch"))
    whole_trainer.compute_metrics = whole.compute_metrics
    whole_trainer.train()

    resumed_model, _ = tiny_bert()
    callback = FrostlineCallback(stages)
    probe = Probe(resumed_model)
    trainer = _trainer(resumed_model, callback, _args(tmp_path / "whole", 3, save_strategy="no"), probe)
    trainer.compute_metrics = callback.compute_metrics
    trainer.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-4"))

    expected, _ = _reference(stages)
    assert [r.stage for r in callback.history] == ["head", "last2", "last2"]
    assert callback.history[0] == whole.history[0]
    # the monitor's per-example evidence of the epoch before the checkpoint came back with it
    assert torch.equal(callback.history[0].examples.losses, whole.history[0].examples.losses)
    assert [r.verdict for r in callback.history] == [r.verdict for r in whole.history]
    assert [p["trainable"] for p in probe.epochs] == [expected["last2"][0]] * 2
    assert [g[:2] for g in probe.epochs[0]["groups"]] == [g[:2] for g in expected["last2"][1]]
    assert callback.stop_reason == whole.stop_reason
    for key, value in model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_train_epochs": 3}, "num_train_epochs=3 does not cover the recipe's 4 epochs"),
        ({"eval_strategy": "no"}, "eval_strategy must be 'epoch'"),
        ({"optimizers": (None, None)}, "pass Trainer(..., optimizers=callback.optimizers())"),
    ],
)
def test_a_trainer_that_cannot_run_the_recipe_is_refused_when_it_is_built(tmp_path, change, message):
    model, _ = tiny_bert()
    callback = FrostlineCallback(STAGES)
    args = _args(
        tmp_path, change.get("num_train_epochs", callback.epochs), eval_strategy=change.get("eval_strategy", "epoch")
    )
    with pytest.raises(ConfigError) as err:
        Trainer(
            model=model,
            args=args,
            train_dataset=Tokens(64, seed=1),
            eval_dataset=Tokens(32, seed=2),
            callbacks=[callback],
            optimizers=change.get("optimizers", callback.optimizers()),
        )
    assert message in str(err.value)


def test_an_evaluation_without_accuracy_names_the_fix(tmp_path):
    model, _ = tiny_bert()
    callback = FrostlineCallback(STAGES)
    trainer = _trainer(model, callback, _args(tmp_path, callback.epochs))
    trainer.compute_metrics = None
    with pytest.raises(ConfigError, match="compute_metrics=compute_accuracy"):
        trainer.train()


class Bumper(TrainerCallback):
    """Moves a frozen tensor in place, as a bug outside the optimizer would."""

    def __init__(self, model):
        self.model = model

    def on_step_end(self, args, state, control, **kwargs):
        with torch.no_grad():
            self.model.bert.embeddings.word_embeddings.weight[0, 0] += 1e-3


def test_the_guard_stops_the_trainer_when_a_frozen_tensor_moves(tmp_path):
    model, _ = tiny_bert()
    callback = FrostlineCallback(STAGES)
    with pytest.raises(FrozenWeightsChanged, match="bert.embeddings.word_embeddings.weight"):
        _trainer(model, callback, _args(tmp_path, callback.epochs), Bumper(model)).train()
    # the guard runs as the stage ends: after its 2 epochs, before stage last2 starts
    assert [r.stage for r in callback.history] == ["head", "head"]


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        self.x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
        self.labels = (self.x[:, 0].mean(dim=(1, 2)) > 0).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.labels[i]}


class HFTinyCNN(TinyCNN):
    """TinyCNN (BatchNorm in every block) answering as a transformers model does."""

    def forward(self, pixel_values, labels=None):
        logits = super().forward(pixel_values)
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def test_frozen_batchnorm_stays_in_eval_under_the_trainer(tmp_path):
    torch.manual_seed(0)
    model = HFTinyCNN(num_classes=2)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    modes: dict[str, list[bool]] = {"blocks.0.1": [], "blocks.2.1": []}
    for path, seen in modes.items():
        model.get_submodule(path).register_forward_hook(
            lambda m, i, o, seen=seen: seen.append(m.training) if model.training else None
        )
    probe = Probe(model)
    callback = FrostlineCallback(
        [
            StageConfig(name="head", freeze="head", epochs=1, lr=1e-2),
            StageConfig(name="last1", freeze="last:1", epochs=1, lr=1e-3),
        ]
    )
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, 2),
        train_dataset=Images(32, seed=1),
        eval_dataset=Images(16, seed=2),
        compute_metrics=compute_accuracy,
        callbacks=[callback, probe],
        optimizers=callback.optimizers(),
    )
    trainer.train()

    # read at the last epoch's end (the best epoch's weights are restored after it)
    after = probe.epochs[-1]["buffers"]
    # blocks 0 and 1 never train: their BatchNorm statistics are bit-identical; block 2's BatchNorm trains in stage 2
    for name in ("blocks.0.1.running_mean", "blocks.1.1.running_var", "blocks.1.1.num_batches_tracked"):
        assert torch.equal(after[name], buffers[name]), name
    assert not torch.equal(after["blocks.2.1.running_mean"], buffers["blocks.2.1.running_mean"])
    # in the Trainer's training forwards: frozen BatchNorm in eval, block 2's in train mode once it trains
    assert modes == {"blocks.0.1": [False] * 4, "blocks.2.1": [False, False, True, True]}
    assert callback.stage_plans["head"]["held_in_eval"][:3] == ["stem", "blocks.0", "blocks.1"]


def test_a_config_file_gives_its_stages_patience_and_min_delta(tmp_path):
    path = tmp_path / "fit.yaml"
    path.write_text(
        "stages:\n"
        "  - {name: head, freeze: head, epochs: 2, lr: 1.0e-2}\n"
        "  - {name: last2, freeze: 'last:2', epochs: 3, lr: 1.0e-4}\n"
        "run: {patience: 4, min_delta: 0.01}\n"
    )
    callback = FrostlineCallback(path)
    assert [(s.name, s.freeze, s.epochs) for s in callback.recipe.stages] == [
        ("head", "head", 2),
        ("last2", "last:2", 3),
    ]
    assert (callback.recipe.monitor.patience, callback.recipe.monitor.min_delta, callback.epochs) == (4, 0.01, 5)


def test_the_callbacks_compute_metrics_gives_the_monitor_each_validation_example(tmp_path):
    model, _ = tiny_bert()
    callback = FrostlineCallback(STAGES)
    trainer = _trainer(model, callback, _args(tmp_path, callback.epochs))
    trainer.compute_metrics = callback.compute_metrics
    trainer.train()

    for record in callback.history:
        assert record.val_count == len(record.examples) == 32
        assert record.examples.correct.double().mean().item() == pytest.approx(record.val_accuracy)
        assert record.examples.losses.double().mean().item() == pytest.approx(record.val_loss, rel=1e-4)


def test_compute_accuracy_gives_the_monitor_the_size_and_spread_of_the_validation_set(tmp_path):
    model, _ = tiny_bert()
    callback = FrostlineCallback(STAGES)
    _trainer(model, callback, _args(tmp_path, callback.epochs)).train()

    for record in callback.history:
        assert record.examples is None
        assert record.val_count == 32 and record.val_loss_sd > 0
