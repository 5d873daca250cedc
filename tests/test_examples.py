"""The examples run as written: the hand-written loop over the recipe reaches the numbers it claims."""

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_own_loop_runs_the_recipe_and_keeps_frozen_weights_bit_identical():
    from frostline import load_model

    result = _load("own_loop").main(["--limit", "250", "--max-length", "32"])
    history, model = result["history"], result["model"]

    assert [r.stage_index for r in history] == sorted(r.stage_index for r in history)
    assert {r.stage for r in history} <= {"head", "last2"} and history[0].stage == "head"
    assert sum(r.best for r in history) >= 1 and all(r.verdict for r in history)
    # frozen in every stage: the embeddings and the first four layers are the pretrained ones, bit for bit
    torch.manual_seed(0)
    pretrained, _ = load_model("hf:minilm", num_classes=5)
    for name, tensor in pretrained.state_dict().items():
        if name.startswith(("encoder.embeddings.", *(f"encoder.encoder.layer.{i}." for i in range(4)))):
            assert torch.equal(model.state_dict()[name], tensor), name
    kept = [r for r in history if r.best][-1]
    assert kept.val_accuracy > 0.6  # 5 topics: well above chance after a few head epochs


@pytest.mark.slow
def test_the_default_recipe_runs_inside_the_hugging_face_trainer():
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the text extra installs it)")
    result = _load("hf_trainer_minilm").main(["--limit", "150", "--max-length", "32", "--epochs", "1,1"])
    assert [r.stage for r in result["history"]] == ["head", "last2"]
    assert result["stop_reason"] == "every stage done (head: all 1 epochs; last2: all 1 epochs)"
    assert result["val_accuracy"] > 0.5  # 5 topics
