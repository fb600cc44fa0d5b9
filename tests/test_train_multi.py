"""``prefix-attn train`` on data naming several prefixes (``"prefix"`` per example): one prefix
per name, each batch row under its own, written as OUT/adapters/NAME and OUT/bank."""
import json
import os
import re

import pytest
import torch

from prefix_attn import bank_file, serve, train, train_prefixes

pytestmark = pytest.mark.hf

ARGS = ["--num-virtual-tokens", "4", "--batch-size", "4", "--eval-every", "2", "--save-every", "1",
        "--no-progress", "--lr", "0.05"]


def _write(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")
    return str(path)


def _examples(n=16):
    """Two tasks, "legal" named, the other --name's (no "prefix")."""
    out = []
    for i in range(n):
        ex = {"prompt": f"Q{i % 3}:", "completion": " answer" * (1 + i % 3)}
        if i % 2:
            ex["prefix"] = "legal"
        out.append(ex)
    return out


@pytest.fixture
def data(tmp_path):
    return _write(tmp_path / "data.jsonl", _examples())


def _log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("pack, micro", [(False, None), (True, None), (False, 3), (True, 3)])
def test_each_prefix_s_gradient_comes_from_its_rows_only(pack, micro, tmp_path):
    """One step on a batch mixing two prefixes (padded or packed, one forward or micro-batches
    of 3): each prefix's gradient is that of the token losses of its rows alone, summed and
    divided by the step's learnt tokens, computed directly (its rows on their own)."""
    from prefix_attn.tiny import ByteTokenizer, default_model
    from prefix_attn.tuning import prefix_tuning

    path = _write(tmp_path / "d.jsonl", _examples(6))
    tok = ByteTokenizer()
    named = train_prefixes.read_prefixes(path, "default")
    rows = train.prepare(tok, train.read_examples_at(path), 64, tok.vocab_size, path, prefix_of=named.__getitem__)
    assert {r[2] for r in rows} == {"default", "legal"}
    model = default_model(seed=0)
    modules = {n: prefix_tuning(model, num_virtual_tokens=4, name=n) for n in ("default", "legal")}
    opt = torch.optim.SGD([p for m in modules.values() for p in m.parameters()], lr=0.0)  # grads stay
    train.train_step(model, opt, rows, tok.pad_token_id, "unused", pack, None, micro)
    got = {n: [p.grad.clone() for p in m.parameters()] for n, m in modules.items()}
    learnt = sum(sum(label != -100 for label in labels[1:]) for _, labels, _ in rows)
    for name, module in modules.items():
        opt.zero_grad(set_to_none=True)
        own = [r for r in rows if r[2] == name]
        ids, mask, labels = train.collate(own, tok.pad_token_id)
        logits = model(ids, attention_mask=mask, prefixes=[name] * len(own)).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                                ignore_index=-100, reduction="sum")
        (nll / learnt).backward()
        for g, p in zip(got[name], module.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-7)


