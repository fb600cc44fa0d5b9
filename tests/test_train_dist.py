"""``prefix-attn train`` data-parallel under torchrun (2 CPU processes, gloo): the adapter of a
one-process run with twice the batch, rank 0 alone writing, errors said once with one exit
status on every rank, a signal stopping every rank after the same step, --resume."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from prefix_attn import train

from test_train_cli import write_data

pytestmark = pytest.mark.hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--num-virtual-tokens", "4", "--eval-every", "2", "--save-every", "2", "--no-progress", "--lr", "0.05"]


def _env(rank, world, port):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(argv, world=2):
    """The ranks of ``prefix-attn train argv`` as torchrun starts them (its environment)."""
    port = _free_port()
    return [subprocess.Popen([sys.executable, "-m", "prefix_attn.cli", "train", *argv], env=_env(r, world, port),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
            for r in range(world)]


def _finish(procs, timeout=240):
    """[(exit status, stdout, stderr)] of each rank, killing all rather than hanging."""
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def _run(argv, world=2):
    return _finish(_start(argv, world))


def _torchrun(argv):
    """``torchrun --standalone --nproc-per-node 2 -m prefix_attn.cli train argv``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "prefix_attn.cli", "train", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)


def _log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def _tensors(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def _multi_data(folder):
    path = folder / "multi.jsonl"
    with open(path, "w") as f:
        for i in range(15):
            ex = {"prompt": f"Q{i % 3}:", "completion": " answer" * (1 + i % 3)}
            if i % 2:
                ex["prefix"] = "legal"
            f.write(json.dumps(ex) + "\n")
    return str(path)


def _assert_same_run(one, two, adapters):
    """The logs' losses and the adapters of two runs agree to float tolerance."""
    a, b = _log(one), _log(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "eval_loss"):
            assert (key in ra) == (key in rb)
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5)
        if "eval_loss_by_prefix" in ra:
            assert rb["eval_loss_by_prefix"] == pytest.approx(ra["eval_loss_by_prefix"], rel=1e-5)
    for folder in adapters:
        x, y = _tensors(os.path.join(one, folder)), _tensors(os.path.join(two, folder))
        for key in x:
            torch.testing.assert_close(y[key], x[key], rtol=1e-4, atol=1e-6)


def test_torchrun_two_processes_give_one_process_with_twice_the_batch(tmp_path):
    """Through torchrun itself: --batch-size 2 on 2 processes, 2 micro-batches a step, the 14
    examples (12 to train: a short last step) over 4 steps; rank 0 alone writes and prints."""
    data = write_data(tmp_path)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    steps = ["--max-steps", "4", "--gradient-accumulation-steps", "2"]
    assert train.main([data, "-o", one, "--batch-size", "4", *steps, *ARGS]) == 0
    done = _torchrun([data, "-o", two, "--batch-size", "2", *steps, *ARGS])
    assert done.returncode == 0, done.stderr
    _assert_same_run(one, two, ["adapter"])
    assert done.stdout.count("trained 4 steps") == 1  # rank 0's result line only
    assert torch.load(os.path.join(two, "checkpoint.pt"), weights_only=True)["settings"][
        "WORLD_SIZE (torchrun's processes)"] == 2


@pytest.mark.parametrize("pack", [False, True])
def test_multi_task_and_pack_distributed(tmp_path, pack):
    """Two prefixes, padded or --pack: each prefix's adapter and the per-prefix eval losses
    are the one-process run's with twice the batch (a prefix missing from a rank's rows)."""
    data = _multi_data(tmp_path)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    opts = ["--max-steps", "3", "--eval-fraction", "0.2", *(["--pack"] if pack else []), *ARGS]
    assert train.main([data, "-o", one, "--batch-size", "4", *opts]) == 0
    ranks = _run([data, "-o", two, "--batch-size", "2", *opts])
    assert [rc for rc, _, _ in ranks] == [0, 0], ranks[0][2] + ranks[1][2]
    _assert_same_run(one, two, [os.path.join("adapters", "default"), os.path.join("adapters", "legal")])
    assert "eval_loss_by_prefix" in _log(two)[-1]


def test_resume_distributed_and_refused_with_another_world_size(tmp_path, capsys):
    """A 2-process run resumed on 2 processes gives the uninterrupted 2-process run's adapter
    (here: the one-process run with twice the batch); resumed in one process it is refused."""
    data = write_data(tmp_path)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert train.main([data, "-o", one, "--batch-size", "4", "--max-steps", "4", *ARGS]) == 0
    assert [rc for rc, _, _ in _run([data, "-o", two, "--batch-size", "2", "--max-steps", "2", *ARGS])] == [0, 0]
    ranks = _run([data, "-o", two, "--batch-size", "2", "--max-steps", "4", "--resume", *ARGS])
    assert [rc for rc, _, _ in ranks] == [0, 0], ranks[0][2] + ranks[1][2]
    _assert_same_run(one, two, ["adapter"])
    capsys.readouterr()
    assert train.main([data, "-o", two, "--batch-size", "2", "--max-steps", "6", "--resume", *ARGS]) == 2
    assert "WORLD_SIZE (torchrun's processes): 2 -> 1" in capsys.readouterr().err


