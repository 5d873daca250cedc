import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from frostline.errors import FreezeSpecError
from frostline.freeze import FreezeSpec, freeze, is_held_in_eval, plan_freeze
from frostline.inspect import inspect_model


def _trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def _snapshot(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("head", FreezeSpec("head")),
        ("last:2", FreezeSpec("last", n=2)),
        ("from:blocks.1", FreezeSpec("from", path="blocks.1")),
        ("none", FreezeSpec("none")),
        ("bitfit", FreezeSpec("bitfit")),
        ("train=head.*,stem", FreezeSpec("train", globs=("head.*", "stem"))),
        ("freeze=stem", FreezeSpec("freeze", globs=("stem",))),
        ("last:1;bn=train", FreezeSpec("last", n=1, bn="train")),
        ("last:1 bn=train", FreezeSpec("last", n=1, bn="train")),
        ("last:2;bn=fixed", FreezeSpec("last", n=2, bn="fixed")),
    ],
)
def test_spec_strings_parse(text, expected):
    assert FreezeSpec.parse(text) == expected


@given(
    st.one_of(
        st.just(FreezeSpec("head")),
        st.builds(FreezeSpec, mode=st.just("last"), n=st.integers(0, 50), bn=st.sampled_from(["eval", "train"])),
        st.builds(
            FreezeSpec, mode=st.just("from"), path=st.from_regex(r"[a-z_]{1,8}(\.[0-9a-z_]{1,4}){0,3}", fullmatch=True)
        ),
        st.builds(
            FreezeSpec,
            mode=st.sampled_from(["train", "freeze"]),
            globs=st.lists(st.from_regex(r"[a-z_*.]{1,10}", fullmatch=True), min_size=1, max_size=3).map(tuple),
        ),
    )
)
def test_spec_round_trips_through_its_string(spec):
    assert FreezeSpec.parse(str(spec)) == spec


def test_spec_from_dict():
    assert FreezeSpec.parse({"mode": "train", "globs": "head.*"}) == FreezeSpec("train", globs=("head.*",))
    with pytest.raises(FreezeSpecError, match="unknown freeze spec keys"):
        FreezeSpec.parse({"mode": "head", "layers": 3})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lats:2", "did you mean last:N"),
        ("last:two", "whole number"),
        ("bn=train", "add what trains"),
        ("head;last:2", "two selections"),
        ("", "empty freeze spec"),
        ("train=", "at least one pattern"),
        ("last:1;bn=frozen", "bn=frozen is not a BatchNorm policy"),
        ("last:1;bn=train;bn=fixed", "sets bn twice"),
        ("last:\u00b2", "whole number"),
        ("last:" + "9" * 5000, "5,000-digit N is no block count"),
    ],
)
def test_malformed_specs_are_named(text, message):
    with pytest.raises(FreezeSpecError, match=message):
        FreezeSpec.parse(text)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"mode": "head", "n": 2}, "n is the N of last:N; mode 'head' takes none"),
        ({"mode": "from", "path": "blocks 1"}, "needs a path without spaces"),
        ({"mode": "from", "path": 3}, "needs the path of a block"),
        ({"mode": "train", "globs": ["head.*,stem"]}, "patterns without spaces, ';' or ','"),
        ({"mode": "train", "globs": 5}, "needs at least one pattern"),
        ({"mode": "last", "n": 1, "globs": ["stem"]}, "mode 'last' takes none"),
        ({1: "head", "layers": 2}, r"unknown freeze spec keys \[1, 'layers'\]"),
    ],
)
def test_malformed_spec_dicts_are_named(values, message):
    # a dict spec that parsed would print as a string that reads back differently, or not at all
    with pytest.raises(FreezeSpecError, match=message):
        FreezeSpec.parse(values)


def test_head_trains_only_the_head(tiny_cnn):
    model, x = tiny_cnn
    plan = freeze(model, "head", example_batch=x)

    assert _trainable(model) == ["head.1.bias", "head.1.weight"]
    assert plan.trainable_tensors == 2


