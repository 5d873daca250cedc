"""Property tests: whatever a person types or writes in a file, frostline answers with a result or one of
its own errors (`frostline.errors`), never a stray TypeError or UnicodeDecodeError from deep inside."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, find, given, settings
from hypothesis import strategies as st

from conftest import SimpleModel, TinyCNN
from frostline.config import FitConfig, apply_overrides, config_from_dict, load_config
from frostline.errors import FreezeSpecError, FrostlineError
from frostline.freeze import FreezeSpec, freeze, held_in_eval, plan_freeze
from frostline.inspect import inspect_model
from frostline.recipe import EpochRecord
from frostline.train.evidence import ValidationExamples
from frostline.train.monitor import OverfitMonitor
from test_freeze import SpareBranch, ThroughChildren

# fast enough for the whole file to run in well under 30 s on two busy cores; no example database in the checkout
FAST = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(FAST, max_examples=60)
MANY = settings(FAST, max_examples=400)

HUGE = ["99999999999999999999", "-1", "-0", "007", "1e3", "1.5", "²", "١٢", str(2**64), "9" * 5000]
TOKENS = [
    "head",
    "last:",
    "from:",
    "train=",
    "freeze=",
    "bn=",
    "none",
    "bitfit",
    "eval",
    "train",
    "fixed",
    ";",
    ",",
    "*",
    " ",
    "\t",
    "\u00a0",
    ":",
    "=",
    ".",
    "[",
    "]",
    "?",
    "!",
    "blocks",
    "stem",
    "features",
    "classifier",
    "ß",
    "é",
    "\u2028",
    "\x00",
]
token_soup = st.lists(
    st.one_of(
        st.sampled_from(TOKENS),
        st.sampled_from(HUGE),
        st.integers(-(10**25), 10**25).map(str),
        st.text(max_size=3),
    ),
    max_size=8,
).map("".join)
names = st.one_of(
    st.sampled_from(["blocks", "blocks.1", "stem", "head.*", "*", "features.?", "[a-c]*", "[z-a]", "é.0", "a:b"]),
    st.text(max_size=4),
)
selections = st.one_of(
    st.sampled_from(["head", "none", "bitfit", "Head", "last", "from"]),
    st.one_of(st.integers(0, 6).map(str), st.sampled_from(HUGE), st.text(max_size=3)).map("last:{}".format),
    names.map("from:{}".format),
    st.builds("{}={}".format, st.sampled_from(["train", "freeze"]), st.lists(names, max_size=3).map(",".join)),
)
separators = st.sampled_from(["", " ", ";", ";;", "\t", "\u3000"])
valid_bn = st.sampled_from(["", ";bn=eval", " bn=train", ";bn=fixed", "; bn=fixed"])
bn_clauses = st.one_of(
    valid_bn,
    valid_bn,
    valid_bn,
    st.sampled_from([";bn=", ";bn=frozen", ";bn=train;bn=eval", "bn=fixed"]),
    st.text(max_size=3).map(";bn={}".format),
)
# one selection, perhaps a bn clause, separators around them: near enough that many parse
near_specs = st.builds("{}{}{}{}".format, separators, selections, bn_clauses, separators)
spec_strings = st.one_of(st.text(), token_soup, near_specs, near_specs)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([10**30, -(10**30), 2**63, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.text(max_size=6), st.integers()), inner, max_size=3)
    ),
    max_leaves=8,
)


def _parse(value) -> FreezeSpec | FreezeSpecError:
    """The spec `value` parses to, or the FreezeSpecError it raises; any other exception fails the test."""
    try:
        return FreezeSpec.parse(value)
    except FreezeSpecError as err:
        return err


@MANY
@given(spec_strings)
@example("last:99999999999999999999")
@example("last:" + "9" * 5000)
@example("last:²")
@example("from:a=b")
@example("train=a,,b;bn=fixed")
def test_spec_strings_parse_or_raise_a_freeze_spec_error(text):
    outcome = _parse(text)
    if isinstance(outcome, FreezeSpecError):
        assert str(outcome).strip(), f"the error for {text!r} says nothing"
    else:
        assert isinstance(outcome, FreezeSpec) and FreezeSpec.parse(str(outcome)) == outcome, str(outcome)


spec_fields = ["mode", "n", "path", "globs", "bn"]
spec_dicts = st.dictionaries(
    st.one_of(st.sampled_from(spec_fields), st.text(max_size=5), st.integers(-2, 2)),
    st.one_of(
        st.sampled_from(["head", "last", "from", "none", "bitfit", "train", "freeze", "eval", "fixed", "a b", "x;y"]),
        st.integers(-3, 60),
        values,
        st.lists(st.sampled_from(["head.*", "stem", "", "a,b", " ", "*"]), max_size=3),
    ),
    max_size=5,
)


@MANY
@given(spec_dicts)
@example({"mode": "train", "globs": 5})
@example({"mode": "from", "path": 3.5})
@example({"mode": "head", "n": 2})
@example({1: "head", "mode": "head"})
@example({"mode": "train", "globs": ["a", ""]})
def test_spec_dicts_parse_or_raise_a_freeze_spec_error(values):
    outcome = _parse(values)
    if isinstance(outcome, FreezeSpecError):
        assert str(outcome).strip(), f"the error for {values!r} says nothing"
    else:
        assert isinstance(outcome, FreezeSpec) and FreezeSpec.parse(str(outcome)) == outcome, str(outcome)


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("last:2;bn=fixed", FreezeSpec(mode="last", n=2, bn="fixed")),
        ({"mode": "train", "globs": "head.*"}, FreezeSpec(mode="train", globs=("head.*",))),
        ("last:two", None),
        ({"mode": "train", "globs": 5}, None),
    ],
)
def test_the_property_tests_see_both_outcomes(value, parsed):
    """The checks above can fail both ways: a valid spec must parse to the right value, an invalid one must be
    refused with frostline's error."""
    outcome = _parse(value)
    if parsed is None:
        assert isinstance(outcome, FreezeSpecError)
    else:
        assert outcome == parsed


