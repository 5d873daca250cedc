"""The CLI's outermost layer: every failure is one line and exit code 1; --debug shows the traceback."""

import pytest

from frostline.cli import main as cli


def _raising(error):
    def run(args):
        raise error

    return run


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (
            ZeroDivisionError("division by zero"),
            "error: unexpected ZeroDivisionError: division by zero. frostline does "
            "not check this input yet; run `frostline --debug inspect ...` for the traceback and report it",
        ),
        (PermissionError(13, "Permission denied", "/root/x"), "error: Permission denied: /root/x"),
        (MemoryError(), "error: out of memory; use a smaller data.batch_size"),
    ],
)
def test_anything_that_escapes_is_one_line_and_exit_1(monkeypatch, capsys, error, message):
    monkeypatch.setattr(cli.inspect_cmd, "run", _raising(error))
    assert cli.main(["inspect", "hf:minilm"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == message or err.startswith(message)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setattr(cli.inspect_cmd, "run", _raising(ZeroDivisionError("division by zero")))
    with pytest.raises(ZeroDivisionError):
        cli.main(["--debug", "inspect", "hf:minilm"])
