import json

import pytest

from frostline.cli.main import main
from frostline.sources.data import load_bbc_news


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory):
    data = load_bbc_news()
    path = tmp_path_factory.mktemp("data") / "news.csv"
    rows = ["text,label"] + [
        '"{}",{}'.format(t[:300].replace('"', "'"), data.label_names[y])
        for t, y in list(zip(data.texts, data.labels, strict=True))[::10]
    ]
    path.write_text("\n".join(rows))
    return path


def test_lr_find_writes_a_png_and_prints_the_suggestion(small_csv, tmp_path, capsys):
    png = tmp_path / "plot" / "lr.png"
    code = main(
        [
            "lr-find",
            "hf:minilm",
            "--data",
            str(small_csv),
            "--steps",
            "30",
            "--max-length",
            "32",
            "--batch-size",
            "8",
            "--start-lr",
            "1e-5",
            "--end-lr",
            "10",
            "--output",
            str(png),
            "--json",
        ]
    )
    captured = capsys.readouterr()

    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert 1e-5 <= result["suggestion"] <= 10
    assert result["method"] in ("valley", "steepest")
    assert len(result["lrs"]) == len(result["losses"]) <= 30
    assert "suggested base learning rate" in captured.err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 20_000


def test_lr_find_bad_column_is_one_message(small_csv, capsys):
    assert main(["lr-find", "--data", str(small_csv), "--label-column", "topic"]) == 1
    assert "label_column='topic' is not a column" in capsys.readouterr().err
