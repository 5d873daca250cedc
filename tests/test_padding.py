"""Padding shared by a whole batch is cut before the model runs: the same results for less compute."""

import torch

from conftest import tiny_bert
from frostline.batches import TensorBatches, trim_padding
from frostline.sources.sentence import SentenceClassifier
from frostline.train.cache import _padded_like


def _batch(lengths, total=8):
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = torch.randint(5, 100, mask.shape, generator=torch.Generator().manual_seed(0)) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def test_positions_padded_in_every_example_are_cut_and_nothing_else():
    batch = {**_batch([3, 5]), "other": torch.ones(2, 3)}
    trimmed = trim_padding(batch)
    assert trimmed["input_ids"].shape == (2, 5) and trimmed["attention_mask"].sum() == 8
    assert torch.equal(trimmed["input_ids"], batch["input_ids"][:, :5]) and torch.equal(
        trimmed["other"], batch["other"]
    )
    full = _batch([8, 2])
    assert trim_padding(full) is full
    assert trim_padding(torch.ones(2, 8)).shape == (2, 8)


def test_windows_that_no_example_of_the_batch_reaches_are_cut():
    mask = torch.zeros(2, 3, 6, dtype=torch.long)
    mask[0, 0, :4] = 1
    mask[1, 0, :6] = 1
    mask[1, 1, :2] = 1
    states = torch.randn(2, 3, 6, 4)
    trimmed = trim_padding({"attention_mask": mask, "hidden": states})
    assert trimmed["attention_mask"].shape == (2, 2, 6) and trimmed["hidden"].shape == (2, 2, 6, 4)


def test_a_sentence_encoder_gives_the_same_logits_on_the_trimmed_batch():
    bert, _ = tiny_bert(vocab_size=120)
    model = SentenceClassifier(bert.bert, 3).eval()
    batch = _batch([3, 5, 2], total=12)
    with torch.no_grad():
        full, short = model(**batch), model(**trim_padding(batch))
    torch.testing.assert_close(full, short, atol=1e-5, rtol=1e-4)


def test_batches_are_served_trimmed_and_cached_token_states_are_padded_back():
    batch = _batch([3, 5, 2, 4])
    served = [inputs["input_ids"].shape[1] for inputs, _ in TensorBatches(batch, torch.arange(4), 2)]
    assert served == [5, 4]
    trimmed = trim_padding(batch)
    states = torch.randn(4, 5, 3)
    restored = _padded_like({"hidden": states, "attention_mask": trimmed["attention_mask"]}, batch)
    assert torch.equal(restored["attention_mask"], batch["attention_mask"])
    assert restored["hidden"].shape == (4, 8, 3) and torch.equal(restored["hidden"][:, :5], states)
    assert restored["hidden"][:, 5:].abs().sum() == 0


def _sentence_batch(lengths, total=12):
    batch = _batch(lengths, total)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def test_the_cache_pass_runs_texts_by_length_and_returns_features_in_the_datas_order():
    from frostline.inspect import inspect_model
    from frostline.train.cache import Ahead, FeatureCache
    from frostline.train.runtime import select_runtime
    from frostline.train.tails import block_tail, head_tail

    bert, _ = tiny_bert(vocab_size=120)
    model = SentenceClassifier(bert.bert, 3).eval()
    inputs = _sentence_batch([12, 2, 7, 3, 12, 1, 5])
    model_map = inspect_model(model, {k: v[:2] for k, v in inputs.items()})
    runtime = select_runtime("cpu", "fp32")
    cache = FeatureCache(None, 64.0, torch.float32)
    with torch.no_grad():
        expected = torch.cat([model.embed(**{k: v[i : i + 1] for k, v in inputs.items()}) for i in range(7)])
        pooled = cache.get(model, head_tail(model, model_map), "head", inputs, runtime, batch_size=2)[0].features
        torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-4)
        # token states at a block: padded back to the data's length, in the data's order, and the tail's logits match
        tail = block_tail(model, model_map, "encoder.encoder.layer.2")
        states = cache.get(model, tail, "block", inputs, runtime, batch_size=2)[0].features
        assert states["hidden"].shape == (7, 12, 32) and torch.equal(states["attention_mask"], inputs["attention_mask"])
        logits = torch.cat([b for b, _ in [(tail.forward(x), y) for x, y in TensorBatches(states, torch.zeros(7), 3)]])
        torch.testing.assert_close(logits, model(**inputs), atol=1e-5, rtol=1e-4)
        # the head's pass keeps the same token states for a later stage, in the same order and shape
        fresh = FeatureCache(None, 64.0, torch.float32)
        head, kept = fresh.get(
            model, head_tail(model, model_map), "head", inputs, runtime, batch_size=2, ahead=[Ahead(tail, "block", "")]
        )
        torch.testing.assert_close(head.features, pooled)
        assert not head.features.is_inference() and not kept[0][1].features["hidden"].is_inference()
        assert kept[0][1].where == "memory" and fresh.has("block")
        for name in ("hidden", "attention_mask"):
            torch.testing.assert_close(kept[0][1].features[name], states[name], atol=1e-6, rtol=1e-5)
        assert (
            fresh.get(model, tail, "block", inputs, runtime, 2)[0].where
            == "memory (kept by the pass for inputs of the head classifier)"
        )
