"""``prefix-attn train --save-best`` and ``--early-stopping-patience``: OUT/best holds the step of
the lowest eval loss (the adapter a run ending there writes), the run stops after N
evaluations without improvement as HF's EarlyStoppingCallback, and --resume keeps both."""
import json
import os

import pytest
import torch

from prefix_attn import train

from test_train_cli import write_data
from test_train_multi import _examples, _write

pytestmark = pytest.mark.hf

# a high --lr through a projection: the eval loss falls to step 3, then rises for 3 steps
# (measured: 5.4862 5.4249 5.3725 5.3834 5.3931 5.3883 5.3745 5.3717 with --eval-every 1)
RISING = ["--num-virtual-tokens", "4", "--eval-every", "1", "--save-every", "2", "--no-progress", "--lr", "100",
          "--projection-hidden-size", "16"]
ARGS = ["--batch-size", "4", *RISING]


@pytest.fixture
def data(tmp_path):
    return write_data(tmp_path)


def _log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


def _weights(folder):
    return _bytes(os.path.join(folder, "adapter_model.safetensors"))


def _stop_step(log, patience, threshold=0.0):
    """Where HF's EarlyStoppingCallback stops a run of these eval losses (None: it does not)."""
    best, waited = None, 0
    for r in log:
        if best is None or best - r["eval_loss"] > threshold:
            waited = 0
        else:
            waited += 1
        best = r["eval_loss"] if best is None else min(best, r["eval_loss"])
        if waited >= patience:
            return r["step"]
    return None


def test_save_best_writes_the_step_of_the_lowest_eval_loss(data, tmp_path, capsys):
    """OUT/best/adapter is the adapter a --max-steps run ending at the best step writes; the log
    marks each new best; OUT/adapter stays the last step's; the result line names the best."""
    out, short = str(tmp_path / "run"), str(tmp_path / "short")
    assert train.main([data, "-o", out, "--max-steps", "7", "--save-best", *ARGS]) == 0
    said = capsys.readouterr().out
    log = _log(out)
    losses = [r["eval_loss"] for r in log]
    best = min(range(len(log)), key=losses.__getitem__)
    step = log[best]["step"]
    assert 1 < step < 7  # the loss rises after it: the best is not the last step
    assert [r.get("best", False) for r in log] == [x < min(losses[:i], default=float("inf"))
                                                   for i, x in enumerate(losses)]
    assert f"best eval loss {losses[best]:.4f} at step {step}: {os.path.join(out, 'best')}" in said
    assert train.main([data, "-o", short, "--max-steps", str(step), *ARGS]) == 0
    assert _weights(os.path.join(out, "best", "adapter")) == _weights(os.path.join(short, "adapter"))
    assert _weights(os.path.join(out, "adapter")) != _weights(os.path.join(short, "adapter"))
    assert json.load(open(os.path.join(out, "best", "adapter", "adapter_config.json")))[
        "base_model_name_or_path"] == os.path.abspath(os.path.join(out, "base_model"))
    assert not [f for f in os.listdir(os.path.join(out, "best", "adapter")) if f.startswith(".")]
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["best"]["step"] == step and ckpt["best"]["eval_loss"] == pytest.approx(losses[best])


@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping_stops_after_patience_evaluations_without_improvement(patience, data, tmp_path, capsys):
    """The step HF's rule gives on the full run's eval losses: exit 0, that step's checkpoint
    and adapter (a --max-steps run ending there), a note saying so."""
    full, out, short = (str(tmp_path / n) for n in ("full", "out", "short"))
    assert train.main([data, "-o", full, "--max-steps", "8", *ARGS]) == 0
    stop = _stop_step(_log(full), patience)
    assert stop is not None and stop < 8
    capsys.readouterr()
    assert train.main([data, "-o", out, "--max-steps", "8", "--early-stopping-patience", str(patience),
                       *ARGS]) == 0
    said = capsys.readouterr()
    assert [r["step"] for r in _log(out)] == list(range(1, stop + 1))
    assert f"note: stopped early at step {stop}: {patience} evaluation" in said.err
    assert said.out.startswith(f"trained {stop} steps (stopped early)")
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["step"] == stop
    assert train.main([data, "-o", short, "--max-steps", str(stop), *ARGS]) == 0
    assert _weights(os.path.join(out, "adapter")) == _weights(os.path.join(short, "adapter"))
    # resumed with more steps and the same patience: it has stopped, nothing runs
    capsys.readouterr()
    assert train.main([data, "-o", out, "--max-steps", "8", "--early-stopping-patience", str(patience),
                       "--resume", *ARGS]) == 0
    assert "nothing to run" in capsys.readouterr().err
    assert [r["step"] for r in _log(out)] == list(range(1, stop + 1))