def test_last_n_trains_the_last_blocks_and_what_follows(tiny_cnn):
    model, x = tiny_cnn
    freeze(model, "last:2", example_batch=x)

    assert {n.split(".")[0] + "." + n.split(".")[1] for n in _trainable(model)} == {"blocks.1", "blocks.2", "head.1"}


def test_from_path_and_from_container(tiny_cnn):
    model, x = tiny_cnn
    model_map = inspect_model(model, x)

    assert plan_freeze(model, "from:blocks.2", model_map).trainable == plan_freeze(model, "last:1", model_map).trainable
    assert plan_freeze(model, "from:blocks", model_map).trainable == plan_freeze(model, "last:3", model_map).trainable


def test_none_bitfit_and_globs(tiny_cnn):
    model, x = tiny_cnn
    model_map = inspect_model(model, x)

    assert plan_freeze(model, "none", model_map).trainable_tensors == 16
    bitfit = plan_freeze(model, "bitfit", model_map).trainable
    assert bitfit == {n for n, _ in model.named_parameters() if n.endswith("bias")} | {"head.1.weight"}
    assert plan_freeze(model, "train=stem", model_map).trainable == {"stem.weight", "stem.bias"}
    assert plan_freeze(model, "train=blocks.*.1.weight", model_map).trainable == {
        f"blocks.{i}.1.weight" for i in range(3)
    }
    assert plan_freeze(model, "freeze=stem,blocks.0", model_map).trainable_tensors == 16 - 2 - 4


def test_plan_counts_per_entry_before_and_after(tiny_cnn):
    model, x = tiny_cnn
    plan = freeze(model, "last:1", example_batch=x)

    rows = {e.path: (e.trainable_tensors_before, e.trainable_tensors_after) for e in plan.entries}
    assert rows == {"stem": (2, 0), "blocks.0": (4, 0), "blocks.1": (4, 0), "blocks.2": (4, 4), "head": (2, 2)}
    assert plan.trainable_params == 600 + 27


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("last:4", r"last:4 asks for 4 blocks, but the model has 3 \(blocks.0, blocks.1, blocks.2\); use last:3"),
        ("from:blocks.7", "names no entry of the model map; did you mean blocks.2 or blocks.1 or blocks.0"),
        ("from:stemm", "did you mean stem"),
        ("train=haed.*", "pattern 'haed.*' matches no parameter or block; closest names: head"),
        ("freeze=blocks.9.*,stem", "pattern 'blocks.9.*' matches no parameter"),
    ],
)
def test_invalid_spec_lists_close_names_and_changes_nothing(tiny_cnn, spec, message):
    model, x = tiny_cnn
    freeze(model, "head", example_batch=x)
    before = _snapshot(model)

    with pytest.raises(FreezeSpecError, match=message):
        freeze(model, spec, example_batch=x)

    assert _snapshot(model) == before


def test_bitfit_without_biases_is_an_error():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3, bias=False), torch.nn.Linear(3, 2, bias=False))
    with pytest.raises(FreezeSpecError, match="no parameter named"):
        freeze(model, "bitfit", example_batch=torch.randn(2, 3))


def test_bn_eval_keeps_frozen_batchnorm_in_eval_after_model_train(tiny_cnn):
    model, x = tiny_cnn
    plan = freeze(model, "last:1", example_batch=x)
    stats = {n: b.clone() for n, b in model.named_buffers()}

    model.train()
    model(x)

    assert plan.held_in_eval == ("stem", "blocks.0", "blocks.1")
    assert is_held_in_eval(model.blocks[0])
    assert not model.blocks[0][1].training
    assert torch.equal(model.blocks[0][1].running_mean, stats["blocks.0.1.running_mean"])
    # the trainable block's BatchNorm still learns its statistics
    assert model.blocks[2][1].training
    assert not torch.equal(model.blocks[2][1].running_mean, stats["blocks.2.1.running_mean"])


def test_bn_train_lets_frozen_batchnorm_update(tiny_cnn):
    model, x = tiny_cnn
    freeze(model, "last:1", example_batch=x)
    plan = freeze(model, "last:1;bn=train", example_batch=x)
    before = model.blocks[0][1].running_mean.clone()

    model.train()
    model(x)

    assert plan.held_in_eval == ("stem", "blocks.0", "blocks.1")
    assert model.blocks[0][1].training
    assert not torch.equal(model.blocks[0][1].running_mean, before)


