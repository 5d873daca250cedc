"""LoRA through peft: the right modules adapted, adapters and head trained, every base weight bit-identical,
the cache covering the frozen prefix, and a merged model that gives the adapted model's logits."""

import pytest
import torch
from torch import nn

import tiny_task
from conftest import TinyCNN, tiny_bert, tiny_vit
from frostline.adapters import adapt_and_map, adapted_modules, add_lora, is_adapter, merge_lora, recipe_lora
from frostline.config import DataConfig, FitConfig, RunConfig, StageConfig
from frostline.dataset import PreparedData
from frostline.errors import ConfigError, FreezeSpecError
from frostline.freeze import FreezeSpec, freeze, plan_freeze
from frostline.inspect import inspect_model
from frostline.optim import param_groups
from frostline.sources import ModelSource
from frostline.train.cache import plan_cache
from frostline.train.trainer import Trainer

pytest.importorskip("peft", reason="the lora extra (peft) is not installed")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("lora", FreezeSpec(mode="lora", r=8, alpha=16.0, dropout=0.05)),
        ("lora:r=4", FreezeSpec(mode="lora", r=4, alpha=8.0, dropout=0.05)),
        (
            "lora:r=8,alpha=32,dropout=0,targets=query,value;bn=fixed",
            FreezeSpec(mode="lora", r=8, alpha=32.0, dropout=0.0, globs=("query", "value"), bn="fixed"),
        ),
        ({"mode": "lora", "targets": ["query"]}, FreezeSpec(mode="lora", globs=("query",))),
    ],
)
def test_lora_specs_read_and_print_back(text, expected):
    spec = FreezeSpec.parse(text)
    assert spec == expected
    assert FreezeSpec.parse(str(spec)) == spec


