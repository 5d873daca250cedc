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