@MANY
@given(st.one_of(values, st.binary(), st.tuples(st.text()), st.sets(st.integers()), st.just(FreezeSpec)))
def test_specs_that_are_neither_string_nor_dict_raise_a_freeze_spec_error(value):
    if isinstance(value, (str, dict)):
        return
    with pytest.raises(FreezeSpecError):
        FreezeSpec.parse(value)


def _tiny_models():
    torch.manual_seed(0)
    models = {
        "SimpleModel": (SimpleModel(), torch.randn(2, 10)),
        "TinyCNN": (TinyCNN(), torch.randn(2, 3, 8, 8)),
        # blocks that never run, and entries that run only through their children
        "SpareBranch": (SpareBranch(), torch.randn(2, 4)),
        "ThroughChildren": (ThroughChildren(), torch.randn(2, 4)),
    }
    return {name: (model, inspect_model(model, batch)) for name, (model, batch) in models.items()}


MODELS = _tiny_models()
PATHS = ["stem", "blocks", "blocks.0", "blocks.2.1", "blocks.3", "head", "head.1", "features", "classifier", "fuse", ""]
model_specs = st.one_of(
    spec_strings,
    st.lists(st.one_of(st.sampled_from(TOKENS), st.sampled_from(PATHS), st.integers(0, 5).map(str)), max_size=6).map(
        "".join
    ),
)


def _state(model):
    """Everything `freeze` may change: requires_grad, training flags, and the eval holds."""
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    return grads, {n: m.training for n, m in model.named_modules()}, held_in_eval(model)


@FAST
@given(st.sampled_from(sorted(MODELS)), model_specs)
@example("TinyCNN", "from:blocks.0.0")
@example("TinyCNN", "train=[z-a]")
@example("SpareBranch", "last:1")
@example("SpareBranch", "from:blocks.3")
@example("ThroughChildren", "last:2;bn=fixed")
def test_plan_freeze_plans_or_raises_and_changes_nothing(name, text):
    model, model_map = MODELS[name]
    before = _state(model)
    try:
        plan = plan_freeze(model, text, model_map)
    except FreezeSpecError:
        assert _state(model) == before
        return
    assert _state(model) == before
    names = {n for n, _ in model.named_parameters()}
    head = set(model_map.entry(model_map.head).param_names)
    assert plan.trainable <= names
    assert plan.trainable_tensors == len(plan.trainable)
    if plan.spec.mode in ("head", "last", "bitfit", "none"):
        assert head <= plan.trainable


