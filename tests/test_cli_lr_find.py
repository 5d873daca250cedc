import inspect
import json
from pathlib import Path

import pytest

import frostline.cli.lr_find
import frostline.recipe
from frostline.cli.lr_find import DATA_FLAGS, RUN_FLAGS, STAGE_FLAGS, build_settings
from frostline.cli.main import build_parser, main
from frostline.config import DataConfig, FitConfig, load_config
from frostline.errors import ConfigError
from frostline.lr_finder import lr_find
from frostline.optim import param_groups
from frostline.sources.data import load_bbc_news


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory):
    data = load_bbc_news()
    path = tmp_path_factory.mktemp("data") / "news.csv"
    rows = ["text,label"] + [
        '"{}",{}'.format(t[:300].replace('"', "'"), data.label_names[y])
        for t, y in list(zip(data.texts, data.labels, strict=True))[::10]
    ]
    path.write_text("\n".join(rows))
    return path


def test_lr_find_writes_a_png_and_prints_the_suggestion(small_csv, tmp_path, capsys):
    png = tmp_path / "plot" / "lr.png"
    code = main(
        [
            "lr-find",
            "hf:minilm",
            "--data",
            str(small_csv),
            "--steps",
            "30",
            "--max-length",
            "32",
            "--batch-size",
            "8",
            "--start-lr",
            "1e-5",
            "--end-lr",
            "10",
            "--output",
            str(png),
            "--json",
        ]
    )
    captured = capsys.readouterr()

    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert 1e-5 <= result["suggestion"] <= 10
    assert result["method"] in ("valley", "steepest")
    assert len(result["lrs"]) == len(result["losses"]) <= 30
    assert "suggested base learning rate" in captured.err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 20_000


def test_lr_find_bad_column_is_one_message(small_csv, capsys):
    assert main(["lr-find", "--data", str(small_csv), "--label-column", "topic"]) == 1
    assert "label_column='topic' is not a column" in capsys.readouterr().err


# ---- settings come from the same dataclasses as `frostline fit` -------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "bbcnews-minilm.yaml"


def _settings(*argv):
    return build_settings(build_parser().parse_args(["lr-find", *argv]))


