"""End to end on the command line: fit MiniLM on a few batches, then eval and predict; bad input exits 1."""

import json

import pytest

from conftest import write_news_csv
from frostline.cli.main import main
from frostline.sources.data import load_bbc_news


@pytest.fixture(scope="module")
def news_csv(tmp_path_factory):
    return write_news_csv(tmp_path_factory.mktemp("news"), every=16, chars=400)


QUICK = [
    "--set",
    "data.max_length=32",
    "--set",
    "data.batch_size=16",
    "--set",
    "stages.0.epochs=2",
    "--set",
    "stages.1.epochs=1",
    # 26 validation examples could never show what stage 2 fixes: the gate would skip it (tests/test_stage_gate.py)
    "--set",
    "stages.1.when=always",
]


@pytest.fixture(scope="module")
def fitted_run(news_csv, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "news"
    assert main(["fit", "--model", "hf:minilm", "--data", str(news_csv), "--output", str(run), *QUICK]) == 0
    return run


def test_fit_writes_the_run_folder(fitted_run):
    names = {p.name for p in fitted_run.iterdir()}
    assert {"config.json", "metrics.jsonl", "best.safetensors", "head.json", "report.png", "checkpoint"} <= names
    records = [json.loads(line) for line in (fitted_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["head", "head", "last2"]
    assert records[2]["trainable_tensors"] == 34
    assert (fitted_run / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_reports_the_best_weights_accuracy(fitted_run, capsys):
    assert main(["eval", str(fitted_run)]) == 0
    out = capsys.readouterr().out
    records = [json.loads(line) for line in (fitted_run / "metrics.jsonl").read_text().splitlines()]
    best = max(records, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    assert f"accuracy {100 * best['val_accuracy']:.2f}%" in out
    p, n = best["val_accuracy"], best["val_count"]
    assert f"± {100 * (p * (1 - p) / n) ** 0.5:.2f} (one standard error, {n:,d} examples)" in out
    assert "business" in out and "recall" in out


def test_eval_writes_per_class_figures_the_confusion_matrix_and_the_mistakes(fitted_run, news_csv, capsys, tmp_path):
    from sklearn.metrics import f1_score

    assert main(["eval", str(fitted_run), "--examples", "2"]) == 0
    out = capsys.readouterr().out
    record = json.loads((fitted_run / "eval.json").read_text())
    assert (fitted_run / "eval-confusion.png").read_bytes()[:4] == b"\x89PNG"
    matrix = record["confusion"]
    hits = sum(matrix[k][k] for k in range(len(matrix)))
    assert record["examples"] == 26 and record["accuracy"] == pytest.approx(hits / 26)
    # macro-F1 as scikit-learn computes it from the same (true, predicted) pairs
    truth = [t for t, row in enumerate(matrix) for p, count in enumerate(row) for _ in range(count)]
    predicted = [p for t, row in enumerate(matrix) for p, count in enumerate(row) for _ in range(count)]
    assert record["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro", zero_division=0))
    assert f"macro-F1 {100 * record['macro_f1']:.2f}%" in out and "F1" in out
    assert "confusion matrix (rows: true class, columns: predicted)" in out
    # every mistake is listed with its text, most confident first
    wrong = record["misclassified"]
    assert len(wrong) == 26 - hits
    assert all(item["true"] != item["predicted"] and item["example"] in news_csv.read_text() for item in wrong)
    assert [item["probability"] for item in wrong] == sorted((item["probability"] for item in wrong), reverse=True)
    if wrong:
        assert f"misclassified ({min(2, len(wrong))} of {len(wrong)}" in out

    assert main(["eval", str(fitted_run), "--data", str(news_csv), "--output", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "eval-news.json").read_text())["examples"] == len(load_bbc_news().texts[::16])
    assert (tmp_path / "out" / "eval-news-confusion.png").is_file()


def test_eval_of_a_read_only_run_folder_prints_everything_and_says_what_it_did_not_write(
    fitted_run, tmp_path, capsys, monkeypatch
):
    import frostline.cli.run_args as run_args

    (fitted_run / "eval.json").unlink(missing_ok=True)
    before = sorted(p.name for p in fitted_run.iterdir())
    monkeypatch.setattr(run_args.os, "access", lambda path, mode: False)  # as a shared folder would be
    assert main(["eval", str(fitted_run)]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "eval.json and its confusion PNG not written" in out and "--output DIR" in out
    assert sorted(p.name for p in fitted_run.iterdir()) == before
    assert main(["eval", str(fitted_run), "--output", str(tmp_path / "out")]) == 1
    assert "cannot write into" in capsys.readouterr().err


def test_batch_prediction_of_a_file_gives_evals_accuracy(fitted_run, news_csv, tmp_path, capsys):
    import csv

    assert main(["eval", str(fitted_run), "--data", str(news_csv), "--output", str(tmp_path)]) == 0
    evaluated = json.loads((tmp_path / "eval-news.json").read_text())
    capsys.readouterr()
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(fitted_run), "--input", str(news_csv), "--output", str(out), "--batch-size", "16"]) == 0
    assert f"wrote {evaluated['examples']} predictions to {out}" in capsys.readouterr().out
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    truth = [row["label"] for row in csv.DictReader(news_csv.open(encoding="utf-8"))]
    assert len(rows) == len(truth) == evaluated["examples"]
    labels = evaluated["labels"]
    assert list(rows[0]) == ["text", "label", "probability", *(f"p_{name}" for name in labels)]
    hits = sum(row["label"] == label for row, label in zip(rows, truth, strict=True))
    assert hits / len(truth) == pytest.approx(evaluated["accuracy"])
    for row in rows:
        probabilities = [float(row[f"p_{name}"]) for name in labels]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)
        assert float(row["probability"]) == max(probabilities) == float(row[f"p_{row['label']}"])

    # an existing output is never replaced without --overwrite; a JSONL file is read by its text column
    before = out.read_bytes()
    texts = tmp_path / "texts.jsonl"
    texts.write_text("\n".join(json.dumps({"body": row["text"]}) for row in rows[:3]) + "\n")
    assert main(["predict", str(fitted_run), "--input", str(texts), "--text-column", "body", "--output", str(out)]) == 1
    assert "pass --overwrite" in capsys.readouterr().err and out.read_bytes() == before
    args = ["predict", str(fitted_run), "--input", str(texts), "--text-column", "body", "--output", str(out)]
    assert main([*args, "--overwrite"]) == 0
    assert len(list(csv.DictReader(out.open(encoding="utf-8")))) == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give the texts or image files to label as arguments, or a file or folder with --input"),
        (["--input", "{folder}"], "this run classifies texts; --input {folder} must be a .csv or .jsonl file"),
        (["{image}"], "this run classifies texts; {image} is an image file"),
        (["--input", "{folder}/missing.csv"], "{folder}/missing.csv does not exist"),
        (["--input", "{folder}/texts.csv", "--text-column", "body"], "text_column='body' is not a column"),
    ],
)
def test_batch_prediction_refuses_input_that_does_not_fit_the_run(fitted_run, tmp_path, capsys, args, message):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "cat.png")
    (tmp_path / "texts.csv").write_text("text\nsome words\n")
    fill = {"folder": str(tmp_path), "image": str(tmp_path / "cat.png")}
    assert main(["predict", str(fitted_run), *(a.format(**fill) for a in args)]) == 1
    assert message.format(**fill) in capsys.readouterr().err


