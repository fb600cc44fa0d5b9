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


@_SWALLOWED
@pytest.mark.hf
@pytest.mark.parametrize("when", ["first batch", "last batch"])
def test_generate_stops_on_a_signal_that_python_swallowed(when, tmp_path, monkeypatch, capsys):
    """A Ctrl-C landing in a __del__ while a batch ran was printed and lost: the run answered
    every request and wrote the whole output (exit status 0). Now the next batch, or the end of
    the run, sees it: exit 130, the finished answers in OUTPUT.partial, no output."""
    from prefix_attn import serve, tiny

    requests = tmp_path / "r.jsonl"
    requests.write_text("".join(json.dumps({"prompt": f"q{'x' * i}"}) + "\n" for i in range(4)))
    real, calls = tiny.left_pad, []

    def left_pad_then_signal(*a, **k):  # called once per batch, before its generate
        calls.append(1)
        if len(calls) == (1 if when == "first batch" else 2):
            _SignalInDel()
        return real(*a, **k)
    monkeypatch.setattr(serve.tiny, "left_pad", left_pad_then_signal)
    out = tmp_path / "a.jsonl"
    assert cli.main(["generate", "-i", str(requests), "-o", str(out), "--batch-size", "2",
                     "--max-new-tokens", "2", "--no-progress"]) == 130
    err = capsys.readouterr().err
    done = 2 if when == "first batch" else 4  # the batch the signal came in finishes
    assert f"prefix-attn generate: stopped: SIGINT: {done} of 4 requests were finished" in err, err
    assert not out.exists() and len((tmp_path / "a.jsonl.partial").read_text().splitlines()) == done
    assert len(calls) == (1 if when == "first batch" else 2)  # the batch after the signal never ran


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


@pytest.mark.hf
@pytest.mark.parametrize("error", [
    "cuda",  # torch.OutOfMemoryError: a batch too large for the GPU
    "cpu",   # the CPU allocator's RuntimeError
])
def test_train_out_of_memory_is_one_line_naming_what_was_kept(error, tmp_path, monkeypatch, capsys):
    """Running out of memory (a --batch-size or --projection-hidden-size too large) ended train
    in a traceback, not saying that the checkpoint of the last saved step was kept."""
    import torch

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"example {i}"}) + "\n" for i in range(8)))
    real, calls = train.train_step, []

    def step_then_oom(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            if error == "cuda":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; "
                                             "79.11 GiB total capacity)")
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                               "allocate memory: you tried to allocate 12800000000000 bytes. Error code 12")
        return real(*a, **k)
    monkeypatch.setattr(train, "train_step", step_then_oom)
    out = tmp_path / "run"
    rc = cli.main(["train", str(data), "-o", str(out), "--max-steps", "5", "--save-every", "1",
                   "--num-virtual-tokens", "2", "--eval-every", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith("prefix-attn train: error: step 3: out of memory (")
    assert "the checkpoint of step 2 in" in err and "--batch-size" in err
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 2


def test_other_runtime_errors_are_not_called_out_of_memory(tmp_path, monkeypatch):
    data = tmp_path / "data.txt"
    data.write_text("one line\nanother\n")

    def broken(*a, **k):
        raise RuntimeError("a bug")
    monkeypatch.setattr(train, "train_step", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["train", str(data), "-o", str(tmp_path / "run"), "--num-virtual-tokens", "2", "--no-progress"])