def test_a_data_error_is_said_once_and_every_rank_exits_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"completion": 3}\n')
    out = tmp_path / "out"
    ranks = _run([str(bad), "-o", str(out), *ARGS])
    assert [rc for rc, _, _ in ranks] == [2, 2]
    said = [err for _, _, err in ranks if "error:" in err]
    assert len(said) == 1 and "bad.jsonl:2: field 'completion' must be a string" in said[0]
    assert not out.exists()


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """SIGTERM reaches rank 1 alone: both ranks stop after the same step, exit 143, and rank 0
    writes that step's checkpoint (the log's last step); rank 0 alone says so."""
    data = write_data(tmp_path)
    out = tmp_path / "out"
    procs = _start([data, "-o", str(out), "--batch-size", "2", "--max-steps", "100000", "--eval-every", "0",
                    "--save-every", "0", "--no-progress", "--num-virtual-tokens", "4"])
    try:
        deadline = time.monotonic() + 120
        while not (out / "log.jsonl").exists() or not (out / "log.jsonl").read_text():
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
    finally:
        ranks = _finish(procs)
    assert [rc for rc, _, _ in ranks] == [143, 143], ranks[0][2] + ranks[1][2]
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert _log(str(out))[-1]["step"] == step
    assert "stopped: SIGTERM" in ranks[0][2] and "stopped" not in ranks[1][2]


def test_process_group_that_does_not_start_is_named(tmp_path, monkeypatch, capsys):
    for key, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    out = tmp_path / "out"
    assert train.main([write_data(tmp_path), "-o", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot start the process group" in err and "MASTER_ADDR=(unset)" in err and "MASTER_PORT" in err
    assert not out.exists()


@pytest.mark.parametrize("options, local_rank, expected", [
    (["--dist-backend", "nccl"], 0, "--dist-backend nccl needs --device cuda"),
    (["--device", "cuda"], 1, "LOCAL_RANK 1, but this machine shows 1 GPU"),
    (["--device", "cuda:0"], 0, "pass --device cuda"),
])
def test_devices_and_backends_that_cannot_work(tmp_path, monkeypatch, capsys, options, local_rank, expected):
    """Refused before the process group starts (a CUDA machine of one GPU faked)."""
    for key, value in (("WORLD_SIZE", "2"), ("RANK", str(local_rank)), ("LOCAL_RANK", str(local_rank)),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    out = tmp_path / "out"
    assert train.main([write_data(tmp_path), "-o", str(out), "--no-progress", *options]) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()
    if local_rank == 0:  # an error of the options, every rank's alike: rank 0 alone says it
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("LOCAL_RANK", "1")
        assert train.main([write_data(tmp_path), "-o", str(out), "--no-progress", *options]) == 2
        assert capsys.readouterr().err == ""


def test_the_closing_barrier_of_a_rank_whose_peer_already_left_does_not_raise(monkeypatch):
    """Ctrl-C during the set-up: a rank waiting in ready()'s all-reduce gets its signal once
    the reduce returns and leaves alone ("rank 1: stopped"), while the rank that agreed on the
    stop waits at the closing barrier: gloo's "Connection reset by peer" there was a traceback
    and exit status 1 on rank 0 instead of its 130."""
    import torch.distributed as dist

    from prefix_attn import train_dist

    calls = []

    def barrier():
        raise RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer")

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", barrier)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroyed"))
    group = train_dist.Group(0, 2, 0, torch.device("cpu"), "gloo")
    group.close(wait=True)
    assert calls == ["destroyed"]


def test_early_stopping_and_save_best_distributed(tmp_path):
    """Every rank gets the same eval loss (summed over the ranks), so all stop after the same
    step, exit 0 (a rank going on alone would hang in the next all-reduce): the step HF's rule
    gives on the log's eval losses; rank 0 alone writes OUT/best and says so. (At --lr 100 the
    two runs part beyond float tolerance: no comparison with the one-process run.)"""
    from test_train_best import RISING, _stop_step

    data = write_data(tmp_path)
    out = str(tmp_path / "two")
    ranks = _run([data, "-o", out, "--batch-size", "2", "--max-steps", "8", "--save-best",
                  "--early-stopping-patience", "1", *RISING])
    assert [rc for rc, _, _ in ranks] == [0, 0], ranks[0][2] + ranks[1][2]
    log = _log(out)
    assert len(log) < 8 and log[-1]["step"] == _stop_step(log, 1)
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["step"] == len(log)
    assert os.path.isfile(os.path.join(out, "best", "adapter", "adapter_model.safetensors"))
    assert "stopped early" in ranks[0][2] and "stopped early" not in ranks[1][2]
    assert ranks[0][1].count("best eval loss") == 1 and ranks[1][1] == ""