def test_the_threshold_counts_small_falls_as_no_improvement(data, tmp_path, monkeypatch, capsys):
    """Eval losses 5.0, 4.95, 4.9, 4.7: with a threshold of 0.06 the falls of 0.05 do not count
    (patience 2 stops at step 3), yet the best is the lowest loss (step 3, in OUT/best)."""
    losses = iter([5.0, 4.95, 4.9, 4.7])
    monkeypatch.setattr(train, "eval_losses", lambda *a, **k: (next(losses), {}))
    out = str(tmp_path / "out")
    assert train.main([data, "-o", out, "--max-steps", "4", "--save-best", "--early-stopping-patience", "2",
                       "--early-stopping-threshold", "0.06", *ARGS]) == 0
    assert [r["step"] for r in _log(out)] == [1, 2, 3]
    assert [r.get("best") for r in _log(out)] == [True, True, True]
    assert "best eval loss 4.9000 at step 3" in capsys.readouterr().out


def test_resume_in_the_middle_gives_the_uninterrupted_result(data, tmp_path):
    """Stopped at step 2 (its checkpoint: best step 2), resumed: the same OUT/best, early stop,
    log and checkpoint as the uninterrupted run. A checkpoint whose OUT/best was overwritten by
    later steps (a run killed after them) puts its own best back."""
    straight, split, short = (str(tmp_path / n) for n in ("straight", "split", "short"))
    opts = ["--save-best", "--early-stopping-patience", "3", *ARGS]
    assert train.main([data, "-o", straight, "--max-steps", "20", *opts]) == 0
    assert train.main([data, "-o", split, "--max-steps", "2", *opts]) == 0
    early = _bytes(os.path.join(split, "checkpoint.pt"))
    assert train.main([data, "-o", split, "--max-steps", "20", "--resume", *opts]) == 0
    for a, b in zip(_log(straight), _log(split)):
        assert {k: v for k, v in a.items() if k != "tokens_per_s"} == {k: v for k, v in b.items()
                                                                      if k != "tokens_per_s"}
    assert len(_log(straight)) == len(_log(split)) < 20
    for folder in ("adapter", os.path.join("best", "adapter")):
        assert _weights(os.path.join(straight, folder)) == _weights(os.path.join(split, folder))
    a, b = (torch.load(os.path.join(o, "checkpoint.pt"), weights_only=True) for o in (straight, split))
    assert a["step"] == b["step"] and a["best"] == b["best"]
    # the step-2 checkpoint back (OUT/best now holds a later step): its best (step 2) returns
    with open(os.path.join(split, "checkpoint.pt"), "wb") as f:
        f.write(early)
    assert train.main([data, "-o", split, "--max-steps", "2", "--resume", *opts]) == 0
    assert train.main([data, "-o", short, "--max-steps", "2", *ARGS]) == 0
    assert _weights(os.path.join(split, "best", "adapter")) == _weights(os.path.join(short, "adapter"))