def test_a_two_prefix_run_writes_an_adapter_per_prefix_a_bank_and_per_prefix_eval_losses(data, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    import prefix_attn

    out = str(tmp_path / "run")
    assert train.main([data, "-o", out, "--max-steps", "4", *ARGS, "--eval-fraction", "0.25"]) == 0
    summary = capsys.readouterr().out
    bank_dir, base_dir = os.path.join(out, "bank"), os.path.join(out, "base_model")
    assert f"prefix-attn generate --model {base_dir} --bank {bank_dir}" in summary
    assert sorted(os.listdir(os.path.join(out, "adapters"))) == ["default", "legal"]
    assert not os.path.exists(os.path.join(out, "adapter"))
    log = _log(out)
    evals = [r for r in log if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:  # the overall loss is the per-prefix ones weighted by their tokens
        by = r["eval_loss_by_prefix"]
        assert sorted(by) == ["default", "legal"] and min(by.values()) <= r["eval_loss"] <= max(by.values())
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["prefixes"] == ["default", "legal"] and sorted(ckpt["prefix"]) == ["default", "legal"]

    ours = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="prefix_attn").eval()
    prefix_attn.PrefixBank.load(bank_dir, ours)
    ids = torch.randint(3, 200, (2, 6))
    logits = {}
    for name in ("default", "legal"):
        base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="sdpa")
        pm = peft.PeftModel.from_pretrained(base, os.path.join(out, "adapters", name)).eval()
        with torch.no_grad():
            logits[name] = ours(ids, prefixes=[name, name]).logits
            torch.testing.assert_close(logits[name], pm(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits["default"], logits["legal"])  # two prefixes, not one twice


def test_generate_with_the_bank_answers_each_prefix_as_model_generate_does(data, tmp_path):
    from transformers import AutoModelForCausalLM

    from prefix_attn import tiny
    from prefix_attn.tuning import prefix_tuning

    out = str(tmp_path / "run")
    assert train.main([data, "-o", out, "--max-steps", "4", *ARGS, "--lr", "0.5"]) == 0
    prompts = ["Q0:", "Q1: answer", "hello"]
    requests = [{"prefix": p, "prompt": t} for t in prompts for p in ("default", "legal")]
    answers = tmp_path / "answers.jsonl"
    base_dir = os.path.join(out, "base_model")
    assert serve.main(["-i", _write(tmp_path / "r.jsonl", requests), "-o", str(answers), "--model", base_dir,
                       "--bank", os.path.join(out, "bank"), "--max-new-tokens", "6", "--batch-size", "4",
                       "--no-progress"]) == 0
    got = [json.loads(line)["completion"] for line in open(answers)]

    # the trained prefixes, as the checkpoint holds them, on the saved base
    model = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="prefix_attn").eval()
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    for name in ("default", "legal"):
        prefix_tuning(model, num_virtual_tokens=4, name=name).load_state_dict(ckpt["prefix"][name])
    tok = tiny.ByteTokenizer()
    want = []
    for r in requests:
        ids = torch.tensor([tok.encode(r["prompt"])])
        with torch.no_grad():
            g = model.generate(ids, prefixes=[r["prefix"]], max_new_tokens=6, do_sample=False,
                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = g[0, ids.shape[1]:].tolist()
        want.append(tok.decode(new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new))
    assert got == want
    assert got[0::2] != got[1::2]  # the two prefixes answer differently


@pytest.mark.parametrize("variant", [[], ["--pack"], ["--gradient-accumulation-steps", "2", "--batch-size", "2"]])
def test_resume_gives_the_uninterrupted_run_bitwise(variant, data, tmp_path):
    straight, split = str(tmp_path / "a"), str(tmp_path / "b")
    assert train.main([data, "-o", straight, "--max-steps", "5", *ARGS, *variant]) == 0
    assert train.main([data, "-o", split, "--max-steps", "2", *ARGS, *variant]) == 0
    assert train.main([data, "-o", split, "--max-steps", "5", "--resume", *ARGS, *variant]) == 0
    for name in ("default", "legal"):
        path = os.path.join("adapters", name, "adapter_model.safetensors")
        assert _bytes(os.path.join(split, path)) == _bytes(os.path.join(straight, path))
    # the bank's tensors (safetensors writes its metadata keys in no fixed order)
    banks = [bank_file.read(os.path.join(run, "bank")) for run in (split, straight)]
    assert banks[0].names == banks[1].names == ["default", "legal"]
    assert all(torch.equal(a, b) for a, b in zip(banks[0].tensors, banks[1].tensors))
    keep = ("step", "loss", "eval_loss", "eval_loss_by_prefix")
    assert [{k: r.get(k) for k in keep} for r in _log(split)] == [{k: r.get(k) for k in keep} for r in _log(straight)]


def test_resume_refuses_another_set_of_prefixes(data, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train.main([data, "-o", out, "--max-steps", "1", *ARGS]) == 0
    capsys.readouterr()
    assert train.main([data, "-o", out, "--max-steps", "2", "--resume", *ARGS, "--name", "support"]) == 2
    err = capsys.readouterr().err
    assert "trains the prefixes ['default', 'legal'], this run the prefixes ['legal', 'support']" in err


def _chat_prefixes_trained(tmp_path, examples, *options) -> list:
    """The prefix of each row that train --chat trains on ``examples`` with ``options`` (the
    chat test model), in the order of the steps."""
    from test_serve_chat import _model, chat_tokenizer

    model_dir = tmp_path / "m"
    _model().save_pretrained(str(model_dir))
    chat_tokenizer().save_pretrained(str(model_dir))
    data = _write(tmp_path / "d.jsonl", examples)
    seen = []
    real = train.train_step

    def recording(model, opt, batch, *a, **k):
        seen.extend(row[2] for row in batch)
        return real(model, opt, batch, *a, **k)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(train, "train_step", recording)
        assert train.main([data, "-o", str(tmp_path / "run"), "--model", str(model_dir), "--chat",
                           "--max-steps", "2", "--eval-every", "0", *ARGS[:2], "--no-progress", *options]) == 0
    return seen


def test_chat_examples_name_their_prefixes_too(tmp_path):
    examples = [{"prompt": f"q{i}", "completion": f"a{i}", **({"prefix": "b"} if i % 2 else {})} for i in range(6)]
    seen = _chat_prefixes_trained(tmp_path, examples, "--batch-size", "3")
    assert sorted(seen) == ["b"] * 3 + ["default"] * 3
    assert sorted(os.listdir(tmp_path / "run" / "adapters")) == ["b", "default"]


@pytest.mark.parametrize("value, pattern", [
    (3, r"d.jsonl:2: field 'prefix' must be a string naming the prefix to train .*got a number"),
    ("", r"d.jsonl:2: field 'prefix': entry name must be a non-empty str"),
    ("  ", r"d.jsonl:2: field 'prefix': the prefix name must not be empty"),
    ("a=b", r"d.jsonl:2: field 'prefix': the prefix name 'a=b' holds '='"),
    ("a/b", r"d.jsonl:2: field 'prefix': .* cannot name its adapter folder"),
    ("..", r"d.jsonl:2: field 'prefix': .* cannot name its adapter folder"),
])
def test_bad_prefix_names_are_usage_errors_naming_the_line(value, pattern, tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", [{"text": "one"}, {"text": "two", "prefix": value}])
    out = tmp_path / "run"
    assert train.main([data, "-o", str(out), *ARGS]) == 2
    assert re.search(pattern, capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("case, pattern", [
    ("case", r"the prefix names 'A' and 'a' differ in case only"),
    ("eval-file", r"e.jsonl:2: prefix 'other' has no training example .*it would stay untrained"),
    ("held-out", r"every example of prefix 'rare' is held out for eval"),
    ("name", r"--name: the prefix name 'x/y' cannot name its adapter folder"),
    ("dropped", r"d.jsonl: every example of prefix 'empty' was dropped \(no token to learn"),
])
def test_a_run_whose_prefixes_cannot_train_or_be_written_is_refused(case, pattern, tmp_path, capsys):
    examples = [{"text": f"example {i}", "prefix": "a" if i % 2 else None} for i in range(10)]
    options = []
    if case == "case":
        examples[0]["prefix"] = "A"
    elif case == "eval-file":
        options = ["--eval-data", _write(tmp_path / "e.jsonl", [{"text": "x", "prefix": "a"},
                                                                  {"text": "y", "prefix": "other"}])]
    elif case == "held-out":
        examples[0]["prefix"] = "rare"
        options = ["--eval-fraction", "0.5", "--seed", str(_seed_holding_out(examples, 0, 0.5))]
    elif case == "dropped":  # its one example has nothing to learn: it was written untrained
        examples[0] = {"text": "", "prefix": "empty"}
    else:
        options = ["--name", "x/y"]
    data = _write(tmp_path / "d.jsonl", examples)
    out = tmp_path / "run"
    assert train.main([data, "-o", str(out), *ARGS, *options]) == 2
    assert re.search(pattern, capsys.readouterr().err)
    assert not out.exists()


def _seed_holding_out(examples, index, fraction):
    """A --seed whose held-out split takes example ``index``."""
    from prefix_attn.train_data import split_eval

    rows = list(range(len(examples)))
    return next(s for s in range(100) if index in split_eval(rows, fraction, s)[1])


def test_a_single_prefix_named_by_the_data_is_today_s_single_run(tmp_path, capsys):
    """Every example naming one prefix: OUT/adapter as before, no bank, no per-prefix losses;
    that prefix is the one trained, not --name's (whose eval examples are refused)."""
    data = _write(tmp_path / "d.jsonl", [{"text": f"t{i}", "prefix": "only"} for i in range(8)])
    out = tmp_path / "run"
    unnamed = _write(tmp_path / "e.jsonl", [{"text": "x", "prefix": "only"}, {"text": "y"}])
    assert train.main([data, "-o", str(out), "--max-steps", "2", *ARGS, "--eval-data", unnamed]) == 2
    assert "e.jsonl:2: prefix 'default' has no training example" in capsys.readouterr().err
    named = _write(tmp_path / "n.jsonl", [{"text": "x", "prefix": "only"}])
    assert train.main([data, "-o", str(out), "--max-steps", "2", *ARGS, "--eval-data", named]) == 0
    assert sorted(os.listdir(out)) == ["adapter", "base_model", "checkpoint.pt", "log.jsonl"]
    assert all("eval_loss_by_prefix" not in r for r in _log(str(out)))
    assert "adapter (PEFT format)" in capsys.readouterr().out


def test_chat_turns_each_rows_keep_their_example_s_prefix(tmp_path):
    """Under --chat-turns each, a row is named by its example's line and its turn; its prefix is
    still its example's (it was looked up by the row's name and not found)."""
    examples = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"},
                              {"role": "user", "content": "more"}, {"role": "assistant", "content": "b"}],
                 **({"prefix": "b"} if i % 2 else {})} for i in range(4)]
    seen = _chat_prefixes_trained(tmp_path, examples, "--chat-turns", "each", "--batch-size", "4")
    assert sorted(seen) == ["b"] * 4 + ["default"] * 4  # 8 rows: 2 turns of 4 examples


def test_a_plain_text_eval_file_of_a_multi_task_run_is_the_name_prefix_s(data, tmp_path, capsys):
    """A multi-task run's --eval-data in plain text: its lines are --name's examples, evaluated
    under that prefix (it was a KeyError traceback: their prefixes were looked up by line), and
    refused when --name's prefix has no training example."""
    text = tmp_path / "e.txt"
    text.write_text("Q0: answer\nQ1: answer answer\n", encoding="utf-8")
    out = str(tmp_path / "run")
    assert train.main([data, "-o", out, "--max-steps", "2", *ARGS, "--eval-data", str(text)]) == 0
    assert [r["eval_loss_by_prefix"] for r in _log(out) if "eval_loss" in r][0].keys() == {"default"}
    named = _write(tmp_path / "named.jsonl", [{**ex, "prefix": ex.get("prefix", "support")} for ex in _examples()])
    refused = str(tmp_path / "refused")
    assert train.main([named, "-o", refused, "--max-steps", "2", *ARGS, "--eval-data", str(text)]) == 2
    assert ("e.txt (plain text: its examples are --name's): prefix 'default' has no training example"
            in capsys.readouterr().err)
    assert not os.path.exists(refused)


def test_the_summary_of_a_chat_run_serves_its_bank_with_chat(tmp_path, capsys):
    """The generate command the summary gives for a --chat run's bank has --chat and the
    --chat-option values (without them the prefixes, learnt after the template's tokens, were
    served on the raw prompt)."""
    examples = [{"prompt": f"q{i}", "completion": f"a{i}", **({"prefix": "b"} if i % 2 else {})} for i in range(6)]
    _chat_prefixes_trained(tmp_path, examples, "--batch-size", "3", "--chat-option", "enable_thinking=false",
                           "--chat-option", "persona=a b")
    bank = os.path.join(str(tmp_path / "run"), "bank")
    assert (f"--bank {bank} --chat --chat-option enable_thinking=false --chat-option 'persona=a b' (a request"
            in capsys.readouterr().out)


def test_chat_turns_each_notes_count_rows(tmp_path, capsys):
    """Under --chat-turns each the held-out and trained items are rows (one per assistant turn),
    and the eval-cost note and the held-out refusal say rows (they said examples: 8 "examples"
    held out of 4)."""
    examples = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"},
                              {"role": "user", "content": "more"}, {"role": "assistant", "content": "b"}],
                 **({"prefix": "b"} if i % 2 else {})} for i in range(8)]
    _chat_prefixes_trained(tmp_path, examples, "--chat-turns", "each", "--batch-size", "1",
                           "--eval-fraction", "0.5", "--eval-every", "1")
    assert "each evaluation reads the 8 held-out rows, and one comes every step (1 row trained)" \
        in capsys.readouterr().err


