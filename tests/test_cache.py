"""The feature cache gives the same numbers as recomputing the frozen part, and is never stale."""

import pytest
import torch
from torch import nn

import tiny_task
from frostline.config import DataConfig, FitConfig, RunConfig, StageConfig
from frostline.dataset import PreparedData
from frostline.freeze import freeze
from frostline.inspect import inspect_model
from frostline.sources import ModelSource
from frostline.train.cache import fingerprint, plan_cache
from frostline.train.tails import Tail
from frostline.train.trainer import Trainer

STAGES = [
    StageConfig(name="head", freeze="head", epochs=2, lr=1e-2),
    StageConfig(name="last2", freeze="last:2", epochs=2, lr=1e-3, head_lr_mult=3, layer_decay=0.5),
]


def _sequential():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def _digits():
    made = tiny_task.data()
    (tx, ty), (vx, vy) = made["train"], made["val"]
    return PreparedData(tx, ty, vx, vy, made["label_names"], origin="digits")


def _fit(cache, model_factory=_sequential, stages=STAGES, data=None, **run):
    config = FitConfig(
        data=DataConfig(batch_size=32), stages=stages, run=RunConfig(cache=cache, patience=5, precision="fp32", **run)
    )
    source = ModelSource("py:test", model_factory(), torch.zeros(2, 64), pretrained=True)
    trainer = Trainer(config, source=source, data=data or _digits())
    return trainer, trainer.fit(write=False)


def test_sequential_head_and_last2_stages_match_with_the_cache_on_and_off():
    on, result_on = _fit("auto")
    off, result_off = _fit("off")

    assert [r.cache for r in result_on.history] == ["inputs of the head 7"] * 2 + ["inputs of 2"] * 2
    # one pass over the frozen part: the head's pass kept stage 2's inputs, so stage 2 spent nothing on its own
    assert result_on.history[0].cache_seconds > 0 and result_on.history[2].cache_seconds == 0
    assert all(r.cache is None for r in result_off.history)
    # same seed, same batch order, same arithmetic on the trainable part: only float rounding may differ,
    # since the cached features were computed in batches of 64 instead of 32
    for a, b in zip(result_on.history, result_off.history, strict=True):
        assert a.val_accuracy == b.val_accuracy
        assert a.val_loss == pytest.approx(b.val_loss, rel=1e-5)
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5)
    for (name, p), q in zip(on.model.named_parameters(), off.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


class _Notes:
    def __init__(self):
        self.lines = []

    def note(self, message):
        self.lines.append(message)

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _fit_noting(stages):
    notes = _Notes()
    config = FitConfig(data=DataConfig(batch_size=32), stages=stages, run=RunConfig(patience=5, precision="fp32"))
    source = ModelSource("py:test", _sequential(), torch.zeros(2, 64), pretrained=True)
    result = Trainer(config, notes, source=source, data=_digits()).fit(write=False)
    return result, [line for line in notes.lines if line.startswith("feature cache")]


def test_the_head_pass_keeps_the_next_stages_inputs_and_says_so():
    result, notes = _fit_noting(STAGES)
    assert notes[0].startswith("feature cache: on: inputs of the head 7, (")
    assert notes[1].startswith("feature cache: the same pass kept inputs of 2 for stage 'last2', (")
    assert notes[2].startswith("feature cache: on: inputs of 2, (")
    assert "in memory (kept by the pass for inputs of the head 7)" in notes[2] and "made in" not in notes[2]


def test_a_later_stage_whose_frozen_weights_move_before_it_makes_its_own_pass():
    # stage 1 trains blocks that stage 2 freezes again: stage 2's frozen part is not the one stage 1 saw
    stages = [
        StageConfig(name="last2", freeze="last:2", epochs=1, lr=1e-3),
        StageConfig(name="head", freeze="head", epochs=1, lr=1e-2),
    ]
    result, notes = _fit_noting(stages)
    assert not any("the same pass kept" in line for line in notes)
    assert [r.cache for r in result.history] == ["inputs of 2", "inputs of the head 7"]
    assert all(r.cache_seconds > 0 for r in result.history)


def test_a_block_pass_keeps_the_inputs_of_a_later_stage_that_starts_earlier():
    # stage 1 (last:1) stops its pass at block 5; stage 2 (last:2) starts earlier, at block 2, on the way there
    stages = [
        StageConfig(name="last1", freeze="last:1", epochs=1, lr=1e-3),
        StageConfig(name="last2", freeze="last:2", epochs=1, lr=1e-3),
    ]
    result, notes = _fit_noting(stages)
    assert notes[1].startswith("feature cache: the same pass kept inputs of 2 for stage 'last2'")
    assert result.history[1].cache_seconds == 0


def test_bf16_storage_does_not_cost_accuracy():
    _, fp32 = _fit("auto")
    _, bf16 = _fit("auto", cache_dtype="bf16")
    assert abs(fp32.best_val_accuracy - bf16.best_val_accuracy) <= 0.01


def test_minilm_head_and_last2_match_with_the_cache_on_and_off():
    config = dict(
        data=DataConfig(limit=48, max_length=24, batch_size=8),
        stages=[StageConfig(name="head", freeze="head", epochs=1, lr=1e-2), STAGES[1]],
    )
    results = {}
    for cache in ("auto", "off"):
        results[cache] = Trainer(FitConfig(**config, run=RunConfig(cache=cache, patience=5, precision="fp32"))).fit(
            write=False
        )
    on, off = results["auto"].history, results["off"].history
    assert on[0].cache == "inputs of the head classifier"
    assert on[1].cache.startswith("inputs of encoder.encoder.layer.4")
    for a, b in zip(on, off, strict=True):
        assert a.val_accuracy == b.val_accuracy
        assert a.val_loss == pytest.approx(b.val_loss, rel=1e-4)
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-4)


