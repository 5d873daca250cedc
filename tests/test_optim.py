import pytest
import torch

from frostline import freeze, open_model
from frostline.errors import ConfigError
from frostline.optim import build_schedule, param_groups


@pytest.fixture(scope="module")
def minilm_last2():
    torch.manual_seed(0)
    source = open_model("hf:minilm", num_classes=5)
    plan = freeze(source.model, "last:2", example_batch=source.example_batch)
    return source.model, plan


def _by_name(groups):
    return {g["name"]: g for g in groups}


def test_minilm_last2_layer_decay_groups(minilm_last2):
    model, plan = minilm_last2
    lr = 1e-4
    groups = _by_name(param_groups(model, plan, lr, head_lr_mult=10, layer_decay=0.8, weight_decay=0.05))

    assert groups["classifier"]["lr"] == pytest.approx(lr * 10)
    assert groups["encoder.encoder.layer.5"]["lr"] == pytest.approx(lr * 0.8)
    assert groups["encoder.encoder.layer.4"]["lr"] == pytest.approx(lr * 0.64)
    assert groups["encoder.encoder.layer.4 (no decay)"]["lr"] == pytest.approx(lr * 0.64)
    assert not any("layer.3" in name or "embeddings" in name for name in groups)
    assert groups["encoder.encoder.layer.5"]["weight_decay"] == 0.05
    assert groups["encoder.encoder.layer.5"]["lr_scale"] == pytest.approx(0.8)

    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups.values() if g["weight_decay"] == 0 for p in g["params"]}
    assert all(n.endswith("bias") or "LayerNorm" in n for n in no_decay)
    assert "encoder.encoder.layer.5.attention.output.LayerNorm.weight" in no_decay
    assert "classifier.bias" in no_decay
    decayed = {names[id(p)] for g in groups.values() if g["weight_decay"] > 0 for p in g["params"]}
    assert all(n.endswith("weight") and "LayerNorm" not in n for n in decayed)


def test_groups_cover_the_trainable_set_exactly_once(minilm_last2):
    model, plan = minilm_last2
    groups = param_groups(model, plan, 1e-4, layer_decay=0.8)

    in_groups = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(in_groups) == len(set(in_groups))
    assert set(in_groups) == trainable
    assert len(trainable) == 34


def test_building_groups_never_changes_requires_grad(minilm_last2):
    model, plan = minilm_last2
    before = {n: p.requires_grad for n, p in model.named_parameters()}

    param_groups(model, plan, 1e-4, layer_decay=0.5, no_decay_embeddings=True)

    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_head_lr_overrides_the_multiplier(tiny_cnn):
    model, x = tiny_cnn
    plan = freeze(model, "none", example_batch=x)
    groups = _by_name(param_groups(model, plan, 1e-3, head_lr=5e-3, layer_decay=0.5))

    assert groups["head"]["lr"] == pytest.approx(5e-3)
    assert groups["blocks.2"]["lr"] == pytest.approx(5e-4)
    assert groups["blocks.0"]["lr"] == pytest.approx(1.25e-4)
    # the stem sits one step below the first block
    assert groups["stem"]["lr"] == pytest.approx(6.25e-5)
    # BatchNorm weights and every bias: no weight decay
    assert groups["blocks.0 (no decay)"]["weight_decay"] == 0
    assert len(groups["blocks.0 (no decay)"]["params"]) == 3


def test_embeddings_can_be_exempt_from_weight_decay():
    from conftest import tiny_vit

    model, batch = tiny_vit()
    plan = freeze(model, "none", example_batch=batch)
    names = {id(p): n for n, p in model.named_parameters()}

    exempt = {
        names[id(p)]
        for g in param_groups(model, plan, 1e-3, no_decay_embeddings=True)
        if g["weight_decay"] == 0
        for p in g["params"]
    }
    assert {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings"} <= exempt


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0}, "lr must be > 0, got 0"),
        ({"lr": -1e-3}, "lr must be > 0"),
        ({"lr": 1e-3, "layer_decay": 0}, r"layer_decay must be in \(0, 1\], got 0"),
        ({"lr": 1e-3, "layer_decay": 1.5}, r"layer_decay must be in \(0, 1\], got 1.5"),
        ({"lr": 1e-3, "head_lr": 0}, "head_lr must be > 0"),
        ({"lr": 1e-3, "weight_decay": -0.1}, "weight_decay must be >= 0"),
    ],
)
def test_bad_rates_are_config_errors(tiny_cnn, kwargs, message):
    model, x = tiny_cnn
    plan = freeze(model, "head", example_batch=x)
    with pytest.raises(ConfigError, match=message):
        param_groups(model, plan, **kwargs)


def test_every_problem_is_reported_at_once(tiny_cnn):
    model, x = tiny_cnn
    plan = freeze(model, "head", example_batch=x)
    with pytest.raises(ConfigError) as caught:
        param_groups(model, plan, lr=0, layer_decay=2)
    assert len(caught.value.problems) == 2


def test_nothing_trainable_is_a_config_error(tiny_cnn):
    model, x = tiny_cnn
    plan = freeze(model, "head", example_batch=x)
    model.head[1].weight.requires_grad_(False)
    model.head[1].bias.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable tensors"):
        param_groups(model, plan, 1e-3)


@pytest.mark.parametrize("name", ["cosine", "onecycle", "constant"])
def test_schedules_keep_the_ratio_between_groups(tiny_cnn, name):
    model, x = tiny_cnn
    plan = freeze(model, "none", example_batch=x)
    optimizer = torch.optim.AdamW(param_groups(model, plan, 1e-3, layer_decay=0.5))
    peak = [g["lr"] for g in optimizer.param_groups]
    schedule = build_schedule(optimizer, name, total_steps=30, warmup_steps=6)

    seen = []
    for _ in range(30):
        rates = [g["lr"] for g in optimizer.param_groups]
        seen.append(rates[0])
        for rate, top in zip(rates, peak, strict=True):
            assert rate / rates[0] == pytest.approx(top / peak[0], rel=1e-9)
        optimizer.step()
        schedule.step()

    assert seen[0] == pytest.approx(peak[0] * 0.01, rel=1e-6)
    assert max(seen) == pytest.approx(peak[0], rel=0.05)
    if name == "constant":
        assert seen[-1] == pytest.approx(peak[0])
    else:
        assert seen[-1] < 0.05 * peak[0]


def test_cosine_without_warmup_starts_at_the_peak(tiny_cnn):
    model, _ = tiny_cnn
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = build_schedule(optimizer, "cosine", total_steps=10)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    for _ in range(5):
        optimizer.step()
        schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_bad_schedule_settings_are_config_errors(tiny_cnn):
    model, _ = tiny_cnn
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="schedule 'linear' is unknown"):
        build_schedule(optimizer, "linear", total_steps=10)
    with pytest.raises(ConfigError, match=r"warmup_steps must be in \[0, total_steps=10\), got 10"):
        build_schedule(optimizer, "cosine", total_steps=10, warmup_steps=10)
