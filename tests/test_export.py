"""Exports run without frostline: each is loaded with its own runtime and gives frostline's logits on real inputs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_bert, write_news_csv
from frostline.batches import logits_of
from frostline.cli.main import main
from frostline.runs import load_run
from test_images import _write_images

pytestmark = pytest.mark.slow  # every test fits and exports a real pretrained model

TEXTS = [
    "The striker scored twice in the cup final",
    "Shares fell after the bank reported a loss",
    "The new phone has a faster chip",
]


@pytest.fixture(scope="module")
def news_csv(tmp_path_factory):
    return write_news_csv(tmp_path_factory.mktemp("news"), every=20, chars=300)


def _fit(tmp_path_factory, model, data, *settings):
    run = tmp_path_factory.mktemp("runs") / "run"
    args = ["fit", "--model", model, "--data", str(data), "--output", str(run), "--set", "stages.0.epochs=1"]
    args += ["--set", "stages.1.epochs=1", "--set", "stages.1.when=always", *settings]
    assert main(args) == 0
    return run


@pytest.fixture(scope="module")
def text_run(news_csv, tmp_path_factory):
    return _fit(tmp_path_factory, "hf:minilm", news_csv, "--set", "data.max_length=32")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A transformers sequence classifier (BertForSequenceClassification) saved to a folder with MiniLM's tokenizer."""
    from frostline.sources.text import open_tokenizer

    tokenizer = open_tokenizer("minilm")
    model, _ = tiny_bert(num_labels=5, vocab_size=tokenizer.vocab_size)
    folder = tmp_path_factory.mktemp("models") / "tiny-bert"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def classifier_run(classifier, news_csv, tmp_path_factory):
    return _fit(tmp_path_factory, f"hf:{classifier}", news_csv, "--set", "data.max_length=32")


@pytest.fixture(scope="module")
def lora_run(classifier, news_csv, tmp_path_factory):
    """LoRA adapters (peft) with the classifier's head, in both stages (the best weights carry trained adapters)."""
    pytest.importorskip("peft", reason="the lora extra (peft) is not installed")
    settings = ["--set", "data.max_length=32", "--set", "stages.0.freeze=lora:r=4", "--set", "stages.1.freeze=lora:r=4"]
    return _fit(tmp_path_factory, f"hf:{classifier}", news_csv, *settings)


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    return _write_images(tmp_path_factory.mktemp("data") / "pets", per_class=6)


@pytest.fixture(scope="module")
def image_run(pets, tmp_path_factory):
    return _fit(
        tmp_path_factory, "efficientnet-lite0", pets, "--set", "data.image_size=32", "--set", "data.batch_size=6"
    )


def _frostline_logits(run, texts):
    trained = load_run(run)
    with torch.inference_mode():
        return logits_of(trained.model(**trained.encode(texts))).float()


def _tokenized(folder, texts, max_length):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")


def test_torchscript_export_of_a_text_run_runs_with_torch_jit_load(text_run, tmp_path, capsys):
    folder = tmp_path / "ts"
    assert main(["export", str(text_run), "--format", "torchscript", "--output", str(folder)]) == 0
    assert "loaded with torch.jit.load: logits within" in capsys.readouterr().out
    record = json.loads((folder / "frostline-export.json").read_text())
    assert record["labels"] == json.loads((text_run / "head.json").read_text())["labels"]
    # only torch and the folder's own tokenizer: texts of other lengths than the traced batch
    tokens = _tokenized(folder, TEXTS, record["inputs"]["max_length"])
    model = torch.jit.load(str(folder / "model.pt"))
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens["input_ids"]), torch.from_numpy(tokens["attention_mask"]))
    torch.testing.assert_close(logits, _frostline_logits(text_run, TEXTS), atol=1e-4, rtol=1e-4)


