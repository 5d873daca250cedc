"""End to end on images: fit EfficientNet-Lite0 on an image folder, then eval and predict image files."""

import json

import pytest

from frostline.cli.main import main
from test_images import _write_images


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    return _write_images(tmp_path_factory.mktemp("data") / "pets", per_class=8)


@pytest.fixture(scope="module")
def fitted_run(pets, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "pets"
    code = main(
        [
            "fit",
            "--model",
            "efficientnet-lite0",
            "--data",
            str(pets),
            "--output",
            str(run),
            "--set",
            "data.image_size=32",
            "--set",
            "data.batch_size=8",
            "--set",
            "stages.0.epochs=2",
            "--set",
            "stages.1.epochs=1",
        ]
    )
    assert code == 0
    return run


def test_fit_on_an_image_folder_uses_the_cache_in_both_stages(fitted_run):
    records = [json.loads(line) for line in (fitted_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["head", "head", "last2"]
    assert [r["cache"] for r in records] == ["inputs of the head _fc"] * 2 + ["inputs of _blocks.14"]
    assert json.loads((fitted_run / "head.json").read_text())["labels"] == ["cat", "dog", "fox"]


def test_eval_on_images_repeats_the_best_epochs_accuracy(fitted_run, capsys):
    assert main(["eval", str(fitted_run)]) == 0
    out = capsys.readouterr().out
    records = [json.loads(line) for line in (fitted_run / "metrics.jsonl").read_text().splitlines()]
    best = max(records, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    assert f"accuracy {100 * best['val_accuracy']:.2f}%" in out


def test_eval_on_another_folder_and_predict_image_files(fitted_run, pets, capsys):
    assert main(["eval", str(fitted_run), "--data", str(pets)]) == 0
    assert f"on {pets}: 24 examples" in capsys.readouterr().out

    assert main(["predict", str(fitted_run), str(pets / "fox" / "1.png"), "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["text"].endswith("1.png") and line["label"] in ("cat", "dog", "fox")
    assert sum(line["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def test_predict_on_a_broken_image_exits_1_with_the_file_named(fitted_run, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"no image here")
    assert main(["predict", str(fitted_run), str(broken)]) == 1
    assert f"cannot read image {broken}" in capsys.readouterr().err


def test_lr_find_sweeps_on_an_image_folder(pets, tmp_path, capsys):
    png = tmp_path / "lr.png"
    args = ["lr-find", "efficientnet-lite0", "--data", str(pets), "--image-size", "32", "--batch-size", "4"]
    assert main([*args, "--steps", "12", "--output", str(png), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert len(result["lrs"]) == len(result["losses"]) > 0