def _fails(capsys, argv):
    """Run the CLI expecting exit code 1 and no traceback; return what it printed on stderr."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.fixture
def recipe(tmp_path):
    """Two stages on the digits MLP; stage 1 trains features.3 and the head, each at its own rate."""
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "model: {ref: 'py:tiny_task:model'}\n"
        "data: {ref: 'py:tiny_task:data', batch_size: 32}\n"
        "stages:\n"
        "  - {name: head, freeze: head, lr: 1.0e-2}\n"
        "  - {name: tune, freeze: 'last:1', lr: 3.0e-3, head_lr_mult: 5, layer_decay: 0.5, weight_decay: 0.1}\n"
        "run: {seed: 3}\n"
    )
    return path


def test_without_a_config_the_settings_are_fit_defaults():
    settings = _settings()
    fit = FitConfig()

    assert settings.config == fit
    assert settings.stage_index == 0
    assert settings.stage == fit.stages[0]
    assert settings.config.data == DataConfig()
    # the flags that map to a config field default to None: "the config's value", never a second default
    args = build_parser().parse_args(["lr-find"])
    mapped = [*DATA_FLAGS, *STAGE_FLAGS, *RUN_FLAGS, "model", "source"]
    assert {flag: getattr(args, flag) for flag in mapped} == dict.fromkeys(mapped)
    # the sweep's own defaults are the Python API's
    defaults = inspect.signature(lr_find).parameters
    assert (args.start_lr, args.end_lr, args.steps) == (
        defaults["start_lr"].default,
        defaults["end_lr"].default,
        defaults["num_steps"].default,
    )


def test_a_config_file_supplies_model_data_stage_and_seed():
    settings = _settings(str(EXAMPLE), "--stage", "1")
    config = load_config(EXAMPLE)

    assert settings.config == config
    assert settings.stage == config.stages[1]
    assert (settings.stage.freeze, settings.stage.head_lr_mult, settings.stage.layer_decay) == (
        "last:2;bn=fixed",
        10,
        0.8,
    )
    assert _settings(str(EXAMPLE), "--stage", "last2").stage_index == 1


def test_flags_override_set_which_overrides_the_config(recipe):
    settings = _settings(
        str(recipe),
        "--stage",
        "tune",
        "--set",
        "data.batch_size=8",
        "--set",
        "stages.1.layer_decay=0.7",
        "--batch-size",
        "4",
        "--head-lr-mult",
        "2",
        "--seed",
        "9",
        "--data",
        "yes",
    )

    assert settings.config.data.batch_size == 4
    assert settings.stage.layer_decay == 0.7
    assert settings.stage.head_lr_mult == 2.0
    assert settings.stage.weight_decay == 0.1
    assert settings.config.run.seed == 9
    # a flag's value is taken as written, not as YAML: "yes" is a file name here, not True
    assert settings.config.data.ref == "yes"
    # the other stage is untouched
    assert settings.config.stages[0].head_lr_mult == 1.0
    assert _settings("timm:resnet18").config.model.ref == "timm:resnet18"
    assert _settings(str(recipe), "--model", "timm:resnet18").config.model.ref == "timm:resnet18"


def test_max_length_bound_is_data_configs():
    # lr-find refused anything under 8 before; DataConfig allows 2 to 65,536, then the model's own limit
    assert _settings("--max-length", "4").config.data.max_length == 4
    with pytest.raises(ConfigError) as expected:
        DataConfig(max_length=1)
    assert str(expected.value) == "data.max_length must be 2 to 65,536 tokens, got 1"
    with pytest.raises(ConfigError, match=r"^data\.max_length must be 2 to 65,536 tokens, got 1$"):
        _settings("--max-length", "1")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-length", "70000"], "data.max_length must be 2 to 65,536 tokens, got 70,000"),
        (["--set", "data.max_length=0"], "data.max_length must be 2 to 65,536 tokens, got 0"),
        (["--batch-size", "0"], "data.batch_size must be a whole number of examples >= 1, got 0"),
        (["--image-size", "4"], "data.image_size must be 8 to 2,048 pixels, got 4"),
        (["--head-lr-mult", "0"], "stage 'head': head_lr_mult must be a finite number > 0, got 0.0"),
        (["--seed", "-1"], "run.seed must be a whole number from 0 to 4,294,967,295, got -1"),
        (["--set", "data.batchsize=8"], "unknown key data.batchsize; did you mean data.batch_size?"),
        (["--stage", "lst2"], "--stage 'lst2' names no stage of the recipe; did you mean last2?"),
        (["--stage", "2"], "--stage 2: the recipe has 2 stages, counted from 0: 0 (head), 1 (last2)"),
        (["--steps", "3"], "--steps must be >= 5 for a loss curve to suggest a rate, got 3"),
        (["--start-lr", "1", "--end-lr", "0.1"], "--start-lr and --end-lr must satisfy 0 < start < end, got 1 and 0.1"),
    ],
)
def test_bad_values_give_the_config_message(capsys, argv, message):
    assert message in _fails(capsys, ["lr-find", *argv])


def test_every_problem_is_reported_at_once(capsys):
    err = _fails(capsys, ["lr-find", "--batch-size", "0", "--max-length", "1", "--steps", "2", "--stage", "9"])
    for fragment in ("data.batch_size", "data.max_length", "--steps", "--stage 9"):
        assert fragment in err


def test_max_length_beyond_the_model_is_refused_before_loading_it(capsys):
    err = _fails(capsys, ["lr-find", "--max-length", "1000"])
    assert "data.max_length=1,000 is more tokens than this model reads (512" in err


def test_lr_find_sweeps_the_config_stage(recipe, tmp_path, capsys, monkeypatch):
    built = []

    def recording(*args, **kwargs):
        built.append(groups := recording.__wrapped__(*args, **kwargs))
        return groups

    recording.__wrapped__ = param_groups
    # lr-find starts the stage through the engine, as fit does: the groups it builds are recorded there
    monkeypatch.setattr(frostline.recipe, "param_groups", recording)
    png = tmp_path / "lr.png"
    argv = ["lr-find", str(recipe), "--stage", "1", "--steps", "20", "--output", str(png), "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)

    assert "stage 1 (tune, 2 of 2): freeze last:1, head x5, layer decay 0.5, weight decay 0.1" in captured.err
    assert "freeze last:1: 4 of 6 tensors train (2,842 of 5,962 parameters" in captured.err
    assert "--set stages.1.lr=" in captured.err and "(the stage now has lr 0.003)" in captured.err
    # features.3 at layer_decay x the base rate, the head at head_lr_mult x it
    assert [(g["name"], g["lr_scale"], g["weight_decay"]) for g in built[0]] == [
        ("features.3", 0.5, 0.1),
        ("features.3 (no decay)", 0.5, 0.0),
        ("classifier", 5.0, 0.1),
        ("classifier (no decay)", 5.0, 0.0),
    ]
    assert result["group_scales"] == [0.5, 0.5, 5.0, 5.0]
    assert len(result["losses"]) == 20
    # the config's run.seed (3) draws the head and the batch order: seed 0 would start at 2.3088, 2.3155, 2.3014
    assert [round(loss, 4) for loss in result["losses"][:3]] == [2.3024, 2.3183, 2.3022]
    assert f"{result['suggestion']:.2e}" == "4.83e-04"

    # stage 0 of the same recipe: the head alone at the base rate
    assert main(["lr-find", str(recipe), "--steps", "20", "--output", str(png), "--overwrite", "--json"]) == 0
    head = json.loads(capsys.readouterr().out)
    assert head["group_scales"] == [1.0, 1.0]
    assert [g["weight_decay"] for g in built[1]] == [0.01, 0.0]


def test_the_plot_never_replaces_a_file_unless_asked(tmp_path, monkeypatch, capsys):
    from frostline.cli.lr_find import plot_path
    from frostline.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    assert plot_path(None, overwrite=False).name == "lr_find.png"
    (tmp_path / "lr_find.png").write_bytes(b"an earlier plot")
    (tmp_path / "lr_find-2.png").write_bytes(b"another")
    assert plot_path(None, overwrite=False).name == "lr_find-3.png"
    assert plot_path(None, overwrite=True).name == "lr_find.png"
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"keep me")
    with pytest.raises(ConfigError, match="pass --overwrite to replace it"):
        plot_path(str(mine), overwrite=False)
    assert plot_path(str(mine), overwrite=True) == mine
    # refused before any data or model is read
    assert main(["lr-find", "hf:minilm", "--output", str(mine)]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err and mine.read_bytes() == b"keep me"