def test_a_checkpoint_without_a_best_resumes(data, tmp_path, capsys):
    """An older checkpoint (no "best"): no evaluation yet, the best so far starts at the resumed
    run's first one. A checkpoint of a run without --save-best has not kept its best prefixes:
    --save-best on its resume is refused, nothing written."""
    out = str(tmp_path / "out")
    assert train.main([data, "-o", out, "--max-steps", "2", *ARGS]) == 0
    ckpt = os.path.join(out, "checkpoint.pt")
    log = _bytes(os.path.join(out, "log.jsonl"))
    capsys.readouterr()
    assert train.main([data, "-o", out, "--max-steps", "3", "--resume", "--save-best", *ARGS]) == 2
    err = capsys.readouterr().err
    assert "prefix-attn train: error: --save-best: the checkpoint of step 2 was made without it" in err
    assert "best step (2, eval loss" in err
    assert _bytes(os.path.join(out, "log.jsonl")) == log and not os.path.exists(os.path.join(out, "best"))
    state = torch.load(ckpt, weights_only=True)
    del state["best"]
    torch.save(state, ckpt)
    assert train.main([data, "-o", out, "--max-steps", "3", "--resume", "--save-best", *ARGS]) == 0
    assert _log(out)[-1]["best"] is True  # step 3: the first evaluation it knows of
    assert f"best eval loss {_log(out)[-1]['eval_loss']:.4f} at step 3" in capsys.readouterr().out


@pytest.mark.parametrize("options, expected", [
    (["--save-best", "--eval-every", "0"], "--save-best: needs an eval loss, and --eval-every 0"),
    (["--early-stopping-patience", "2", "--eval-every", "0"],
     "--early-stopping-patience 2: needs an eval loss, and --eval-every 0"),
    (["--early-stopping-threshold", "0.1"], "--early-stopping-threshold 0.1: applies to --early-stopping-patience"),
    (["--save-best", "--eval-fraction", "0"], "--save-best: needs an eval loss, but --eval-fraction 0.0 holds out"),
    (["--early-stopping-patience", "1", "--eval-fraction", "0.01"],
     "--early-stopping-patience 1: needs an eval loss, but --eval-fraction 0.01 holds out no example"),
])
def test_options_that_cannot_work_are_refused_before_anything_is_written(options, expected, data, tmp_path,
                                                                          capsys):
    out = tmp_path / "out"
    assert train.main([data, "-o", str(out), "--no-progress", *options]) == 2
    assert f"prefix-attn train: error: {expected}" in capsys.readouterr().err
    assert not out.exists()


def test_an_output_whose_best_is_a_file_is_refused(data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "best").write_text("")
    assert train.main([data, "-o", str(out), "--save-best", *ARGS]) == 2
    assert "best there is a file" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["best"]


def test_multi_task_best_is_adapters_and_a_bank(tmp_path):
    """OUT/best/adapters/NAME and OUT/best/bank: those of a run ending at the best step."""
    data = _write(tmp_path / "multi.jsonl", _examples())
    out, short = str(tmp_path / "out"), str(tmp_path / "short")
    opts = [*ARGS, "--eval-fraction", "0.25"]
    assert train.main([data, "-o", out, "--max-steps", "6", "--save-best", *opts]) == 0
    log = _log(out)
    step = min(log, key=lambda r: r["eval_loss"])["step"]
    assert "eval_loss_by_prefix" in log[0]
    assert train.main([data, "-o", short, "--max-steps", str(step), *opts]) == 0
    assert not os.path.exists(os.path.join(out, "best", "adapter"))
    for name in ("default", "legal"):
        assert _weights(os.path.join(out, "best", "adapters", name)) == _weights(
            os.path.join(short, "adapters", name))
    from safetensors import safe_open

    banks = [safe_open(os.path.join(o, "bank", "prefix_bank.safetensors"), "pt")
             for o in (os.path.join(out, "best"), short)]
    assert banks[0].metadata() == banks[1].metadata()  # its JSON header's key order varies
    assert all(torch.equal(banks[0].get_tensor(k), banks[1].get_tensor(k)) for k in banks[1].keys())


def test_the_stop_note_does_not_say_the_best_step_failed_to_lower_itself():
    """With a threshold, an evaluation may set a new best (lower) without improving by more than
    the threshold; the note said it 'did not lower the best eval loss 5.3397 (step 20)' where
    step 20's evaluation was that best."""
    from prefix_attn.train_best import BestSoFar

    best = BestSoFar(patience=2, threshold=0.05, keep=False)
    for step, loss in ((10, 5.4247), (15, 5.3769), (20, 5.3397)):
        best.update(loss, step, snapshot=None)
    assert best.stopping and best.step == 20
    note = best.stop_note(20)
    assert "did not lower the best eval loss before it by more than 0.05" in note
    assert note.endswith("best eval loss 5.3397 at step 20")
