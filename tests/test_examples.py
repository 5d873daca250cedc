"""The examples run as written: the hand-written loop, the HF Trainer and the Lightning Trainer over the recipe."""

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
    assert result["stop_reason"] == "every stage done (head: its 1 epoch; last2: its 1 epoch)"
    assert result["val_accuracy"] > 0.5  # 5 topics


@pytest.mark.slow
def test_the_mnist_recipe_runs_inside_a_lightning_trainer():
    pytest.importorskip("lightning", reason="the lightning extra is not installed (pip install 'frostline[lightning]')")
    from frostline import load_model

    # the run sets both process-wide (Trainer(deterministic=True) calls torch.use_deterministic_algorithms)
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        # one thread: on shared cores, two threads that wait on each other made this run 50x slower
        result = _load("lightning_efficientnet_mnist").main(
            ["--limit", "300", "--image-size", "32", "--epochs", "1,1", "--threads", "1"]
        )
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
    history = result["history"]

    assert [r.stage for r in history] == ["head", "last2"]
    assert result["stop_reason"] == "every stage done (head: its 1 epoch; last2: its 1 epoch)"
    # 240 training images in batches of 16: the optimizer FrostlineRecipe installed stepped once per batch
    assert [r.steps for r in history] == [15, 15]
    assert [r.trainable_tensors for r in history] == [2, 23]
    # 10 digits, 60 validation images: 38% at seed 0 (seeds 1 and 2: 49%, 56%), chance is 10%
    assert result["val_accuracy"] > 0.2
    assert result["val_accuracy"] == max(r.val_accuracy for r in history if r.best)

    # only the last two blocks and the head moved; everything else, every BatchNorm statistic included
    # (bn=fixed), is the pretrained tensor bit for bit
    torch.manual_seed(0)
    pretrained, _ = load_model("efficientnet-lite0", num_classes=10)
    tuned = result["model"].state_dict()
    trainable = ("_blocks.14.", "_blocks.15.", "_conv_head.", "_bn1.", "_fc.")
    expected = {n for n, _ in pretrained.named_parameters() if n.startswith(trainable)}
    moved = {n for n, t in pretrained.state_dict().items() if not torch.equal(t, tuned[n])}
    assert moved == expected
