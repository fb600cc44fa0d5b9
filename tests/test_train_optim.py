"""`prefix-attn train`'s optimisation options: --lr-scheduler / --warmup-steps (HF Trainer's
schedules, resumed exactly), --max-grad-norm and --gradient-accumulation-steps."""
import json
import os
import signal

import pytest
import torch

from prefix_attn import train, train_schedule
from test_train_cli import _adapter, write_data

pytestmark = pytest.mark.hf


@pytest.fixture
def data(tmp_path):
    return write_data(tmp_path)

ARGS = ["--num-virtual-tokens", "4", "--batch-size", "4", "--eval-every", "0", "--no-progress", "--lr", "0.05"]


def _log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


@pytest.mark.parametrize("scheduler", train_schedule.SCHEDULERS)
@pytest.mark.parametrize("warmup", [0, 3])
def test_the_rates_are_hf_trainers(scheduler, warmup):
    """Each step's rate is the one HF Trainer's scheduler of that name gives (its
    ``get_scheduler``, stepped after each optimizer step)."""
    from transformers import get_scheduler

    total, lr = 10, 0.05
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    name = "constant_with_warmup" if scheduler == "constant" and warmup else scheduler
    hf = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
    want = []
    for _ in range(total):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        hf.step()
    got = [lr * train_schedule.lr_factor(done, total, warmup, scheduler) for done in range(total)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert (got[-1] < lr / 5) == (scheduler != "constant")


def _stopped_after(monkeypatch, steps):
    """Make train stop by SIGINT (with a checkpoint) after ``steps`` steps."""
    real, calls = train.train_step, []

    def step(*args):
        calls.append(1)
        if len(calls) == steps:
            os.kill(os.getpid(), signal.SIGINT)  # deferred: this step finishes and is saved
        return real(*args)
    monkeypatch.setattr(train, "train_step", step)


@pytest.mark.parametrize("schedule, first, total", [
    (["--lr-scheduler", "cosine", "--warmup-steps", "2"], None, 5),  # stopped by a signal at step 3
    (["--lr-scheduler", "linear"], None, 5),
    (["--warmup-steps", "4"], 2, 5),  # constant: the total grows, the first run ends warming up
])
def test_a_schedule_resumes_bitwise(schedule, first, total, data, tmp_path, monkeypatch):
    straight, split = str(tmp_path / "a"), str(tmp_path / "b")
    args = [*ARGS, *schedule, "--save-every", "0"]
    real, applied = train.train_step, []
    with monkeypatch.context() as m:  # the rate the optimizer steps with
        m.setattr(train, "train_step", lambda model, opt, *a: applied.append(opt.param_groups[0]["lr"])
                  or real(model, opt, *a))
        assert train.main([data, "-o", straight, "--max-steps", str(total), *args]) == 0
    if first is None:
        with monkeypatch.context() as m:
            _stopped_after(m, 3)
            assert train.main([data, "-o", split, "--max-steps", str(total), *args]) == 130
    else:
        assert train.main([data, "-o", split, "--max-steps", str(first), *args]) == 0
    assert train.main([data, "-o", split, "--max-steps", str(total), "--resume", *args]) == 0
    assert torch.equal(_adapter(split), _adapter(straight))
    log = _log(split)
    assert [r["step"] for r in log] == list(range(1, total + 1))
    parsed = train.build_parser().parse_args([data, "-o", split, *args])
    assert [r["lr"] for r in log] == [r["lr"] for r in _log(straight)] == applied == [
        0.05 * train_schedule.lr_factor(d, total, parsed.warmup_steps, parsed.lr_scheduler) for d in range(total)]


def test_a_decaying_schedule_refuses_another_total_on_resume(data, tmp_path, capsys):
    """Linear/cosine rates depend on the total: a resume with another one is refused in one
    line naming what to do, the checkpoint left as it was; constant may grow (above)."""
    out = str(tmp_path / "run")
    args = [*ARGS, "--lr-scheduler", "linear", "--warmup-steps", "1"]
    assert train.main([data, "-o", out, "--max-steps", "3", *args]) == 0
    before = _adapter(out)
    capsys.readouterr()
    assert train.main([data, "-o", out, "--max-steps", "6", "--resume", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prefix-attn train: error: --resume: --lr-scheduler linear decays over the "
                          "checkpoint's 3 steps, not 6") and "--max-steps 3" in err and len(err.splitlines()) == 1
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["step"] == 3
    assert torch.equal(before, _adapter(out)) and len(_log(out)) == 3


def test_a_warmup_as_long_as_a_decaying_run_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main([data, "-o", str(out), "--max-steps", "3", *ARGS, "--lr-scheduler", "cosine",
                       "--warmup-steps", "3"]) == 2
    assert "error: --warmup-steps 3 is not less than the run's 3 steps" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("option", [["--warmup-steps", "-1"], ["--gradient-accumulation-steps", "0"],
                                    ["--max-grad-norm", "0"], ["--max-grad-norm", "-1"],
                                    ["--lr-scheduler", "polynomial"]])
def test_bad_values_are_usage_errors(option, data, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        train.main([data, "-o", str(out), *ARGS, *option])
    assert exit_.value.code == 2 and f"error: argument {option[0]}: " in capsys.readouterr().err
    assert not out.exists()


def test_resume_of_a_checkpoint_older_than_the_options_takes_their_defaults(data, tmp_path, capsys):
    """A checkpoint without the new settings was made with their defaults: resumed with them,
    refused with others."""
    out = str(tmp_path / "run")
    assert train.main([data, "-o", out, "--max-steps", "1", *ARGS]) == 0
    path = os.path.join(out, "checkpoint.pt")
    ckpt = torch.load(path, weights_only=False)
    for key in ("--gradient-accumulation-steps", "--lr-scheduler", "--warmup-steps", "--max-grad-norm"):
        del ckpt["settings"][key]
    del ckpt["total_steps"]
    torch.save(ckpt, path)
    capsys.readouterr()
    assert train.main([data, "-o", out, "--max-steps", "2", "--resume", *ARGS, "--max-grad-norm", "1",
                       "--gradient-accumulation-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "--max-grad-norm: none -> 1.0" in err and "--gradient-accumulation-steps: 1 -> 2" in err
    assert train.main([data, "-o", out, "--max-steps", "2", "--resume", *ARGS]) == 0


def test_max_grad_norm_clips_and_logs_the_norm(data, tmp_path, monkeypatch):
    """The optimizer steps on gradients of norm at most X; the log gives the norm before
    clipping (and no grad_norm without the option)."""
    seen = []
    real = torch.optim.AdamW.step

    def step(self, *a, **k):
        seen.append(float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for g in self.param_groups for p in g["params"]]))))
        return real(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    clipped, plain = str(tmp_path / "a"), str(tmp_path / "b")
    assert train.main([data, "-o", plain, "--max-steps", "2", *ARGS]) == 0
    assert "grad_norm" not in _log(plain)[0]
    unclipped, seen[:] = list(seen), []
    assert train.main([data, "-o", clipped, "--max-steps", "2", *ARGS, "--max-grad-norm", "1e-3"]) == 0
    norms = [r["grad_norm"] for r in _log(clipped)]
    assert norms[0] == pytest.approx(unclipped[0], rel=1e-5) and norms[0] > 1e-2
    assert seen == pytest.approx([1e-3, 1e-3], rel=1e-4)


def test_a_non_finite_gradient_norm_stops_the_run_naming_the_step(data, tmp_path, monkeypatch, capsys):
    real = train.train_step

    def poisoned(model, opt, *args):
        if opt.state_dict()["state"]:  # from the second step on: a gradient of inf
            hooks = [p.register_hook(lambda g: g * float("inf")) for g in opt.param_groups for p in g["params"]]
            try:
                return real(model, opt, *args)
            finally:
                for hook in hooks:
                    hook.remove()
        return real(model, opt, *args)
    monkeypatch.setattr(train, "train_step", poisoned)
    out = str(tmp_path / "run")
    assert train.main([data, "-o", out, "--max-steps", "3", "--save-every", "1", *ARGS, "--max-grad-norm", "1"]) == 1
    err = capsys.readouterr().err
    assert "error: step 2: the gradient norm is " in err and "checkpoint of step 1" in err, err
    assert [r["step"] for r in _log(out)] == [1]
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["step"] == 1


@pytest.mark.parametrize("pack", [False, True])
def test_micro_batches_give_the_big_batch_s_loss_and_gradient(pack, tmp_path):
    """train_step over micro-batches of 2 weights each one's mean loss by its learnt tokens:
    the loss and the prefix gradient of the 6 examples in one forward (the micro-batches
    learn different numbers of tokens, so a plain mean of their means would differ)."""
    from prefix_attn.tiny import ByteTokenizer, default_model
    from prefix_attn.tuning import prefix_tuning

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}:", "completion": " answer" * (1 + i // 2)}) + "\n"
                            for i in range(6)))
    tok = ByteTokenizer()
    rows = train.prepare(tok, train.read_examples_at(str(data)), 64, tok.vocab_size, str(data))
    model = default_model(seed=0)
    module = prefix_tuning(model, num_virtual_tokens=4, name="t")
    opt = torch.optim.SGD(module.parameters(), lr=0.0)  # the gradients stay for comparison
    results = {}
    for micro in (None, 2):
        loss, tokens, norm = train.train_step(model, opt, rows, tok.pad_token_id, "t", pack, None, micro)
        results[micro] = loss, tokens, [p.grad.clone() for p in module.parameters()]
    (big_loss, big_tokens, big_grads), (loss, tokens, grads) = results[None], results[2]
    assert tokens == big_tokens and loss == pytest.approx(big_loss, rel=1e-5)
    for got, want in zip(grads, big_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    counts = [int((train.collate(rows[i:i + 2], tok.pad_token_id)[2][:, 1:] != -100).sum()) for i in (0, 2, 4)]
    assert len(set(counts)) > 1, counts


@pytest.mark.parametrize("pack", [[], ["--pack"]])
def test_accumulation_runs_the_big_batch_s_examples_a_micro_batch_at_a_time(pack, data, tmp_path, monkeypatch):
    """A step of --batch-size 2 x --gradient-accumulation-steps 3 trains on the examples
    --batch-size 6 draws, forwarding 2 at a time, with its loss and tokens in the log."""
    forwarded = []

    def recording(real):
        def collate(batch, *a):
            forwarded.append([tuple(ids) for ids, _ in batch])
            return real(batch, *a)
        return collate
    monkeypatch.setattr(train, "collate", recording(train.collate))
    monkeypatch.setattr(train, "collate_packed", recording(train.collate_packed))
    outs, seen = {}, {}
    for batch, k in ((6, 1), (2, 3)):
        forwarded.clear()
        outs[k] = out = str(tmp_path / f"k{k}")
        assert train.main([data, "-o", out, "--max-steps", "2", *ARGS, *pack, "--batch-size", str(batch),
                           "--gradient-accumulation-steps", str(k)]) == 0
        assert [len(rows) for rows in forwarded] == [batch] * (2 * k)
        seen[k] = [ex for rows in forwarded for ex in rows]
    assert seen[3] == seen[1]
    big, small = _log(outs[1]), _log(outs[3])
    assert [r["loss"] for r in small] == pytest.approx([r["loss"] for r in big], rel=1e-5)
    torch.testing.assert_close(_adapter(outs[3]), _adapter(outs[1]), rtol=1e-4, atol=1e-6)
