"""`prefix-attn train`: runs, logs, evaluates, saves a PEFT adapter, resumes exactly."""
import json
import os

import pytest
import torch

from prefix_attn import train, train_data

pytestmark = pytest.mark.hf


def write_data(folder) -> str:
    """14 prompt/completion examples in ``folder``/data.jsonl."""
    path = folder / "data.jsonl"
    with open(path, "w") as f:
        for i in range(14):
            f.write(json.dumps({"prompt": f"Q{i % 3}:", "completion": f" answer {i % 4}"}) + "\n")
    return str(path)


@pytest.fixture
def data(tmp_path):
    return write_data(tmp_path)


ARGS = ["--num-virtual-tokens", "4", "--batch-size", "4", "--eval-every", "2", "--save-every", "1",
        "--no-progress", "--lr", "0.05", "--epochs", "3"]


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))["prompt_embeddings"]


def test_train_writes_log_checkpoint_and_a_peft_adapter(data, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    import prefix_attn

    out = str(tmp_path / "run")
    assert train.main([data, "-o", out, "--max-steps", "4", *ARGS]) == 0
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(r["tokens_per_s"] > 0 and r["loss"] > 0 for r in log)
    assert "eval_loss" in log[1] and "eval_loss" in log[3]
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]  # atomic writes left nothing
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert ckpt["step"] == 4
    # the adapter loads in PEFT on the saved base model and gives our logits
    base_dir = os.path.join(out, "base_model")
    base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="sdpa")
    pm = peft.PeftModel.from_pretrained(base, os.path.join(out, "adapter")).eval()
    ours = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="prefix_attn").eval()
    prefix_attn.PrefixBank.attach(ours).load_peft("t", os.path.join(out, "adapter"))
    ids = torch.randint(3, 200, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, prefixes=["t", "t"]).logits, pm(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)
    assert torch.equal(_adapter(out), ckpt["prefix"]["embedding.weight"])
    assert log[3]["eval_loss"] < log[1]["eval_loss"]  # it learns


def test_resume_gives_the_uninterrupted_result(data, tmp_path, capsys):
    straight, split = str(tmp_path / "a"), str(tmp_path / "b")
    train.main([data, "-o", straight, "--max-steps", "5", *ARGS])
    train.main([data, "-o", split, "--max-steps", "2", *ARGS])
    first = _adapter(split)
    capsys.readouterr()
    assert train.main([data, "-o", split, "--max-steps", "5", *ARGS]) == 2  # a second run needs --resume
    assert "checkpoint.pt exists" in capsys.readouterr().err
    # a run stopped (killed) after its last checkpoint logged steps 3 and 4: they run again
    with open(os.path.join(split, "log.jsonl"), "a") as f:
        f.write('{"step": 3, "loss": 9}\n{"step": 4, "loss": 9}\n{"step": 5, "lo')
    # settings that change the result are refused, each listed
    other = tmp_path / "other.jsonl"
    other.write_text(open(data).read().replace("answer", "reply"))
    assert train.main([str(other), "-o", split, "--resume", *ARGS, "--batch-size", "2", "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size: 4 -> 2" in err and "--seed: 0 -> 1" in err and "other.jsonl" in err
    assert torch.equal(first, _adapter(split))
    # the same content elsewhere, more steps, other --save-every: allowed
    moved = tmp_path / "moved.jsonl"
    moved.write_text(open(data).read())
    resume = ["--max-steps", "5", "--resume", *ARGS, "--save-every", "3"]
    assert train.main([str(moved), "-o", split, *resume]) == 0
    assert not torch.equal(first, _adapter(split))
    torch.testing.assert_close(_adapter(split), _adapter(straight), rtol=0, atol=1e-6)
    steps = [json.loads(line)["step"] for line in open(os.path.join(split, "log.jsonl"))]
    assert steps == [1, 2, 3, 4, 5]


def test_resume_of_a_bfloat16_run_on_the_built_in_base_gives_the_uninterrupted_result(data, tmp_path):
    """A fresh run cast the drawn base with model.to(bfloat16), RoPE's inv_freq included; a
    resumed run loaded OUT/base_model with from_pretrained(dtype=bfloat16), which keeps it in
    float32: two models, so the resumed adapter was not the uninterrupted run's. The fresh run
    loads its saved base back as a resume does now."""
    straight, split = str(tmp_path / "a"), str(tmp_path / "b")
    bf16 = ["--dtype", "bfloat16", "--eval-every", "0"]
    assert train.main([data, "-o", straight, "--max-steps", "3", *ARGS, *bf16]) == 0
    assert train.main([data, "-o", split, "--max-steps", "2", *ARGS, *bf16]) == 0
    assert train.main([data, "-o", split, "--max-steps", "3", "--resume", *ARGS, *bf16]) == 0
    with open(os.path.join(straight, "adapter", "adapter_model.safetensors"), "rb") as a, \
            open(os.path.join(split, "adapter", "adapter_model.safetensors"), "rb") as b:
        assert a.read() == b.read()


def test_text_file_projection_and_cli_dispatch(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("\n".join(f"line number {i}" for i in range(10)) + "\n\n")
    out = str(tmp_path / "run")
    from prefix_attn import cli

    rc = cli.main(["train", str(path), "-o", out, "--max-steps", "2", "--projection-hidden-size", "8",
                   "--gradient-checkpointing", *ARGS])
    assert rc == 0
    cfg = json.load(open(os.path.join(out, "adapter", "adapter_config.json")))
    assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["num_virtual_tokens"] == 4
    assert cfg["prefix_projection"] is False  # the MLP was folded into plain K/V
    assert os.path.isabs(cfg["base_model_name_or_path"])


def test_resume_through_the_prefix_attn_command(data, tmp_path, capsys):
    """The command's parser holds the subcommand's function (``func``): saved with the other
    arguments it made every checkpoint written through ``prefix-attn train`` refused by the
    weights-only load of --resume. Checkpoints hold plain arguments now, and those written
    before still load (the function is allowed by name)."""
    from prefix_attn import cli

    out = str(tmp_path / "run")
    assert cli.main(["train", data, "-o", out, "--max-steps", "2", *ARGS]) == 0
    path = os.path.join(out, "checkpoint.pt")
    saved = torch.load(path, weights_only=True)
    assert "func" not in saved["args"] and saved["args"]["max_steps"] == 2
    assert cli.main(["train", data, "-o", out, "--max-steps", "3", "--resume", *ARGS]) == 0, \
        capsys.readouterr().err
    # a checkpoint as the command wrote it before
    old = torch.load(path, weights_only=True)
    old["args"]["func"] = train.run
    torch.save(old, path)
    assert cli.main(["train", data, "-o", out, "--max-steps", "4", "--resume", *ARGS]) == 0, \
        capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "log.jsonl"))]
    assert steps == [1, 2, 3, 4]