@FEW
@given(st.sampled_from(sorted(MODELS)), model_specs, st.sampled_from(["head", "last:1", "none", "bitfit"]))
def test_freeze_with_an_invalid_spec_leaves_the_model_as_it_was(name, text, first):
    model, model_map = MODELS[name]
    freeze(model, first, model_map)
    before = _state(model)
    try:
        plan = freeze(model, text, model_map)
    except FreezeSpecError:
        assert _state(model) == before
        return
    assert {n for n, p in model.named_parameters() if p.requires_grad} == plan.trainable


# The config loader: every problem in a config file or an override is a ConfigError (a FrostlineError).

DEFAULTS = FitConfig().to_dict()
SECTIONS = ["model", "data", "stages", "run"]
KEYS = sorted({k for s in ("model", "data", "run") for k in DEFAULTS[s]} | set(DEFAULTS["stages"][0]))
config_values = st.one_of(
    values,
    st.sampled_from(["1e-4", "nan", "inf", "-inf", "1_000", "crop", "crop+flip", "last:2", "cuda:0", "auto", "none"]),
)
sections = st.one_of(
    config_values,
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=5)), config_values, max_size=4),
    st.lists(
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=5)), config_values, max_size=4), max_size=3
    ),
)
raw_configs = st.dictionaries(
    st.one_of(st.sampled_from(SECTIONS), st.text(max_size=5), st.integers()), sections, max_size=4
)


@st.composite
def edited_defaults(draw):
    """The default config with a few settings replaced: values that pass the type checks reach `__post_init__`."""
    config = FitConfig().to_dict()
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(SECTIONS))
        target = config[section]
        if section == "stages":
            target = target[draw(st.integers(0, len(target) - 1))]
        target[draw(st.sampled_from(sorted(target)))] = draw(config_values)
    return config


def _only_frostline_errors(call, *args):
    try:
        return call(*args)
    except FrostlineError:
        return None


@FAST
@given(st.one_of(raw_configs, edited_defaults(), values))
@example({"stages": [{"lr": 10**400}]})
@example({"data": {"crop_scale": 10**400}})
def test_config_from_dict_builds_or_raises_a_config_error(raw):
    config = _only_frostline_errors(config_from_dict, raw)
    assert config is None or isinstance(config, FitConfig)


OVERRIDE_KEYS = [
    "run.seed",
    "run.clip_grad",
    "model.ref",
    "model.ref.x",
    "data.batch_size",
    "data.crop_scale",
    "stages.0.lr",
    "stages.1.freeze",
    "stages.7.lr",
    "stages.-1.name",
    "stages.x.lr",
    "stages.0",
    "stages.0.name.y",
    "stages",
    "run",
    "",
    ".",
]
YAML_SCALARS = [
    "null",
    "1e-4",
    ".nan",
    ".inf",
    "[1, 2]",
    "{a: 1}",
    "'",
    '"',
    "{",
    "- a",
    "&a [*a]",
    "*a",
    "!!binary AAA",
    "!!python/name:os.system",
    "2001-12-14",
    "1" + "0" * 400,
    "yes",
    "0x1F",
    "last:2;bn=fixed",
]
overrides = st.one_of(
    st.text(max_size=30),
    st.builds(
        lambda k, v: f"{k}={v}",
        st.one_of(st.sampled_from(OVERRIDE_KEYS), st.text(max_size=10)),
        st.one_of(st.sampled_from(YAML_SCALARS), st.text(max_size=10)),
    ),
)


@FAST
@given(st.lists(overrides, max_size=3))
@example(["model.ref.x=1"])
@example(["run.seed='"])
@example(["stages.0.lr=1" + "0" * 400])
def test_apply_overrides_applies_or_raises_a_config_error(items):
    config = _only_frostline_errors(apply_overrides, FitConfig(), items)
    assert config is None or isinstance(config, FitConfig)


CODE_TAGS = [
    '!!python/object/apply:os.system ["touch {marker}"]',
    'stages: !!python/object/apply:os.system ["touch {marker}"]',
    "run:\n  seed: !!python/object/apply:os.system ['touch {marker}']\n",
    '!!python/object/new:os.system ["touch {marker}"]',
    "!!python/name:os.system",
]


