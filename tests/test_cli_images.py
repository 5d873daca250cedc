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


def test_batch_prediction_of_an_image_folder_writes_a_row_per_image(fitted_run, pets, tmp_path, capsys):
    import csv

    out = tmp_path / "predictions.csv"
    assert main(["predict", str(fitted_run), "--input", str(pets), "--output", str(out), "--batch-size", "5"]) == 0
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert len(rows) == 24 and list(rows[0])[:3] == ["image", "label", "probability"]
    assert {row["image"] for row in rows} == {str(p) for p in pets.rglob("*") if p.suffix in (".png", ".jpg")}
    # the same labels as predicting the files one by one
    capsys.readouterr()
    assert main(["predict", str(fitted_run), rows[0]["image"], rows[-1]["image"], "--json"]) == 0
    singles = [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()]
    assert singles == [rows[0]["label"], rows[-1]["label"]]

    texts = tmp_path / "texts.csv"
    texts.write_text("text\na photo of a fox\n")
    assert main(["predict", str(fitted_run), "--input", str(texts)]) == 1
    assert f"this run classifies images; --input {texts} must be a folder of images" in capsys.readouterr().err
    assert main(["predict", str(fitted_run), "a photo of a fox"]) == 1
    assert "this run classifies images; 'a photo of a fox' is not an image file" in capsys.readouterr().err


def test_eval_lists_misclassified_images_by_file(fitted_run, pets, tmp_path):
    assert main(["eval", str(fitted_run), "--data", str(pets), "--output", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "eval-pets.json").read_text())
    assert record["examples"] == 24 and len(record["misclassified"]) == 24 - round(24 * record["accuracy"])
    assert all((pets / item["example"]).is_file() for item in record["misclassified"])


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
