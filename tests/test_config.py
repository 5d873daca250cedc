from pathlib import Path

import pytest

from frostline.config import FitConfig, apply_overrides, config_from_dict, default_stages, load_config
from frostline.errors import ConfigError


def test_defaults_are_the_gradual_unfreezing_recipe():
    config = FitConfig()
    assert config.model.ref == "hf:minilm" and config.data.ref == "bbcnews"
    assert [(s.name, s.freeze) for s in config.stages] == [("head", "head"), ("last2", "last:2;bn=fixed")]
    assert config.stages[1].lr < config.stages[0].lr
    assert config.stages == default_stages()


def test_yaml_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model:\n  ref: efficientnet-lite0\n"
        "data:\n  ref: my.csv\n  batch_size: 8\n"
        "stages:\n  - {name: probe, freeze: head, epochs: 2, lr: 0.01}\n  - {name: tune, freeze: 'last:3', lr: 1e-4, layer_decay: 0.7}\n"
        "run:\n  seed: 3\n  clip_grad: null\n"
    )
    config = load_config(path)

    assert config.model.ref == "efficientnet-lite0"
    assert config.data.batch_size == 8 and config.data.max_length == 128
    assert [s.name for s in config.stages] == ["probe", "tune"]
    assert config.stages[1].lr == 1e-4 and isinstance(config.stages[1].lr, float)
    assert config.run.seed == 3 and config.run.clip_grad is None
    assert config_from_dict(config.to_dict()) == config


def test_every_problem_is_listed_once_with_the_closest_key():
    with pytest.raises(ConfigError) as caught:
        config_from_dict(
            {
                "model": {"reff": "hf:minilm"},
                "data": {"batch_size": "16", "max_length": 64.5},
                "stages": [{"name": "a", "freeze": "lats:2", "epochs": 0, "schedule": "cosin"}],
                "run": {"patience": 0},
                "trainer": {},
            }
        )
    problems = caught.value.problems
    text = "\n".join(problems)
    assert "unknown key model.reff; did you mean model.ref?" in text
    assert "data.batch_size must be int, got '16' (str)" in text
    assert "data.max_length must be int, got 64.5 (float)" in text
    assert "did you mean last:N" in text
    assert "epochs must be >= 1, got 0" in text
    assert "schedule 'cosin' is unknown (did you mean cosine?)" in text
    assert "run.patience must be >= 1, got 0" in text
    assert "unknown section 'trainer'" in text
    assert len(problems) == 8


def test_overrides_use_dotted_keys_and_yaml_values():
    config = apply_overrides(
        FitConfig(), ["data.max_length=256", "stages.1.epochs=5", "run.clip_grad=null", "model.ref=hf:/x"]
    )
    assert config.data.max_length == 256
    assert config.stages[1].epochs == 5
    assert config.run.clip_grad is None
    with pytest.raises(ConfigError, match="stages.7.lr names no setting"):
        apply_overrides(FitConfig(), ["stages.7.lr=1"])
    with pytest.raises(ConfigError, match="unknown key run.sead; did you mean run.seed"):
        apply_overrides(FitConfig(), ["run.sead=1"])


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.batch_size=0", "data.batch_size must be a whole number of examples >= 1, got 0"),
        ("data.eval_batch_size=-3", "data.eval_batch_size must be a whole number of examples >= 1, got -3"),
        ("data.limit=-5", "data.limit must be >= 2 examples (or null for all of them), got -5"),
        ("data.val_fraction=1.5", "data.val_fraction is the share of each class held out for validation, in (0, 1)"),
        ("data.image_size=100000", "data.image_size must be 8 to 2,048 pixels, got 100,000"),
        ("data.max_length=1000000", "data.max_length must be 2 to 65,536 tokens, got 1,000,000"),
        ("data.encoding=klingon", "data.encoding 'klingon' is not a text encoding"),
        ("run.threads=-1", "run.threads must be >= 1 (or null for torch's own choice), got -1"),
        ("run.seed=-1", "run.seed must be a whole number from 0 to 4,294,967,295, got -1"),
        ("run.device=gpu", "run.device must be auto, cuda, cuda:N, mps or cpu, got 'gpu'"),
        ("stages.0.lr=.inf", "stage 'head': lr must be a finite number > 0, got inf"),
        ("stages.0.lr=.nan", "stage 'head': lr must be a finite number > 0, got nan"),
        ("stages.0.weight_decay=-1", "stage 'head': weight_decay must be a finite number >= 0, got -1"),
        ("stages.0.lr=1e400", "stage 'head': lr must be a finite number > 0, got inf"),
        ("stages.0.epochs=10000000000", "stage 'head': epochs must be >= 1, got 10000000000"),
        ("run.clip_grad=.inf", "run.clip_grad must be > 0 or null, got inf"),
    ],
)
def test_every_value_is_range_checked(override, message):
    with pytest.raises(ConfigError) as caught:
        apply_overrides(FitConfig(), [override])
    assert any(message in p for p in caught.value.problems), caught.value.problems


def test_yaml_words_that_yaml_reads_as_booleans_keep_their_meaning(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  cache: off\ndata:\n  augment: no\n")
    config = load_config(path)
    assert config.run.cache == "off" and config.data.augment == "none"
    assert apply_overrides(FitConfig(), ["run.cache=off"]).run.cache == "off"


def test_a_config_that_is_not_utf8_or_holds_python_tags_is_refused(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("model:\n  ref: hf:minilm\nrun:\n  name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.yaml:4 holds bytes that are not UTF-8 \(0xe9\); save the config"):
        load_config(latin)
    tagged = tmp_path / "tagged.yaml"
    marker = tmp_path / "MARKER"
    tagged.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(tagged)
    assert not marker.exists()


@pytest.mark.parametrize("item", ["data.ref.x.y=1", "stages.x.lr=1", "=3", "run=3", "stages.0=head"])
def test_overrides_that_name_no_setting_are_config_errors(item):
    with pytest.raises(ConfigError):
        apply_overrides(FitConfig(), [item])


def test_an_override_that_is_not_yaml_is_taken_as_written():
    assert apply_overrides(FitConfig(), ["data.ref=[unclosed"]).data.ref == "[unclosed"


def test_paths_are_stored_absolute_and_built_in_names_never_become_paths(tmp_path, monkeypatch):
    from frostline.config import with_resolved_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "minilm").mkdir()
    (tmp_path / "mnist").mkdir()
    (tmp_path / "my.csv").write_text("text,label\n")
    (tmp_path / "bert").mkdir()
    config = apply_overrides(FitConfig(), ["data.ref=my.csv", "data.val_ref=mnist"])
    resolved = with_resolved_paths(config)
    assert resolved.data.ref == str(tmp_path / "my.csv") and resolved.data.val_ref == "mnist"
    assert resolved.model.ref == "hf:minilm"
    assert (
        with_resolved_paths(apply_overrides(FitConfig(), ["model.ref=hf:bert"])).model.ref == f"hf:{tmp_path / 'bert'}"
    )


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml")), ids=str)
def test_every_example_config_loads(path):
    config = load_config(path)
    assert config.stages and config.model.ref
    if path.name == "bbcnews-minilm.yaml":
        # the embedded default, written out
        assert config.stages == FitConfig().stages and config.data == FitConfig().data