@FEW
@given(
    st.one_of(
        st.binary(max_size=200),
        st.sampled_from(CODE_TAGS).map(str.encode),
        st.lists(
            st.sampled_from([b"model:", b"\n", b"  ", b"ref: ", b"- ", b"{", b"[", b"\xff", b"\xfe", b"&a", b"*a"])
        ).map(b"".join),
    )
)
@example(b"\xff\xfe\x00")
@example(b"model: {ref: \x80}")
@example(b"[" * 2000)
def test_load_config_reads_any_file_or_raises_a_config_error_and_runs_no_code(content):
    with tempfile.TemporaryDirectory() as folder:
        marker = Path(folder) / "marker"
        path = Path(folder) / "config.yaml"
        path.write_bytes(content.replace(b"{marker}", str(marker).encode()))

        config = _only_frostline_errors(load_config, path)

        assert config is None or isinstance(config, FitConfig)
        assert not marker.exists(), "loading a config ran code from a YAML tag"


@pytest.mark.parametrize("mode", ["head", "last", "from", "none", "bitfit", "train", "freeze"])
def test_near_valid_spec_strings_reach_every_mode(mode):
    # a property that only ever meets errors proves little: the near-valid strings must also parse
    def parses_to_mode(text):
        try:
            return FreezeSpec.parse(text).mode == mode
        except FreezeSpecError:
            return False

    text = find(near_specs, parses_to_mode, settings=settings(max_examples=1000, database=None, derandomize=True))
    assert FreezeSpec.parse(text).mode == mode


# ---- the overfitting monitor on any history -----------------------------------------------------------------------

_losses = st.floats(min_value=0.0, max_value=20.0, allow_nan=False)
_epoch = st.tuples(_losses, _losses, st.integers(min_value=0, max_value=50))


@st.composite
def _histories(draw):
    """Histories of any shape: losses from 0 (a perfect fit) up, accuracies in steps of 1/n, per-example results for
    some, one or two stages."""
    n = draw(st.integers(min_value=1, max_value=50))
    epochs = draw(st.lists(_epoch, min_size=1, max_size=14))
    with_examples = draw(st.booleans())
    second = draw(st.integers(min_value=0, max_value=len(epochs)))
    history = []
    for i, (train, val, right) in enumerate(epochs):
        right = min(right, n)
        examples = None
        if with_examples:
            correct = torch.arange(n) < right
            examples = ValidationExamples(torch.where(correct, 0.0, 2.0 * val).float(), correct)
        stage = 1 if i >= second else 0
        history.append(
            EpochRecord(i + 1, f"s{stage}", stage, i + 1, "head", train, val, right / n, val_count=n, examples=examples)
        )
    return history, min(second, len(history) - 1) if second < len(history) else 0


def _flat(train, val, epochs=6):
    return [
        EpochRecord(i + 1, "s", 0, i + 1, "head", t, v, 1.0, val_count=10)
        for i, (t, v) in enumerate([(train, val)] * epochs)
    ]


@FAST
@given(_histories(), st.integers(min_value=1, max_value=4))
@example((_flat(0.0, 0.0), 0), 2)  # a perfect fit: losses of exactly 0 (divided by, once)
@example((_flat(0.0, 0.3), 0), 2)
@example((_flat(0.2, 0.0), 0), 1)
def test_the_monitor_gives_a_verdict_on_any_history_and_its_numbers_hold(drawn, patience):
    history, since = drawn
    monitor = OverfitMonitor(patience=patience)
    diagnosis = monitor.diagnose(history, since)

    assert diagnosis.verdict in ("improving", "converged", "overfitting", "plateau")
    assert 1 <= diagnosis.best_epoch <= len(history)
    assert diagnosis.best_epoch == monitor.best_index(history) + 1
    if diagnosis.verdict == "overfitting":
        assert diagnosis.level in ("onset", "proved") and diagnosis.began_epoch is not None
        assert 2 <= diagnosis.began_epoch <= len(history) + 1
    if diagnosis.verdict == "improving":
        assert not diagnosis.should_stop
    else:
        assert diagnosis.message and diagnosis.evidence