def test_bn_fixed_keeps_trainable_batchnorm_on_its_running_statistics_while_its_affine_trains(tiny_cnn):
    model, x = tiny_cnn
    plan = freeze(model, "last:1;bn=fixed", example_batch=x)
    norm = model.blocks[2][1]
    before = norm.running_mean.clone()

    model.train()
    model(x).sum().backward()

    assert plan.held_in_eval == ("stem", "blocks.0", "blocks.1", "blocks.2.1")
    assert not norm.training and norm.weight.requires_grad and norm.weight.grad is not None
    assert torch.equal(norm.running_mean, before)
    assert model.blocks[2][0].training  # the block's other modules still train


def test_refreezing_with_more_blocks_releases_batchnorm(tiny_cnn):
    model, x = tiny_cnn
    freeze(model, "head", example_batch=x)
    freeze(model, "none", example_batch=x)

    model.train()
    assert all(m.training for m in model.modules())
    assert not any(is_held_in_eval(m) for m in model.modules())


def test_frozen_entries_run_without_dropout_after_model_train():
    from conftest import tiny_bert

    model, batch = tiny_bert()
    plan = freeze(model, "last:1", example_batch=batch)
    model.train()
    model(**batch)

    frozen = [p for p in plan.held_in_eval]
    assert frozen == ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.encoder.layer.2"]
    for path in frozen:
        assert not any(m.training for m in model.get_submodule(path).modules()), path
    assert model.bert.encoder.layer[3].training and model.classifier.training and model.dropout.training


def test_batchnorm_frozen_inside_a_partly_trainable_entry_is_held(tiny_cnn):
    model, x = tiny_cnn
    plan = freeze(model, "train=blocks.2.0,head", example_batch=x)

    assert plan.held_in_eval == ("stem", "blocks.0", "blocks.1", "blocks.2.1")
    model.train()
    model(x)
    assert not model.blocks[2][1].training and model.blocks[2][0].training


class SpareBranch(nn.Module):
    """Four repeated blocks, the last of which forward() never calls (a branch this input does not take)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(4)])
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks[:3]:
            x = block(x)
        return self.head(x)


class ThroughChildren(nn.Module):
    """HRNet in miniature: fuse units are ModuleLists (never called themselves) and downsamplers run
    through .forward(), which fires no hook of their own; dropout runs before every block."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 2)
        self.stem = nn.Linear(4, 8)
        self.drop = nn.Dropout(0.5)
        self.fuse = nn.ModuleList([nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)]) for _ in range(2)])
        self.down = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Tanh()) for _ in range(2)])

    def forward(self, x):
        x = self.drop(self.stem(x))
        for pair, down in zip(self.fuse, self.down, strict=True):
            x = pair[0](x) + pair[1](x)
            x = down.forward(x)
        return self.head(x)


def _trained(plan):
    return {e.path for e in plan.entries if e.trainable_tensors_after}


def test_last_n_counts_only_blocks_that_ran_and_leaves_an_unused_branch_frozen():
    torch.manual_seed(0)
    model, x = SpareBranch(), torch.randn(6, 4)
    model_map = inspect_model(model, x)

    assert [(b.path, b.called) for b in model_map.blocks] == [
        ("blocks.0", True),
        ("blocks.1", True),
        ("blocks.2", True),
        ("blocks.3", False),
    ]
    assert _trained(plan_freeze(model, "last:1", model_map)) == {"blocks.2", "head"}
    assert _trained(plan_freeze(model, "last:0", model_map)) == {"head"}
    assert _trained(plan_freeze(model, "last:3", model_map)) == {
        "blocks.0",
        "blocks.1",
        "blocks.2",
        "head",
    }
    assert _trained(plan_freeze(model, "from:blocks", model_map)) == {
        "blocks.0",
        "blocks.1",
        "blocks.2",
        "head",
    }
    # by name, the unused branch trains or freezes like any other entry
    assert _trained(plan_freeze(model, "train=blocks.3", model_map)) == {"blocks.3"}
    assert "blocks.3" not in _trained(plan_freeze(model, "freeze=blocks.3", model_map))
    assert plan_freeze(model, "none", model_map).trainable == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "last:4",
            r"last:4 asks for 4 blocks, but the model has 3 \(blocks.0, blocks.1, blocks.2\); 1 more never ran "
            r"in the example forward pass \(blocks.3\) and are not counted.*use last:3",
        ),
        ("from:blocks.3", r"from:blocks.3 names blocks.3, which never ran.*train=blocks.3,head"),
    ],
)
def test_specs_that_need_an_unused_branch_in_forward_order_are_named(spec, message):
    torch.manual_seed(0)
    model, x = SpareBranch(), torch.randn(6, 4)
    before = _snapshot(model)

    with pytest.raises(FreezeSpecError, match=message):
        freeze(model, spec, example_batch=x)

    assert _snapshot(model) == before