def test_predict_prints_labels_with_probabilities(fitted_run, capsys):
    assert main(["predict", str(fitted_run), "The striker scored twice in the cup final", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert line["label"] in {"business", "entertainment", "politics", "sports", "tech"}
    assert 0 < sum(line["probabilities"].values()) <= 1.0001


def _fails(capsys, argv):
    """Run the CLI expecting exit code 1 and no traceback; return what it printed on stderr."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_unknown_config_key_names_the_closest(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  batchsize: 8\n")
    assert "unknown key data.batchsize; did you mean data.batch_size?" in _fails(capsys, ["fit", str(config)])


def test_missing_label_column(news_csv, tmp_path, capsys):
    argv = ["fit", "--data", str(news_csv), "--set", "data.label_column=topic", "--output", str(tmp_path / "r")]
    assert "label_column='topic' is not a column" in _fails(capsys, argv)


def test_one_class_and_empty_data(tmp_path, capsys):
    (tmp_path / "one.csv").write_text("text,label\na b c,x\nd e f,x\ng h,x\n")
    (tmp_path / "empty.csv").write_text("text,label\n")
    one = ["fit", "--data", str(tmp_path / "one.csv"), "--output", str(tmp_path / "r1")]
    empty = ["fit", "--data", str(tmp_path / "empty.csv"), "--output", str(tmp_path / "r2")]
    assert "holds a single class ('x')" in _fails(capsys, one)
    assert "holds no labelled examples" in _fails(capsys, empty)


def test_validation_classes_missing_from_training(news_csv, tmp_path, capsys):
    (tmp_path / "val.csv").write_text("text,label\nsome text,weather\nmore,sports\n")
    argv = [
        "fit",
        "--data",
        str(news_csv),
        "--set",
        f"data.val_ref={tmp_path / 'val.csv'}",
        "--output",
        str(tmp_path / "r"),
    ]
    assert "has classes the training data lacks: ['weather']" in _fails(capsys, argv)


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert "no config.json there" in _fails(capsys, ["fit", "--resume", str(tmp_path)])


def test_the_best_accuracy_is_reported_with_its_standard_error_and_the_epochs_the_data_cannot_tell_apart():
    import torch

    from frostline.cli.fit import _uncertainty
    from frostline.recipe import EpochRecord
    from frostline.train.evidence import ValidationExamples
    from frostline.train.trainer import FitResult

    n = 400
    rights = [300, 380, 381, 379]  # epochs 2 and 4 are a step or two from epoch 3; epoch 1 is far below
    history = []
    for epoch, right in enumerate(rights, start=1):
        correct = torch.arange(n) < right
        examples = ValidationExamples(torch.where(correct, 0.1, 2.0), correct)
        history.append(
            EpochRecord(
                epoch, "s", 0, epoch, "head", 1.0 / epoch, float(examples.losses.mean()), right / n, examples=examples
            )
        )
    result = FitResult(history, 3, "s", 381 / n, history[2].val_loss, "", None, None, None, 0.0, [])

    text = _uncertainty(result)

    assert text == " ± 1.06 (400 examples; epochs 2, 4 as good within noise)"


def test_a_run_that_reads_texts_in_windows_is_evaluated_the_way_it_was_trained(news_csv, tmp_path, capsys):
    run = tmp_path / "windows"
    settings = ["--set", "data.max_length=32", "--set", "data.windows=3", "--set", "stages.0.epochs=2"]
    settings += ["--set", "stages.1.when=always", "--set", "stages.1.epochs=1"]
    assert main(["fit", "--model", "hf:minilm", "--data", str(news_csv), "--output", str(run), *settings]) == 0
    out = capsys.readouterr().out
    # the head stage trains from cached pooled windows; the block stage says why it runs without the cache
    assert "feature cache: on: inputs of the head classifier" in out
    assert "feature cache: off: the texts are read in several windows" in out
    assert json.loads((run / "head.json").read_text())["windows"] == 3
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = max(records, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    assert main(["eval", str(run)]) == 0
    assert f"accuracy {100 * best['val_accuracy']:.2f}%" in capsys.readouterr().out


def test_windows_on_a_model_that_cannot_read_them_is_refused(tmp_path, capsys):
    from conftest import tiny_bert
    from frostline.sources.text import open_tokenizer

    model, _ = tiny_bert(num_labels=3, vocab_size=30522)
    model.save_pretrained(tmp_path / "bert")
    open_tokenizer("minilm").save_pretrained(tmp_path / "bert")
    err = _fails(
        capsys,
        [
            "fit",
            "--model",
            f"hf:{tmp_path / 'bert'}",
            "--set",
            "data.windows=2",
            "--set",
            "data.limit=60",
            "--output",
            str(tmp_path / "run"),
        ],
    )
    assert "data.windows=2: only sentence encoders" in err and "set data.windows to 1" in err
    assert not (tmp_path / "run").exists()
    # lr-find reads the same config: the same refusal
    model_ref = f"hf:{tmp_path / 'bert'}"
    err = _fails(capsys, ["lr-find", "--model", model_ref, "--set", "data.windows=2", "--set", "data.limit=60"])
    assert "data.windows=2: only sentence encoders" in err