def _onnx_logits(run, folder):
    """Export `run` as ONNX to `folder` and run it with onnxruntime and the folder's own tokenizer on TEXTS."""
    ort = pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxruntime) is not installed")
    assert main(["export", str(run), "--format", "onnx", "--output", str(folder)]) == 0
    tokens = _tokenized(folder, TEXTS, 32)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {k: tokens[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
    return torch.from_numpy(session.run(["logits"], feed)[0])


def test_onnx_export_matches_with_onnxruntime(text_run, tmp_path):
    logits = _onnx_logits(text_run, tmp_path / "onnx")
    torch.testing.assert_close(logits, _frostline_logits(text_run, TEXTS), atol=1e-4, rtol=1e-4)


def test_hf_export_of_a_transformers_classifier_loads_in_a_pipeline(classifier_run, tmp_path):
    from transformers import pipeline

    folder = tmp_path / "hf"
    assert main(["export", str(classifier_run), "--format", "hf", "--output", str(folder)]) == 0
    classify = pipeline("text-classification", model=str(folder), top_k=None, device="cpu")
    labels = json.loads((classifier_run / "head.json").read_text())["labels"]
    expected = _frostline_logits(classifier_run, TEXTS).softmax(-1)
    for scores, probs in zip(classify(TEXTS), expected, strict=True):
        got = {s["label"]: s["score"] for s in scores}
        assert got == pytest.approx(dict(zip(labels, probs.tolist(), strict=True)), abs=1e-4)


def test_hf_export_of_a_sentence_encoder_is_refused_with_the_formats_that_work(text_run, tmp_path, capsys):
    assert main(["export", str(text_run), "--format", "hf", "--output", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert "SentenceClassifier" in err and "use --format onnx or torchscript" in err
    assert not (tmp_path / "hf").exists()  # a failed export leaves nothing that could pass for one


def test_image_export_writes_down_preprocessing_that_reproduces_the_logits(image_run, pets, tmp_path):
    folder = tmp_path / "ts"
    assert main(["export", str(image_run), "--format", "torchscript", "--output", str(folder)]) == 0
    inputs = json.loads((folder / "frostline-export.json").read_text())["inputs"]
    files = sorted(pets.rglob("*.png"))[:3]
    # the preprocessing as the JSON states it, with PIL and numpy only
    pixels = []
    size = inputs["size"]
    for path in files:
        image = Image.open(path)
        image.draft("RGB", (size, size))
        image = image.convert("RGB")
        scale = size / inputs["crop_pct"] / min(image.size)
        width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((width, height), Image.Resampling.BILINEAR)
        left, top = (width - size) // 2, (height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255
        pixels.append((array - np.array(inputs["mean"])[:, None, None]) / np.array(inputs["std"])[:, None, None])
    model = torch.jit.load(str(folder / "model.pt"))
    with torch.no_grad():
        logits = model(torch.tensor(np.stack(pixels), dtype=torch.float32))
    trained = load_run(image_run)
    with torch.inference_mode():
        expected = trained.model(trained.encode_images([str(f) for f in files]))
    torch.testing.assert_close(logits, expected, atol=1e-3, rtol=1e-3)


def test_an_export_never_replaces_other_files(text_run, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    assert main(["export", str(text_run), "--format", "torchscript", "--output", str(folder)]) == 1
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(text_run), "--format", "torchscript", "--output", str(folder), "--overwrite"]) == 1
    assert "holds files that are not a frostline export" in capsys.readouterr().err
    assert (folder / "notes.txt").read_text() == "keep me"


def test_a_lora_run_is_rebuilt_with_its_adapters_and_exports_merged_to_a_pipeline(lora_run, tmp_path, capsys):
    from transformers import pipeline

    from frostline.adapters import adapted_modules

    head = json.loads((lora_run / "head.json").read_text())
    assert head["lora"].startswith("lora:r=4,alpha=8,dropout=0.05,targets=bert.encoder.layer.0.attention.self.query")
    trained = load_run(lora_run)
    assert len(adapted_modules(trained.model)) == 8  # query and value of the 4 layers, re-added before loading
    lora_b = [p for n, p in trained.model.named_parameters() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in lora_b)  # the trained adapters were loaded, not fresh zeros
    folder = tmp_path / "hf"
    assert main(["export", str(lora_run), "--format", "hf", "--output", str(folder)]) == 0
    assert "merged the LoRA adapters of 8 modules into their weights" in capsys.readouterr().out
    classify = pipeline("text-classification", model=str(folder), top_k=None, device="cpu")
    assert not any("lora" in n for n, _ in classify.model.named_parameters())
    # the merged model in the pipeline gives the adapted (unmerged) model's probabilities
    expected = _frostline_logits(lora_run, TEXTS).softmax(-1)
    for scores, probs in zip(classify(TEXTS), expected, strict=True):
        got = {s["label"]: s["score"] for s in scores}
        assert got == pytest.approx(dict(zip(head["labels"], probs.tolist(), strict=True)), abs=1e-4)


def test_a_lora_runs_onnx_export_matches_the_adapted_model(lora_run, tmp_path):
    logits = _onnx_logits(lora_run, tmp_path / "onnx")
    # the export is merged; frostline's own logits come from the run rebuilt with its adapters unmerged
    torch.testing.assert_close(logits, _frostline_logits(lora_run, TEXTS), atol=1e-4, rtol=1e-4)
