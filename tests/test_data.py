import json

import numpy as np
import pytest
import torch

from frostline.batches import TensorBatches
from frostline.errors import ConfigError
from frostline.sources.data import load_bbc_news, open_text_data, stratified_split


@pytest.fixture(scope="module")
def bbc():
    return load_bbc_news()


def test_bbc_news_is_read_with_duplicates_dropped(bbc):
    assert len(bbc) == 2225 - 98
    assert bbc.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(set(bbc.texts)) == len(bbc.texts)
    assert bbc.notes == ("dropped 98 exact duplicate articles", "1 file(s) read as latin-1")
    assert np.bincount(bbc.labels).tolist() == [503, 369, 403, 505, 347]


def test_stratified_split_keeps_class_shares_and_is_seeded(bbc):
    train, val = stratified_split(bbc.labels, 0.2, seed=0)
    again, _ = stratified_split(bbc.labels, 0.2, seed=0)
    other, _ = stratified_split(bbc.labels, 0.2, seed=1)

    assert len(train) + len(val) == len(bbc) and not set(train) & set(val)
    assert np.array_equal(train, again) and not np.array_equal(train, other)
    shares = np.bincount(np.asarray(bbc.labels)[val]) / np.bincount(bbc.labels)
    assert np.allclose(shares, 0.2, atol=0.01)


def test_csv_and_jsonl_files(tmp_path):
    (tmp_path / "d.csv").write_text("body,topic\nhello there,pos\nawful day,neg\n,neg\nfine,pos\n")
    with (tmp_path / "d.jsonl").open("w") as f:
        for text, label in [("a", 2), ("b", 10), ("c", 2)]:
            f.write(json.dumps({"text": text, "label": label}) + "\n")

    csv_data = open_text_data(str(tmp_path / "d.csv"), text_column="body", label_column="topic")
    assert csv_data.texts == ["hello there", "awful day", "fine"]
    assert csv_data.label_names == ["neg", "pos"] and csv_data.labels == [1, 0, 1]
    assert csv_data.notes == ("skipped 1 rows with an empty text or label",)

    jsonl = open_text_data(str(tmp_path / "d.jsonl"))
    assert jsonl.label_names == ["2", "10"] and jsonl.labels == [0, 1, 0]


@pytest.mark.parametrize(
    ("content", "kwargs", "message"),
    [
        ("text,labels\na,1\nb,2\n", {}, "label_column='label' is not a column of .*; did you mean labels\\?"),
        ("text,label\na,1\nb,1\n", {}, "holds a single class \\('1'\\)"),
        ("text,label\n", {}, "holds no labelled examples"),
    ],
)
def test_bad_text_files_are_config_errors(tmp_path, content, kwargs, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        open_text_data(str(path), **kwargs)


def test_unknown_data_reference():
    with pytest.raises(ConfigError, match="did you mean bbcnews"):
        open_text_data("bbcnew")
    with pytest.raises(ConfigError, match="does not exist"):
        open_text_data("/no/such.csv")


def test_tensor_batches_cover_every_example_once_per_pass():
    inputs = {"input_ids": torch.arange(10).unsqueeze(1)}
    batches = TensorBatches(inputs, torch.arange(10), batch_size=4, shuffle=True, seed=0)

    first = torch.cat([b[1] for b in batches])
    second = torch.cat([b[1] for b in batches])
    assert len(batches) == 3
    assert sorted(first.tolist()) == list(range(10)) and not torch.equal(first, second)
    assert all(torch.equal(x["input_ids"].squeeze(1), y) for x, y in batches)
