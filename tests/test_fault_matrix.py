"""Issue 11's acceptance test: every bad input through the CLI gets one message, no traceback, and loses no file.

The cases and the runner live in tests/fault_matrix.py (also runnable by hand against any source tree, with a
markdown table). Here they run against this checkout's src/, two at a time, once per session; a test reads its
case's result and asserts the outcome the fixed code must give.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import fault_matrix as fm

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def results(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, fm.Result]:
    """Run the selected cases (all of them unless -k narrows the run) two at a time; the shared runs are made once."""
    module = sys.modules[__name__]
    chosen = {
        item.callspec.params["case"].id
        for item in request.session.items
        if getattr(item, "module", None) is module and hasattr(item, "callspec")
    }
    cases = [c for c in fm.CASES if c.id in chosen and not (c.skip and c.skip())]
    assets = fm.build_assets(tmp_path_factory.mktemp("fault-assets"), SRC, needs={n for c in cases for n in c.needs})
    return fm.run_cases(cases, assets, tmp_path_factory.mktemp("fault-cases"), jobs=2)


@pytest.mark.parametrize("case", fm.CASES, ids=[c.id for c in fm.CASES])
def test_fault(case: fm.Case, results: dict[str, fm.Result]) -> None:
    why = case.skip() if case.skip else None
    if why:
        pytest.skip(why)
    result = results[case.id]
    found = fm.problems(result)
    assert not found, fm.explain(result, found)


def test_snapshot_sees_changed_removed_and_new_files(tmp_path: Path) -> None:
    """The harness itself can fail a case: a rewritten, a deleted and a new file all show."""
    (tmp_path / "a.txt").write_text("mine")
    (tmp_path / "b.txt").write_text("mine too")
    before = fm.snapshot(tmp_path)
    (tmp_path / "a.txt").write_text("mine!")
    (tmp_path / "b.txt").unlink()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    after = fm.snapshot(tmp_path)
    assert [p for p in before if p in after and before[p] != after[p]] == ["a.txt"]
    assert [p for p in before if p not in after] == ["b.txt"]
    assert fm._collapse([p for p in after if p not in before]) == ["run/"]