def _planned(model, spec, augment=False, mode="auto"):
    model_map = inspect_model(model, torch.zeros(2, 64))
    plan = freeze(model, spec, model_map)
    return plan_cache(mode, model, model_map, plan, augment)


@pytest.mark.parametrize(
    ("spec", "augment", "mode", "reason"),
    [
        ("head", False, "off", "off (run.cache=off)"),
        ("head", True, "auto", "off: the data has random augmentation"),
        ("none", False, "auto", "off: nothing before the first trainable entry is frozen"),
        ("last:1;bn=train", False, "auto", "off: BatchNorm in the frozen part updates its statistics (bn=train)"),
    ],
)
def test_the_cache_says_why_it_is_off(spec, augment, mode, reason):
    assert _planned(_sequential(), spec, augment, mode).startswith(reason)


def test_unsupported_families_fall_back_with_the_reason():
    model, _ = tiny_task.model(10)
    reason = _planned(model, "last:1")
    assert reason.startswith("no way to run DigitsNet from block features.3 is known (BERT-like encoders")
    assert isinstance(_planned(model, "head"), Tail)


def test_a_model_that_changes_its_head_output_is_not_cached():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 32))
            self.classifier = nn.Linear(32, 10)

        def forward(self, x):
            return self.classifier(self.body(x)) * 2

    trainer, result = _fit("auto", model_factory=Scaled, stages=[StageConfig(freeze="head", epochs=1)])
    assert result.history[0].cache is None


def test_the_fingerprint_changes_with_frozen_weights_data_and_boundary():
    model = _sequential()
    freeze(model, "head", example_batch=torch.zeros(2, 64))
    data = [torch.randn(8, 64, generator=torch.Generator().manual_seed(0))]
    key = fingerprint(model, "7", data, torch.float32)

    assert fingerprint(model, "7", data, torch.float32) == key
    assert fingerprint(model, "5", data, torch.float32) != key
    assert fingerprint(model, "7", data, torch.bfloat16) != key
    changed = [data[0].clone()]
    changed[0][3, 5] += 1e-6
    assert fingerprint(model, "7", changed, torch.float32) != key
    with torch.no_grad():
        model[0].weight[0, 0] = torch.nextafter(model[0].weight[0, 0], torch.tensor(1.0))
    assert fingerprint(model, "7", data, torch.float32) != key
    with torch.no_grad():
        model[7].weight.add_(1.0)  # the trainable head does not change what is cached
    model_key = fingerprint(model, "7", data, torch.float32)
    with torch.no_grad():
        model[7].weight.add_(1.0)
    assert fingerprint(model, "7", data, torch.float32) == model_key


def test_a_cache_over_the_memory_budget_is_memory_mapped_from_the_run_folder(tmp_path):
    config = FitConfig(
        data=DataConfig(batch_size=32),
        stages=[StageConfig(freeze="head", epochs=1)],
        run=RunConfig(output=str(tmp_path / "run"), cache_memory_mb=0.01, precision="fp32"),
    )
    source = ModelSource("py:test", _sequential(), torch.zeros(2, 64), pretrained=True)
    result = Trainer(config, source=source, data=_digits()).fit()
    files = list((tmp_path / "run" / "cache").glob("*.pt"))
    assert len(files) == 2
    assert result.history[0].cache == "inputs of the head 7"


@pytest.mark.parametrize(
    "ref", ["efficientnet-lite0", "torchvision:resnet18", "timm:resnet18", "timm:vit_tiny_patch16_224"]
)
def test_vision_tails_reproduce_the_model_output(ref):
    from frostline.sources import open_model

    torch.manual_seed(0)
    source = open_model(ref, num_classes=4)
    model, batch = source.model, source.example_batch
    model_map = inspect_model(model, batch)
    plan = freeze(model, "last:2", model_map)
    tail = plan_cache("auto", model, model_map, plan, augment=False)
    assert isinstance(tail, Tail), tail
    model.eval()
    with torch.no_grad():
        expected = model(batch)
        replayed = tail.forward(tail.capture(batch))
    torch.testing.assert_close(replayed, expected, rtol=1e-4, atol=1e-5)
