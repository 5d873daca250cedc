"""Long texts read in several windows (data.windows): the encoding, the model's pooling, and the run around it."""

import pytest
import torch

from conftest import tiny_bert
from frostline.sources.data import encode_texts
from frostline.sources.sentence import SentenceClassifier, pool


def _tokenizer():
    from frostline.sources.text import open_tokenizer

    return open_tokenizer("minilm")


def _sentence_model(pooling="mean"):
    model, _ = tiny_bert(vocab_size=30522)
    return SentenceClassifier(model.bert, 3, pooling=pooling).eval()


LONG = " ".join(f"word{i}" for i in range(60))  # about 180 word pieces: three windows of 64


def test_texts_that_fit_one_window_keep_the_usual_shape():
    tokenizer = _tokenizer()
    one = encode_texts(tokenizer, ["a short text", "another"], 16)
    three = encode_texts(tokenizer, ["a short text", "another"], 16, windows=3)
    assert three["input_ids"].shape == (2, 16)
    assert all(torch.equal(one[k], three[k]) for k in one)


def test_a_long_text_continues_in_the_next_windows_each_with_its_special_tokens():
    tokenizer = _tokenizer()
    encoded = encode_texts(tokenizer, [LONG, "short"], 64, windows=4)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    body = tokenizer(LONG, add_special_tokens=False)["input_ids"]
    used = -(-len(body) // 62)
    assert ids.shape == (2, min(used, 4), 64) and used >= 2
    # the first window is what one window of 64 tokens reads
    torch.testing.assert_close(ids[0, 0], encode_texts(tokenizer, [LONG], 64)["input_ids"][0])
    # every window is [CLS] piece [SEP]; together they hold the text's first 62 * windows tokens in order
    pieces = []
    for w in range(ids.shape[1]):
        row = ids[0, w][mask[0, w] == 1].tolist()
        assert row[0] == tokenizer.cls_token_id and row[-1] == tokenizer.sep_token_id
        pieces += row[1:-1]
    assert pieces == body[: 62 * ids.shape[1]]
    # the short text has one window; the others are padding with a zero mask
    assert mask[1, 0].sum() > 0 and mask[1, 1:].sum() == 0


def test_windows_pool_as_one_text_and_empty_windows_change_nothing():
    tokenizer = _tokenizer()
    model = _sentence_model()
    encoded = encode_texts(tokenizer, [LONG, "short"], 24, windows=3)
    assert encoded["input_ids"].dim() == 3
    with torch.no_grad():
        pooled = model.embed(encoded["input_ids"], encoded["attention_mask"], encoded["token_type_ids"])
        # by hand: each window through the encoder, the token states of all windows averaged together
        flat = {k: v[0] for k, v in encoded.items()}
        hidden = model.encoder(**flat).last_hidden_state
        mask = flat["attention_mask"].unsqueeze(-1).float()
        expected = (hidden * mask).sum(dim=(0, 1)) / mask.sum()
        alone = model.embed(**{k: v[1, :1] for k, v in encoded.items()})
    torch.testing.assert_close(pooled[0], expected, atol=1e-5, rtol=1e-4)
    # the short text, read in a batch with padded windows, is pooled as if it were read alone
    torch.testing.assert_close(pooled[1], alone[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["max", "cls"])
def test_max_and_cls_pooling_over_windows(mode):
    tokenizer = _tokenizer()
    model = _sentence_model(mode)
    encoded = encode_texts(tokenizer, [LONG], 24, windows=2)
    with torch.no_grad():
        pooled = model.embed(**encoded)[0]
        hidden = model.encoder(**{k: v[0] for k, v in encoded.items()}).last_hidden_state
    per_window = pool(hidden, encoded["attention_mask"][0], mode)
    expected = per_window.amax(dim=0) if mode == "max" else per_window.mean(dim=0)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-4)


def test_windows_on_image_data_are_refused_with_the_fix():
    from frostline.config import DataConfig
    from frostline.dataset import prepare_data
    from frostline.errors import ConfigError

    with pytest.raises(
        ConfigError, match="data.windows=2 reads long texts.*'mnist' is image data; set data.windows to 1"
    ):
        prepare_data(DataConfig(ref="mnist", windows=2), None, 0)
