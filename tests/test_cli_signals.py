"""Ctrl-C (SIGINT) ends every `prefix-attn` command cleanly: exit status 130, a one-line
message, no traceback, and train's promise (it stops, with a checkpoint of its last step)
kept even when the signal lands where Python cannot raise it."""
import json
import os
import signal

import pytest

from prefix_attn import cli, train
from prefix_attn.train_state import Interrupted, StopSignals


class _SignalInDel:
    """Sends SIGINT to this process from its ``__del__``: the handler runs there, and Python only
    prints what a ``__del__`` raises ("Exception ignored in ...") and goes on. A garbage
    collection in any library (regex's Group.__del__ in transformers, seen in a real run)
    does that to a Ctrl-C that comes at the wrong moment."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10000):  # the handler runs at one of these bytecodes, inside __del__
            pass


_SWALLOWED = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@_SWALLOWED
def test_a_signal_raised_inside_a_del_is_still_seen():
    with StopSignals() as signals:
        _SignalInDel()
        assert signals.received == signal.SIGINT
        with pytest.raises(Interrupted):
            signals.raise_if_received()


@_SWALLOWED
@pytest.mark.hf
def test_train_stops_on_a_signal_that_python_swallowed(tmp_path, monkeypatch, capsys):
    """A Ctrl-C while the model loaded raised Interrupted inside a __del__: Python printed it
    and went on, and the run trained to the end (exit status 0)."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"example {i}"}) + "\n" for i in range(8)))
    real = train.start_log

    def start_log_then_signal(*a, **k):
        real(*a, **k)
        _SignalInDel()
    monkeypatch.setattr(train, "start_log", start_log_then_signal)
    out = tmp_path / "run"
    assert cli.main(["train", str(data), "-o", str(out), "--max-steps", "3", "--num-virtual-tokens", "2",
                     "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "prefix-attn train: stopped: SIGINT: nothing was saved" in err
    assert (out / "log.jsonl").read_text() == "" and not (out / "adapter").exists()


@pytest.mark.parametrize("command", ["demo", "check"])
def test_ctrl_c_in_demo_and_check_is_a_clean_stop(command, monkeypatch, capsys):
    """demo and check had no handler: Ctrl-C ended them in a KeyboardInterrupt traceback."""
    import importlib

    module = importlib.import_module(f"prefix_attn.{command}")

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(module, "run", interrupted)
    assert cli.main([command]) == 130
    assert capsys.readouterr().err == f"prefix-attn {command}: stopped: SIGINT\n"