def test_read_examples_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n')
    with pytest.raises(ValueError, match="text"):
        train_data.read_examples(str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no examples"):
        train_data.read_examples(str(empty))


def test_pack_gives_the_padded_loss_and_training(data, tmp_path, monkeypatch):
    """--pack: one row per batch, position_ids restarting per example (the fused packed path),
    the same loss as the padded batch, so the same training (within float error)."""
    from prefix_attn.hf import attention as hf  # the module that calls it
    from prefix_attn.tiny import ByteTokenizer, default_model
    from prefix_attn.tuning import prefix_tuning

    calls = []
    real = hf.packed_attention
    monkeypatch.setattr(hf, "packed_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    tok = ByteTokenizer()
    rows = train.prepare(tok, train.read_examples_at(data)[:4], 64, tok.vocab_size, data)
    model = default_model(seed=0)
    prefix_tuning(model, num_virtual_tokens=4, name="t")
    ids, mask, labels = train.collate(rows, tok.pad_token_id)
    pids, pos, plabels = train.collate_packed(rows)
    assert pids.shape == (1, int(mask.sum())) and pos[0, 0] == 0 and (pos == 0).sum() == 4
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, labels=labels, prefixes=["t"] * 4).loss
        packed = model(pids, position_ids=pos, labels=plabels, prefixes=["t"], use_cache=False).loss
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)
    assert calls  # the packed rows ran regrouped on the kernel, not through a dense mask

    outs = {}
    for flag in ([], ["--pack"]):
        outs[bool(flag)] = out = str(tmp_path / f"run{len(flag)}")
        assert train.main([data, "-o", out, "--max-steps", "3", "--seed", "1", *ARGS, *flag]) == 0
    torch.testing.assert_close(_adapter(outs[True]), _adapter(outs[False]), rtol=1e-4, atol=1e-5)