def test_a_prefix_no_step_reaches_is_noted(data, tmp_path, capsys):
    """A --max-steps too short for a prefix's rows to come up writes it as initialised: said at
    the start (it was written, and served, as if trained, without a word)."""
    out = str(tmp_path / "run")
    assert train.main([data, "-o", out, "--max-steps", "1", *ARGS, "--batch-size", "1", "--eval-every", "0"]) == 0
    trained = _log(out)  # the one step's row
    assert len(trained) == 1
    err = capsys.readouterr().err
    assert re.search(r"note: 1 prefix \('(default|legal)'\) has no row in the 1 step of this run \(--max-steps\): "
                     r"written as initialised, untrained", err), err
    assert train.main([data, "-o", str(tmp_path / "all"), "--max-steps", "4", *ARGS]) == 0
    assert "no row in" not in capsys.readouterr().err


def test_resuming_a_single_prefix_checkpoint_with_multi_task_data_says_what_can_be_done():
    """A checkpoint of one prefix (an older prefix-attn read no "prefix" field, so the same data
    trained one) resumed with data naming several: the hint was "resume with the checkpoint's
    --name", which no --name can do."""
    from prefix_attn.train_prefixes import check_checkpoint_names
    from prefix_attn.train_state import TrainError

    with pytest.raises(TrainError) as info:
        check_checkpoint_names({"step": 3}, ["a", "b"], "ck.pt")
    assert "trains one prefix, but this data names the prefixes ['a', 'b']" in str(info.value)
    assert "start a new --output" in str(info.value) and "--name" not in str(info.value)
    with pytest.raises(TrainError, match="resume with the checkpoint's --name"):
        check_checkpoint_names({"prefixes": ["a", "default"]}, ["a", "other"], "ck.pt")