def test_last_n_when_no_block_ran_is_an_error():
    class Bypass(SpareBranch):
        def forward(self, x):
            return self.head(self.stem(x))

    model = Bypass()
    with pytest.raises(FreezeSpecError, match="none of the model's 4 blocks ran in the example forward pass"):
        freeze(model, "last:0", example_batch=torch.randn(2, 4))


def test_frozen_tensors_stay_put_and_trainable_ones_move_with_an_unused_branch():
    torch.manual_seed(0)
    model, x, y = SpareBranch(), torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 0, 1])
    plan = freeze(model, "last:1", example_batch=x)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)

    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    assert plan.trainable == {"blocks.2.0.weight", "blocks.2.0.bias", "head.weight", "head.bias"}
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) is (name not in plan.trainable), name


def test_units_that_run_only_through_their_children_are_called_and_in_forward_order():
    torch.manual_seed(0)
    model, x = ThroughChildren(), torch.randn(6, 4)
    model_map = inspect_model(model, x)

    assert [(e.path, e.kind, e.called) for e in model_map.entries] == [
        ("stem", "stem", True),
        ("fuse.0", "block", True),
        ("down.0", "block", True),
        ("fuse.1", "block", True),
        ("down.1", "block", True),
        ("head", "head", True),
    ]
    assert _trained(plan_freeze(model, "last:2", model_map)) == {"fuse.1", "down.1", "head"}
    # dropout before the first trainable block is held in eval, though that block fires no hook of its own
    plan = freeze(model, "last:1", model_map)
    assert plan.held_in_eval == ("stem", "fuse.0", "down.0", "fuse.1", "drop")
    stats = model.down[0][1].running_mean.clone()

    model.train()
    model(x)

    # held entries that never run themselves stay in eval: the frozen BatchNorm keeps its statistics
    assert not any(m.training for path in plan.held_in_eval for m in model.get_submodule(path).modules())
    assert torch.equal(model.down[0][1].running_mean, stats)
    assert model.down[1].training and model.down[1][1].training


@pytest.mark.slow
def test_hrnet_last2_trains_its_last_blocks_and_head_and_frozen_tensors_stay_put():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("hrnet_w18_small", pretrained=False, num_classes=5)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 3])
    model_map = inspect_model(model, x)

    assert all(e.called for e in model_map.entries)
    assert [b.path for b in model_map.blocks[-4:]] == [
        "incre_modules.2",
        "downsamp_modules.1",
        "incre_modules.3",
        "downsamp_modules.2",
    ]
    plan = freeze(model, "last:2", model_map)
    expected = {
        n
        for path in ("incre_modules.3", "downsamp_modules.2", "final_layer", "classifier")
        for n in model_map.entry(path).param_names
    }
    assert plan.trainable == expected
    assert 0 < plan.trainable_tensors < plan.tensors
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    for name, param in model.named_parameters():
        if name in expected:
            assert not torch.equal(param, before[name]), f"{name} is trainable and did not move"
        else:
            assert torch.equal(param, before[name]), f"{name} is frozen and moved"
    frozen_norms = tuple(p + "." for p in plan.held_in_eval)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers() if n.startswith(frozen_norms))