def test_resume_refuses_another_lr(data, tmp_path, capsys):
    """--lr changes every step after the checkpoint: a resume with another one is refused,
    naming it, and leaves the checkpoint as it was."""
    out = str(tmp_path / "run")
    assert train.main([data, "-o", out, "--max-steps", "1", *ARGS]) == 0
    first = _adapter(out)
    capsys.readouterr()
    assert train.main([data, "-o", out, "--max-steps", "2", "--resume", *ARGS, "--lr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "prefix-attn train: error: --resume with other settings" in err and "--lr: 0.05 -> 0.1" in err
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["step"] == 1
    assert torch.equal(first, _adapter(out))


def test_eval_every_also_evaluates_the_last_step(data, tmp_path):
    """--eval-every 3 with 5 steps: eval loss at step 3 and at the end (step 5), nowhere else."""
    out = str(tmp_path / "run")
    assert train.main([data, "-o", out, "--max-steps", "5", *ARGS, "--eval-every", "3",
                       "--save-every", "0"]) == 0
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in log if "eval_loss" in r] == [3, 5]
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["step"] == 5


@pytest.mark.parametrize("options, costly", [(["--eval-fraction", "0.5", "--eval-every", "1", "--batch-size", "1"], True),
                                             (["--eval-fraction", "0.5", "--eval-every", "2", "--batch-size", "2"], False),
                                             (["--eval-fraction", "0.5", "--eval-every", "1", "--batch-size", "1",
                                               "--gradient-accumulation-steps", "4"], False),
                                             (["--eval-fraction", "0.5", "--eval-every", "0", "--batch-size", "1"], False)])
def test_an_evaluation_costlier_than_the_training_between_is_noted(data, tmp_path, capsys, options, costly):
    """10% of 200k examples held out, evaluated every 50 steps of 8, is 20000 examples of forward
    passes per 400 trained: most of the run's time, said at the start. Here 7 held out, every
    step of 1 (noted); every 2 steps of 2, or every step of 1 x 4 accumulated (8 or 4 trained: not
    noted); no eval (nothing held out)."""
    out = str(tmp_path / "run")
    assert train.main([data, "-o", out, "--max-steps", "1", "--no-progress", "--num-virtual-tokens", "2",
                       *options]) == 0
    err = capsys.readouterr().err
    assert ("each evaluation reads the 7 held-out examples, and one comes every step (1 example "
            "trained): evaluating will take longer than training" in err) == costly, err


def test_packed_text_examples_start_without_a_label(tmp_path):
    """Text-only examples (loss on every token, the first one included in the rows' labels):
    packed, the first token of each example is not predicted from the example before it
    (label -100 there), so the packed loss is the padded batch's."""
    from prefix_attn.tiny import ByteTokenizer, default_model
    from prefix_attn.tuning import prefix_tuning

    path = tmp_path / "data.txt"
    path.write_text("first line\nsecond one here\nthird\nand a fourth line\n")
    tok = ByteTokenizer()
    rows = train.prepare(tok, train.read_examples_at(str(path)), 64, tok.vocab_size, str(path))
    assert len(rows) == 4 and all(labels[0] != -100 for _, labels in rows)  # text: no prompt part
    ids, pos, labels = train.collate_packed(rows)
    starts = [0]
    for i, _ in rows[:-1]:
        starts.append(starts[-1] + len(i))
    assert ids[0].tolist() == sum((i for i, _ in rows), [])
    assert (pos[0] == 0).nonzero().flatten().tolist() == starts
    expected = sum(([-100] + l[1:] for _, l in rows), [])
    assert labels[0].tolist() == expected
    assert [labels[0, s].item() for s in starts] == [-100] * 4

    model = default_model(seed=0)
    prefix_tuning(model, num_virtual_tokens=4, name="t")
    pids, mask, plabels = train.collate(rows, tok.pad_token_id)
    with torch.no_grad():
        padded = model(pids, attention_mask=mask, labels=plabels, prefixes=["t"] * 4).loss
        packed = model(ids, position_ids=pos, labels=labels, prefixes=["t"], use_cache=False).loss
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)


def test_resume_restores_the_torch_rng_state(data, tmp_path):
    """The checkpoint's torch RNG state is restored on --resume: a run resumed after step 2
    ends with the RNG state of the uninterrupted run (what dropout would draw from), and
    leaves the process's RNG there."""
    straight, split = str(tmp_path / "a"), str(tmp_path / "b")
    assert train.main([data, "-o", straight, "--max-steps", "4", *ARGS]) == 0
    want = torch.load(os.path.join(straight, "checkpoint.pt"), weights_only=False)["torch_rng"]
    assert train.main([data, "-o", split, "--max-steps", "2", *ARGS]) == 0
    assert train.main([data, "-o", split, "--max-steps", "4", "--resume", *ARGS]) == 0
    got = torch.load(os.path.join(split, "checkpoint.pt"), weights_only=False)["torch_rng"]
    assert torch.equal(got, want)
    assert torch.equal(torch.get_rng_state(), want)