@pytest.mark.parametrize(
    "text, message",
    [
        ("lora:r=0", "r is the adapters' rank, a whole number from 1"),
        ("lora:r=1.5", "r is a whole number"),
        ("lora:rank=4", "lora option 'rank=4' in 'lora:rank=4' is unknown"),
        ("lora:alpha=-2", "alpha must be a number > 0"),
        ("lora:dropout=1", "dropout must be a number in [0, 1)"),
        ("lora:targets=", "targets= names no module"),
        ("lora:r=2,r=4", "given twice"),
        ("head lora", "two selections (head and lora)"),
    ],
)
def test_bad_lora_specs_say_what_is_wrong(text, message):
    with pytest.raises(FreezeSpecError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        FreezeSpec.parse(text)


def test_r_alpha_and_dropout_belong_to_lora_only():
    with pytest.raises(FreezeSpecError, match="options of lora"):
        FreezeSpec(mode="head", r=4)


class _TimmLikeVit(nn.Module):
    """Blocks with a fused qkv projection, as timm's ViT names it (no transformers config)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.blocks = nn.Sequential(*[_QkvBlock() for _ in range(3)])
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)).mean(1))


class _QkvBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)
        self.mlp = nn.Linear(16, 16)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attention = (q @ k.transpose(1, 2) / 4).softmax(-1)
        return x + self.mlp(self.proj(attention @ v))


def _timm_like():
    torch.manual_seed(0)
    return _TimmLikeVit(), torch.randn(2, 5, 8)


def _cnn():
    torch.manual_seed(0)
    return TinyCNN(), torch.randn(2, 3, 16, 16)


@pytest.mark.parametrize(
    "factory, targets, chosen_by",
    [
        (
            tiny_bert,
            [f"bert.encoder.layer.{i}.attention.self.{n}" for i in range(4) for n in ("query", "value")],
            "peft's targets for bert",
        ),
        # transformers 5 names ViT's projections q_proj/v_proj, which peft's mapping for vit (query, value) misses
        (
            tiny_vit,
            [f"vit.layers.{i}.attention.{n}" for i in range(4) for n in ("q_proj", "v_proj")],
            "the attention projections in 4 blocks",
        ),
        (_timm_like, [f"blocks.{i}.qkv" for i in range(3)], "the attention projections in 3 blocks"),
        (_cnn, [f"blocks.{i}.0" for i in range(3)], "every ungrouped Conv2d in 3 blocks"),
    ],
)
def test_default_targets_are_each_architectures_attention_projections(factory, targets, chosen_by):
    model, batch = factory()
    adapters = add_lora(model, "lora", example_batch=batch)
    assert list(adapters.modules) == targets
    assert chosen_by in adapters.chosen_by
    assert sorted(adapted_modules(model)) == sorted(targets)
    # the head is never adapted: it trains in full and is saved with the adapters
    head = inspect_model(model, batch).head
    assert not any(p.startswith(head) for p in adapted_modules(model))
    assert adapters.tensors == 2 * len(targets)


def test_adding_adapters_changes_no_flag_of_an_existing_weight():
    model, batch = tiny_bert()
    freeze(model, "last:1", inspect_model(model, batch))
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    add_lora(model, "lora:r=2", example_batch=batch)
    after = {n.replace(".base_layer", ""): p.requires_grad for n, p in model.named_parameters() if not is_adapter(n)}
    assert after == before


def test_targets_by_name_path_end_or_block():
    model, batch = tiny_bert()
    adapters = add_lora(model, "lora:r=2,targets=layer.3.*,key", example_batch=batch)
    assert "bert.encoder.layer.0.attention.self.key" in adapters.modules
    assert "bert.encoder.layer.3.intermediate.dense" in adapters.modules
    assert not any(".layer.2.attention.self.query" in m for m in adapters.modules)


def test_targets_that_name_nothing_or_the_head_are_refused_with_the_names():
    model, batch = tiny_bert()
    with pytest.raises(FreezeSpecError, match=r"targets=qurey names no layer peft can adapt.*closest: query"):
        add_lora(model, "lora:targets=qurey", example_batch=batch)
    with pytest.raises(FreezeSpecError, match="targets name the head"):
        add_lora(model, "lora:targets=classifier", example_batch=batch)
    assert not adapted_modules(model)  # nothing was added by a refused spec
    only_head = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(FreezeSpecError, match="no layer peft can adapt"):
        add_lora(only_head, "lora", example_batch=torch.zeros(2, 4))


def test_freeze_lora_needs_the_adapters_the_spec_describes():
    model, batch = tiny_bert()
    model_map = inspect_model(model, batch)
    with pytest.raises(FreezeSpecError, match=r"carries none; add them first with frostline.add_lora"):
        plan_freeze(model, "lora", model_map)
    model_map, _ = adapt_and_map(model, batch, spec="lora:r=4")
    with pytest.raises(FreezeSpecError, match="carries adapters with r=4.*asks r=8"):
        plan_freeze(model, "lora:r=8", model_map)
    with pytest.raises(ConfigError, match="model carries LoRA adapters already"):
        add_lora(model, "lora:r=4", model_map)


def test_a_recipe_carries_one_set_of_adapters():
    stages = [StageConfig(name="a", freeze="lora:r=4"), StageConfig(name="b", freeze="lora:r=8")]
    with pytest.raises(ConfigError, match="stages 'a' and 'b' ask for different LoRA adapters"):
        recipe_lora(stages)
    same = [StageConfig(name="a", freeze="lora:r=4"), StageConfig(name="b", freeze="lora:r=4;bn=fixed")]
    assert recipe_lora(same) == FreezeSpec(mode="lora", r=4)
    assert recipe_lora([StageConfig(freeze="head")]) is None


def test_the_plan_counts_adapters_and_groups_give_them_their_blocks_rates():
    model, batch = tiny_bert()
    model_map, adapters = adapt_and_map(model, batch, spec="lora:r=2")
    plan = freeze(model, "lora:r=2", model_map)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if is_adapter(n) or n.startswith("classifier.")}
    assert plan.adapter_tensors == adapters.tensors == 16
    assert plan.adapter_params == adapters.params == 4 * 2 * (2 * 32 + 32 * 2)
    assert plan.trainable_tensors == 16 + 2
    assert "of them LoRA adapters: 16 tensors, 1,024 parameters" in plan.summary()
    groups = param_groups(model, plan, 1e-3, head_lr_mult=10, layer_decay=0.5)
    rates = {g["name"]: g["lr"] for g in groups}
    assert rates["classifier"] == pytest.approx(1e-2)
    # adapters learn at their block's rate: the last block lr * 0.5, the one below it lr * 0.25
    assert rates["bert.encoder.layer.3"] == pytest.approx(5e-4)
    assert rates["bert.encoder.layer.2"] == pytest.approx(2.5e-4)


def test_merged_layers_give_the_adapted_models_logits_without_peft_names():
    model, batch = tiny_bert()
    plain_names = [n for n, _ in model.named_parameters()]
    add_lora(model, "lora:r=4", example_batch=batch)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # trained adapters: B is no longer zero
    model.eval()
    with torch.no_grad():
        adapted = model(**batch).logits
    assert merge_lora(model) == 8
    with torch.no_grad():
        merged = model(**batch).logits
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    assert [n for n, _ in model.named_parameters()] == plain_names
    assert not adapted_modules(model)


STAGES = [
    StageConfig(name="head", freeze="head", epochs=1, lr=1e-2),
    StageConfig(name="lora", freeze="lora:r=4,dropout=0,targets=5", epochs=2, lr=1e-2, head_lr_mult=1),
]


def _sequential():
    torch.manual_seed(0)
    layers = [nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 64)]
    return nn.Sequential(*layers, nn.ReLU(), nn.Linear(64, 10))


def _fit(cache, stages=STAGES):
    made = tiny_task.data()
    (tx, ty), (vx, vy) = made["train"], made["val"]
    data = PreparedData(tx, ty, vx, vy, made["label_names"], origin="digits")
    config = FitConfig(
        data=DataConfig(batch_size=32), stages=stages, run=RunConfig(cache=cache, patience=5, precision="fp32")
    )
    source = ModelSource("py:test", _sequential(), torch.zeros(2, 64), pretrained=True)
    trainer = Trainer(config, source=source, data=data)
    return trainer, trainer.fit(write=False)


def test_a_lora_stage_trains_adapters_and_head_and_never_moves_a_base_weight():
    original = {n: p.detach().clone() for n, p in _sequential().named_parameters()}
    trainer, result = _fit("auto")
    model = trainer.model
    assert trainer.adapters.modules == ("5",)
    params = dict(model.named_parameters())
    for name, before in original.items():
        now = params.get(name, params.get(name.replace("5.", "5.base_layer.")))
        if name.startswith("7."):
            assert not torch.equal(now, before), name  # the head trained in both stages
        else:
            assert torch.equal(now, before), name  # every base weight bit-identical, the adapted one too
    assert params["5.lora_B.default.weight"].abs().sum() > 0  # B starts at zero: it moved
    lora = result.history[-1]
    assert lora.trainable_tensors == 2 + 2 and lora.trainable_params == 4 * 64 * 2 + 64 * 10 + 10
    assert result.history[-1].val_accuracy > result.history[0].val_accuracy - 0.05


def test_the_cache_covers_the_frozen_prefix_before_the_first_adapted_module():
    on, result_on = _fit("auto")
    off, result_off = _fit("off")
    assert [r.cache for r in result_on.history] == ["inputs of the head 7", "inputs of 5", "inputs of 5"]
    for a, b in zip(result_on.history, result_off.history, strict=True):
        assert a.val_loss == pytest.approx(b.val_loss, rel=1e-5)
    for (name, p), q in zip(on.model.named_parameters(), off.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_adapters_in_the_first_block_leave_only_the_stem_to_cache():
    model, batch = tiny_bert()
    model_map, _ = adapt_and_map(model, batch, spec="lora:r=2")
    plan = plan_freeze(model, "lora:r=2", model_map)
    tail = plan_cache("auto", model, model_map, plan, augment=False)
    assert tail.boundary == "bert.encoder.layer.0"


class _Interrupt(Exception):
    pass


class _StopsInLora:
    """A reporter that interrupts the run in the lora stage's second epoch (a crash, as far as the run knows)."""

    def __init__(self):
        self.stage = None
        self.epoch = 0

    def epoch_start(self, stage, epoch, batches):
        self.stage, self.epoch = stage.name, epoch

    def step(self, done, total, loss):
        if self.stage == "lora" and self.epoch == 3 and done == 2:
            raise _Interrupt

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _writing(folder, stages, reporter=None):
    """A trainer of `stages` on the digits task that writes its run folder to folder/run."""
    made = tiny_task.data()
    (tx, ty), (vx, vy) = made["train"], made["val"]
    config = FitConfig(
        data=DataConfig(batch_size=32),
        stages=stages,
        run=RunConfig(patience=5, precision="fp32", output=str(folder / "run"), tensorboard=False),
    )
    data = PreparedData(tx, ty, vx, vy, made["label_names"], origin="digits")
    return Trainer(config, reporter, ModelSource("py:test", _sequential(), torch.zeros(2, 64), True), data)


def test_a_lora_run_resumes_with_its_adapters_and_ends_where_an_uninterrupted_one_does(tmp_path):
    uninterrupted, _ = _fit("auto")
    with pytest.raises(_Interrupt):
        _writing(tmp_path, STAGES, _StopsInLora()).fit(overwrite=True)
    resumed = _writing(tmp_path, STAGES)
    resumed.fit(resume=tmp_path / "run")
    assert resumed.adapters.modules == ("5",)
    for (name, p), q in zip(resumed.model.named_parameters(), uninterrupted.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)


def test_a_target_that_names_a_parent_module_plans_as_it_was_added():
    model, batch = tiny_bert()
    model_map, adapters = adapt_and_map(model, batch, spec="lora:r=2,targets=attention")
    assert "bert.encoder.layer.0.attention.output.dense" in adapters.modules
    plan = plan_freeze(model, "lora:r=2,targets=attention", model_map)
    assert plan.adapter_tensors == adapters.tensors


def test_resuming_with_other_adapters_is_refused_before_anything_loads(tmp_path):
    # killed in the lora stage, then resumed with other adapters for a stage not begun yet (safe for any other spec)
    three = [*STAGES, StageConfig(name="more", freeze="lora:r=4,dropout=0,targets=5", epochs=1, lr=1e-3)]
    with pytest.raises(_Interrupt):
        _writing(tmp_path, three, _StopsInLora()).fit(overwrite=True)
    other = [*STAGES, StageConfig(name="more", freeze="lora:r=2,dropout=0,targets=5", epochs=1, lr=1e-3)]
    with pytest.raises(ConfigError, match="stages 'lora' and 'more' ask for different LoRA adapters"):
        _writing(tmp_path, other).fit(resume=tmp_path / "run")
    # a run without adapters, resumed with a lora stage added after it
    plain = [STAGES[0], StageConfig(name="lora", freeze="head", epochs=3)]
    with pytest.raises(_Interrupt):
        _writing(tmp_path, plain, _StopsInLora()).fit(overwrite=True)
    with pytest.raises(ConfigError, match="the run's model carries no LoRA adapters, and this config's stages make"):
        _writing(tmp_path, [*plain, STAGES[1]]).fit(resume=tmp_path / "run")
