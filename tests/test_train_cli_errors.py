"""`prefix-attn train` on bad input, odd options and signals (from a CLI audit; each test failed
before its fix): user errors are one `prefix-attn train: error: ...` line, exit status 2, and
nothing written; loose JSON values refused; SIGINT/SIGTERM save a checkpoint; 0 means never
for --eval-every/--save-every; --max-length fits the model's positions; help shows defaults."""
import argparse
import json
import os
import signal

import pytest
import torch
from conftest import BROKEN_MODEL_FOLDERS, broken_model_folder

from prefix_attn import tiny, train, train_data

pytestmark = pytest.mark.hf

FAST = ["--num-virtual-tokens", "4", "--batch-size", "4", "--no-progress"]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q{i % 3}:", "completion": f" answer {i % 4}"}) + "\n"
                            for i in range(14)))
    return str(path)


def _steps(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def _user_error(capsys, argv, *fragments):
    """Run train with argv: exit status 2, one error line naming each fragment, no traceback."""
    rc = train.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("prefix-attn train: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


BAD_DATA = {  # file name: (content, what the message must name)
    "empty.jsonl": (b"", ["empty.jsonl", "no examples"]),
    "bad.jsonl": (b'{"text": "ok"}\n{"text": "ok2"}\n{"text": oops}\n', ["bad.jsonl:3:", "not JSON"]),
    "nofield.jsonl": (b'{"text": "ok"}\n{"prompt": "only prompt"}\n', ["nofield.jsonl:2:", "'completion'"]),
    "nonutf8.jsonl": (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ["nonutf8.jsonl:2:", "UTF-8"]),
    "nonutf8.txt": (b"fine\ncaf\xe9\n", ["nonutf8.txt:2:", "UTF-8"]),
    "list.jsonl": (b'{"text": "ok"}\n["text"]\n', ["list.jsonl:2:", "JSON object"]),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_bad_data_is_a_user_error_and_writes_nothing(name, tmp_path, capsys):
    content, fragments = BAD_DATA[name]
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "out"
    _user_error(capsys, [str(path), "-o", str(out), "--max-steps", "1", *FAST], *fragments)
    assert not out.exists()  # the data is checked before anything is written


def test_paths_and_checkpoint_errors_are_user_errors(data, tmp_path, capsys):
    out = tmp_path / "out"
    _user_error(capsys, [str(tmp_path / "missing.jsonl"), "-o", str(out), *FAST], "data file not found")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    _user_error(capsys, [data, "-o", str(a_file), *FAST], "is a file")
    _user_error(capsys, [data, "-o", str(out), "--model", str(tmp_path / "nope"), *FAST],
                "model folder not found")
    _user_error(capsys, [data, "-o", str(out), "--resume", *FAST], "no checkpoint")
    assert not out.exists()
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    _user_error(capsys, [data, "-o", str(out), "--resume", *FAST], "unreadable", "delete it")
    _user_error(capsys, [data, "-o", str(out), *FAST], "exists", "--resume")
    assert sorted(os.listdir(out)) == ["checkpoint.pt"]


@pytest.mark.parametrize("how", sorted(BROKEN_MODEL_FOLDERS))
def test_a_broken_model_folder_is_a_user_error(data, tmp_path, capsys, how):
    """A truncated model.safetensors raised safetensors' SafetensorError, which train did not
    catch (OSError and ValueError only): a traceback."""
    folder = broken_model_folder(tmp_path / "model", how)
    capsys.readouterr()  # the save's progress bar
    out = tmp_path / "out"
    _user_error(capsys, [data, "-o", str(out), "--model", folder, "--max-steps", "1", *FAST],
                f"cannot load a model from {folder}: ", BROKEN_MODEL_FOLDERS[how])
    assert not out.exists()


def test_a_model_that_takes_no_prefix_bank_is_a_user_error(data, tmp_path, capsys):
    """A BART-style decoder (no position_ids in its forward) was refused by prefix_tuning after
    the output folder and its log were written: a traceback and exit status 1."""
    import transformers

    cfg = transformers.BartConfig(vocab_size=259, d_model=32, encoder_layers=1, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4,
                                  encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                                  is_decoder=True, is_encoder_decoder=False)
    folder = str(tmp_path / "bart")
    transformers.BartForCausalLM(cfg).save_pretrained(folder)
    tiny.ByteTokenizer().save_pretrained(folder)
    capsys.readouterr()
    out = tmp_path / "out"
    _user_error(capsys, [data, "-o", str(out), "--model", folder, "--max-steps", "1", *FAST],
                f"--model {folder}: cannot prefix-tune this model: ", "position_ids")
    assert not out.exists()


class _RunsCodeWhenUnpickled:
    """What a tampered checkpoint can hold: unpickling it calls ``os.system``-like code (here:
    writing a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_never_runs_code_from_the_checkpoint(data, tmp_path, capsys):
    """--resume loads the checkpoint with weights_only=True (it was a full unpickle: any object
    in a checkpoint of a shared output folder ran code when resumed)."""
    out = tmp_path / "out"
    assert train.main([data, "-o", str(out), "--max-steps", "1", *FAST]) == 0
    capsys.readouterr()  # its eval loss, on standard error
    ckpt = out / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)  # what the run saved loads without pickled code
    marker = tmp_path / "ran"
    state["args"]["extra"] = _RunsCodeWhenUnpickled(str(marker))
    torch.save(state, ckpt)
    _user_error(capsys, [data, "-o", str(out), "--resume", "--max-steps", "2", *FAST],
                "holds objects other than tensors", "could run code", "delete it")
    assert not marker.exists()


@pytest.mark.parametrize("line, field", [
    ('{"text": null}', "'text'"), ('{"text": 3}', "'text'"),
    ('{"prompt": null, "completion": "x"}', "'prompt'"),
    ('{"prompt": "p", "completion": {"a": 1}}', "'completion'"),
    ('{"text": "t", "completion": "c"}', "'text'"),
])
def test_loose_json_values_are_refused(line, field, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"d.jsonl:2: .*{field}"):
        train_data.read_examples(str(path))


def test_json_suffixes_any_case_and_a_json_array(tmp_path):
    rows = [{"text": "one"}, {"prompt": "p", "completion": "two"}]
    want = [("", "one"), ("p", "two")]
    for name in ("a.JSONL", "b.Json"):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert train_data.read_examples(str(tmp_path / name)) == want
    array = tmp_path / "c.json"
    array.write_text(json.dumps(rows, indent=2))
    assert train_data.read_examples(str(array)) == want
    array.write_text(json.dumps(rows + [{"text": None}], indent=2))  # 3rd item starts on line 9
    with pytest.raises(ValueError, match="c.json:9: array index 2: field 'text'"):
        train_data.read_examples(str(array))


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_of_the_last_step(signum, status, data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 7, "loss": 1.0}\n')  # stale, no checkpoint: starts over
    real_log = train.append_log

    def log_then_signal(out_dir, record):
        real_log(out_dir, record)
        if record["step"] == 2:
            os.kill(os.getpid(), signum)
    monkeypatch.setattr(train, "append_log", log_then_signal)

    def not_handled(*_):  # the default action would end (SIGTERM) or interrupt (SIGINT) pytest
        raise RuntimeError("the signal reached the caller")
    previous = {s: signal.signal(s, not_handled) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = train.main([data, "-o", str(out), "--max-steps", "6", "--save-every", "50", *FAST])
        assert signal.getsignal(signum) is not_handled  # train's handlers are gone again
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    err = capsys.readouterr().err
    assert rc == status and "Traceback" not in err
    assert "--resume" in err and "step 2" in err
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 2
    assert [r["step"] for r in _steps(out)] == [1, 2]
    assert not (out / "adapter").exists()


def test_eval_fraction_range_and_an_empty_eval_set_warns(tmp_path, capsys):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": f"example {i}"}) + "\n" for i in range(5)))
    for bad in ("1", "-0.5"):
        with pytest.raises(SystemExit) as exc:
            train.main([str(small), "-o", str(tmp_path / "x"), "--eval-fraction", bad])
        assert exc.value.code == 2 and "--eval-fraction" in capsys.readouterr().err
    out = str(tmp_path / "out")
    assert train.main([str(small), "-o", out, "--max-steps", "2", "--eval-every", "1", *FAST]) == 0
    err = capsys.readouterr().err
    assert err.count("eval set empty: 5 examples x 0.1 < 1") == 1
    assert not any("eval_loss" in r for r in _steps(out))


@pytest.mark.parametrize("option, value", [
    ("--batch-size", "0"), ("--max-steps", "0"), ("--epochs", "0"), ("--lr", "0"), ("--lr", "-1"),
    ("--num-virtual-tokens", "0"), ("--eval-every", "-1"), ("--save-every", "-2"), ("--max-length", "1"),
    ("--weight-decay", "inf"), ("--weight-decay", "-0.1"), ("--lr", "nan"),
])
def test_out_of_range_numbers_are_refused(option, value, data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main([data, "-o", str(tmp_path / "out"), *FAST, "--max-steps", "1", option, value])
    assert exc.value.code == 2 and f"argument {option}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_zero_means_no_eval_and_a_checkpoint_only_at_the_end(data, tmp_path, monkeypatch):
    from prefix_attn import atomic

    saved, real_save = [], atomic.save_torch

    def counted_save(obj, path):
        saved.append(obj["step"])
        real_save(obj, path)
    monkeypatch.setattr(atomic, "save_torch", counted_save)
    out = str(tmp_path / "out")
    never = ["--eval-every", "0", "--save-every", "0"]
    assert train.main([data, "-o", out, "--max-steps", "3", *never, *FAST]) == 0
    assert saved == [3]
    assert [r["step"] for r in _steps(out)] == [1, 2, 3] and not any("eval_loss" in r for r in _steps(out))


def test_no_eval_holds_no_data_out(tmp_path, monkeypatch, capsys):
    """--eval-every 0 still held out --eval-fraction of the data: never evaluated, never
    trained on, silently. Every example trains now; a resume that turns eval on or off changes
    the data trained on, and is refused."""
    trained, real_step = [], train.train_step

    def step(model, opt, batch, *args, **kwargs):
        trained.extend(tuple(ids) for ids, _ in batch)
        return real_step(model, opt, batch, *args, **kwargs)

    monkeypatch.setattr(train, "train_step", step)
    data = _write_jsonl(tmp_path / "data.jsonl", [{"text": f"example {i}"} for i in range(10)])
    out = str(tmp_path / "out")
    assert train.main([data, "-o", out, "--epochs", "1", "--eval-every", "0", *FAST]) == 0
    assert len(set(trained)) == 10  # one epoch: every example
    _user_error(capsys, [data, "-o", out, "--epochs", "2", "--eval-every", "2", "--resume", *FAST],
                "--eval-fraction: 0 (--eval-every 0: nothing held out) -> 0.1")


def test_a_checkpoint_that_held_data_out_says_how_to_resume_without_eval(tmp_path, capsys):
    """A checkpoint that held out --eval-fraction (made with eval on, or by an older version with
    --eval-every 0) resumed with --eval-every 0: refused as "0.1 -> nothing held out" although
    the user gave the run's own command; the message now says how to keep the same split."""
    data = _write_jsonl(tmp_path / "data.jsonl", [{"text": f"example {i}"} for i in range(10)])
    out = str(tmp_path / "out")
    assert train.main([data, "-o", out, "--epochs", "1", "--eval-every", "2", *FAST]) == 0
    capsys.readouterr()
    _user_error(capsys, [data, "-o", out, "--epochs", "2", "--eval-every", "0", "--resume", *FAST],
                "(this checkpoint held out 0.1 of the data: resume with --eval-every N > 0")


def test_non_finite_numbers_in_fields_training_ignores_are_accepted(tmp_path):
    """The check that refuses NaN in generate's requests (they are written back) refused them in
    training data too, where nothing is written back (a review)."""
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "hello world", "score": NaN}\n{"text": "more", "score": 1e999}\n')
    assert train_data.read_examples(str(path)) == [("", "hello world"), ("", "more")]


def test_max_length_leaves_room_for_the_prefix_positions(tmp_path, capsys):
    """GPT-2 numbers tokens after a prefix of P from P: max_length + P > n_positions overflowed."""
    from transformers.utils import logging as hf_logging

    from prefix_attn.tiny import ByteTokenizer, tiny_model

    model_dir = str(tmp_path / "gpt2")
    tiny_model("gpt2", vocab_size=ByteTokenizer.vocab_size, n_positions=16).save_pretrained(model_dir)
    ByteTokenizer().save_pretrained(model_dir)
    long = tmp_path / "long.txt"
    long.write_text("".join("x" * 40 + "\n" for _ in range(4)))
    out = str(tmp_path / "out")
    capsys.readouterr()
    assert train.main([str(long), "-o", out, "--model", model_dir, "--max-steps", "1", "--max-length", "64",
                       "--eval-fraction", "0", *FAST]) == 0
    err = capsys.readouterr().err
    assert "--max-length 64 lowered to 12" in err
    assert "Loading weights" not in err and hf_logging.is_progress_bar_enabled()  # off during, back after
    _user_error(capsys, [str(long), "-o", str(tmp_path / "o2"), "--model", model_dir, *FAST,
                         "--num-virtual-tokens", "15"], "--num-virtual-tokens")


def test_help_shows_defaults_and_every_option_is_explained():
    p = train.add_parser(argparse.ArgumentParser().add_subparsers())
    assert all(a.help for a in p._actions)
    text = " ".join(p.format_help().split())
    assert "examples per forward (a step takes N x --gradient-" in text and "steps) (default: 8)" in text
    assert "(0: no eval)" in text and "(default: constant)" in text
    assert "--model OUTPUT/base_model" in text  # --seed draws the built-in base model


# --------------------------------------------------------------------------------------
# second audit (a user walkthrough of `prefix-attn train`)
# --------------------------------------------------------------------------------------
def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _only_valid_json(out):
    """Every log line parses as strict JSON (no bare NaN / Infinity)."""
    def refuse(token):
        raise AssertionError(f"log.jsonl holds a bare {token}")
    return [json.loads(line, parse_constant=refuse) for line in open(os.path.join(out, "log.jsonl"))]


def test_examples_whose_prompt_fills_max_length_are_dropped_with_one_warning(tmp_path, capsys):
    """A prompt longer than --max-length left no completion token: such rows gave a NaN loss."""
    rows = [{"prompt": "p" * 300, "completion": "answer"}] * 6 + [{"prompt": "Q:", "completion": " A"}] * 8
    path = _write_jsonl(tmp_path / "mixed.jsonl", rows)
    out = str(tmp_path / "out")
    assert train.main([path, "-o", out, "--max-steps", "2", "--max-length", "64", "--eval-fraction", "0",
                       *FAST]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1, err
    assert "6 of 14 examples have no token to learn" in err and "fills the 64-token limit per example (--max-length" in err
    assert "raise --max-length if the model allows, or shorten the prompts" in err
    assert all(r["loss"] is not None and r["loss"] > 0 for r in _only_valid_json(out))


def test_examples_cut_at_max_length_are_said_once(tmp_path, capsys):
    """An example longer than --max-length lost the end of its completion and its end token,
    silently (the model then never learns to stop there)."""
    rows = [{"prompt": "Q:", "completion": "a" * 100}] * 3 + [{"prompt": "Q:", "completion": " A"}] * 4 \
        + [{"prompt": "q" * 70, "completion": "b"}]  # the prompt fills it: dropped, said apart
    path = _write_jsonl(tmp_path / "long.jsonl", rows)
    tok = tiny.ByteTokenizer()
    kept = train.prepare(tok, train.read_examples_at(path), 64, tok.vocab_size, path)
    err = capsys.readouterr().err
    assert len(kept) == 7 and all(len(ids) <= 64 for ids, _ in kept)
    assert err.count("note:") == 1 and err.count("warning:") == 1, err
    assert ("3 of 8 examples are longer than the 64-token limit per example (--max-length): cut, "
            "so their last tokens to learn (the end-of-text or end-of-turn token, and the end of the "
            "completion before it where the cut reaches it) are not learnt") in err
    short = _write_jsonl(tmp_path / "short.jsonl", [{"prompt": "Q:", "completion": " A"}] * 2)
    train.prepare(tok, train.read_examples_at(short), 64, tok.vocab_size, short)
    assert capsys.readouterr().err == ""


def test_empty_texts_are_dropped_like_blank_lines(tmp_path, capsys):
    """{"text": ""} trained the model to end a text at once (BOS -> EOS was its only target)."""
    rows = [{"text": ""}, {"text": "  "}, {"completion": ""}] + [{"text": "fine"}] * 4 \
        + [{"prompt": "Q:", "completion": ""}]   # an empty answer after a prompt teaches stopping: kept
    path = _write_jsonl(tmp_path / "blank.jsonl", rows)
    examples = train.read_examples_at(path)
    tok = tiny.ByteTokenizer()
    rows_out = train.prepare(tok, examples, 64, tok.vocab_size, path)
    err = capsys.readouterr().err
    assert len(rows_out) == 5, rows_out
    assert "3 of 8 examples have no token to learn: 3 are empty (no text, or blanks only); dropped" in err, err
    only_blank = _write_jsonl(tmp_path / "only.jsonl", [{"text": ""}] * 2)
    with pytest.raises(train.TrainError, match="2 of 2 examples have no token to learn: 2 are empty"):
        train.prepare(tok, train.read_examples_at(only_blank), 64, tok.vocab_size, only_blank)


def test_only_examples_without_a_completion_token_is_an_error_before_writing(tmp_path, capsys):
    path = _write_jsonl(tmp_path / "long.jsonl", [{"prompt": "p" * 300, "completion": "answer"}] * 20)
    out = tmp_path / "out"
    _user_error(capsys, [path, "-o", str(out), "--max-steps", "2", *FAST],
                "long.jsonl: 20 of 20 examples have no token to learn", "raise --max-length")
    assert not out.exists()
    # the same for a --eval-data file
    good = _write_jsonl(tmp_path / "good.jsonl", [{"text": "fine"}] * 4)
    _user_error(capsys, [good, "-o", str(out), "--eval-data", path, "--max-steps", "1", *FAST],
                "long.jsonl: 20 of 20", "--eval-data file")
    assert not out.exists()


def test_a_non_finite_loss_stops_the_run_naming_the_step(data, tmp_path, capsys, monkeypatch):
    real_step = train.train_step

    def diverging(model, opt, batch, *args):
        loss, n, norm = real_step(model, opt, batch, *args)
        return (float("nan") if opt.state_dict()["state"][0]["step"] >= 2 else loss), n, norm
    monkeypatch.setattr(train, "train_step", diverging)
    out = str(tmp_path / "out")
    rc = train.main([data, "-o", out, "--max-steps", "4", "--save-every", "1", *FAST])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "error: step 2: the training loss is nan" in err and "checkpoint of step 1" in err, err
    assert [r["step"] for r in _only_valid_json(out)] == [1]
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["step"] == 1
    assert not os.path.exists(os.path.join(out, "adapter"))


@pytest.mark.parametrize("cut", ["detach", "leaf"])
def test_a_step_whose_gradient_never_reaches_the_prefix_stops_the_run(cut, data, tmp_path, capsys,
                                                                       monkeypatch):
    """A base whose layers pass no gradient back (bitsandbytes 4-bit on the CPU after an
    evaluation forward): every later step left the prefix as it was, silently, and the run
    wrote its adapter; a loss with no graph at all failed with a traceback."""
    real_step = train.train_step

    def cut_off(model, opt, batch, *args):
        if not opt.state_dict()["state"]:  # the first step trains
            return real_step(model, opt, batch, *args)

        def no_way_back(module, inputs):
            h = inputs[0].detach()
            return (h.requires_grad_() if cut == "leaf" else h,)
        hook = model.lm_head.register_forward_pre_hook(no_way_back)
        try:
            return real_step(model, opt, batch, *args)
        finally:
            hook.remove()
    monkeypatch.setattr(train, "train_step", cut_off)
    out = str(tmp_path / "out")
    rc = train.main([data, "-o", out, "--max-steps", "3", "--save-every", "1", *FAST])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    assert "error: step 2: no gradient reached the prefix 'default'" in err, err
    assert "checkpoint of step 1" in err and not os.path.exists(os.path.join(out, "adapter"))
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["step"] == 1


def test_the_log_never_holds_a_bare_nan(tmp_path):
    from prefix_attn.train_state import append_log

    append_log(str(tmp_path), {"step": 1, "loss": float("nan"), "eval_loss": float("inf")})
    assert _only_valid_json(str(tmp_path)) == [{"step": 1, "loss": None, "eval_loss": None}]


def _hf_tokenizer(folder):
    """A small word-level HF tokenizer saved in ``folder`` (ids 0..9)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "Q", ":", "answer", "0", "1", "2"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(folder))


def test_a_model_folder_needs_its_tokenizer(data, tmp_path, capsys):
    """--model DIR without tokenizer files fell back to the byte tokenizer silently, and so did a
    corrupt tokenizer: ids that are not the model's."""
    from prefix_attn import tiny

    folder = tmp_path / "model"
    tiny.tiny_model("llama", vocab_size=tiny.ByteTokenizer.vocab_size).save_pretrained(str(folder))
    out = tmp_path / "out"
    capsys.readouterr()
    _user_error(capsys, [data, "-o", str(out), "--model", str(folder), "--max-steps", "1", *FAST],
                f"no tokenizer in the model folder {folder}", "tokenizer.json")
    (folder / "tokenizer.json").write_text("{not json")
    _user_error(capsys, [data, "-o", str(out), "--model", str(folder), "--max-steps", "1", *FAST],
                f"cannot load the tokenizer of {folder}", "JSONDecodeError")
    assert not out.exists()
    # an HF tokenizer loads; the byte tokenizer only without a folder or where one was saved
    (folder / "tokenizer.json").unlink()
    _hf_tokenizer(folder)
    assert not isinstance(tiny.load_tokenizer(str(folder)), tiny.ByteTokenizer)
    assert isinstance(tiny.load_tokenizer(None), tiny.ByteTokenizer)
    assert train.main([data, "-o", str(out), "--model", str(folder), "--max-steps", "1", *FAST]) == 0
    # a run of the built-in model saves its byte tokenizer with it (what `generate --model` loads)
    own = str(tmp_path / "own")
    assert train.main([data, "-o", own, "--max-steps", "1", *FAST]) == 0
    assert isinstance(tiny.load_tokenizer(os.path.join(own, "base_model")), tiny.ByteTokenizer)


def test_token_ids_outside_the_vocabulary_name_the_line(tmp_path, capsys):
    """The byte tokenizer on a model of 128 ids: a non-ASCII byte crashed with an IndexError."""
    from prefix_attn import tiny

    folder = tmp_path / "small"
    tiny.tiny_model("llama", vocab_size=128).save_pretrained(str(folder))
    tiny.ByteTokenizer().save_pretrained(str(folder))
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "plain"}, {"text": "caf\u00e9"}])
    out = tmp_path / "out"
    capsys.readouterr()
    _user_error(capsys, [path, "-o", str(out), "--model", str(folder), "--max-steps", "1", *FAST],
                "d.jsonl:2: token id", "vocabulary of 128", "byte tokenizer")
    assert not out.exists()


def test_max_steps_is_the_total_and_cycles_the_data(data, tmp_path, capsys):
    """--max-steps was capped by --epochs (default 1): 14 examples, batch 4 -> 4 steps, not 10."""
    out = str(tmp_path / "out")
    base = [data, "-o", out, "--eval-fraction", "0", "--save-every", "0", "--eval-every", "0", *FAST]
    assert train.main(base + ["--max-steps", "6"]) == 0
    assert [r["step"] for r in _steps(out)] == [1, 2, 3, 4, 5, 6]
    # a resumed run with a larger --max-steps continues (it said "no steps left")
    assert train.main(base + ["--max-steps", "10", "--resume"]) == 0
    assert "trained 10 steps" in capsys.readouterr().out
    assert [r["step"] for r in _steps(out)] == list(range(1, 11))
    # a smaller one runs nothing and says so (it said "no steps left to run")
    assert train.main(base + ["--max-steps", "4", "--resume"]) == 0
    assert "the checkpoint is at step 10, past the 4 steps this run asks for" in capsys.readouterr().err
    straight = str(tmp_path / "straight")
    assert train.main([data, "-o", straight, *base[3:], "--max-steps", "10"]) == 0
    ckpt = [torch.load(os.path.join(o, "checkpoint.pt"), weights_only=False)["prefix"] for o in (out, straight)]
    torch.testing.assert_close(ckpt[0], ckpt[1], rtol=0, atol=1e-6)
    # without --max-steps, --epochs passes
    assert train.main([data, "-o", str(tmp_path / "e"), *base[3:], "--epochs", "2"]) == 0
    assert len(_steps(str(tmp_path / "e"))) == 8


@pytest.mark.parametrize("name", ["", "  ", "lang=fr"])
def test_an_empty_prefix_name_is_refused_at_parse_time(name, data, tmp_path, capsys):
    """Empty names, and names with "=" (generate --adapter NAME=DIR splits at the first "=":
    such a prefix trained, then could not be served by name)."""
    with pytest.raises(SystemExit) as exc:
        train.main([data, "-o", str(tmp_path / "out"), "--name", name, "--max-steps", "1", *FAST])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "argument --name" in err
    assert "=" not in name or "splits at the first '='" in err
    assert not (tmp_path / "out").exists()


def test_a_bad_backend_variable_is_a_user_error(data, tmp_path, capsys, monkeypatch):
    from prefix_attn.backends import BACKEND_NAMES

    out = tmp_path / "out"
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", "bogus")
    _user_error(capsys, [data, "-o", str(out), "--max-steps", "1", *FAST],
                "PREFIX_ATTN_BACKEND='bogus'", ", ".join(BACKEND_NAMES), "torch")
    assert not out.exists()
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", "torch")  # a usable one runs
    assert train.main([data, "-o", str(out), "--max-steps", "1", *FAST]) == 0


def test_eval_notes_and_file_names(tmp_path, capsys):
    one = _write_jsonl(tmp_path / "one.jsonl", [{"text": "only example"}])
    run = [one, "--max-steps", "1", *FAST]
    assert train.main([*run, "-o", str(tmp_path / "a"), "--eval-every", "0"]) == 0
    assert "eval set empty" not in capsys.readouterr().err  # no eval asked for: no warning
    assert train.main([*run, "-o", str(tmp_path / "b")]) == 0
    assert "eval set empty: 1 example x 0.1 < 1" in capsys.readouterr().err
    _user_error(capsys, [*run, "-o", str(tmp_path / "c"), "--eval-data", str(tmp_path / "nope.jsonl")],
                f"--eval-data file not found: {tmp_path / 'nope.jsonl'}")
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"text": "ok"}, {"text": 3}]))  # one line: the index tells them apart
    _user_error(capsys, [str(array), "-o", str(tmp_path / "d"), *FAST], "a.json:1: array index 1: field 'text'")


def test_resume_accepts_the_runs_own_base_model(data, tmp_path, capsys):
    out = tmp_path / "out"
    base = [data, "-o", str(out), "--save-every", "1", *FAST]
    assert train.main(base + ["--max-steps", "1"]) == 0
    assert train.main(base + ["--max-steps", "2", "--resume", "--model", str(out / "base_model")]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    other = tmp_path / "other"  # another folder is still a change
    assert train.main([data, "-o", str(other), "--max-steps", "1", "--seed", "0", *FAST]) == 0
    capsys.readouterr()
    _user_error(capsys, base + ["--max-steps", "3", "--resume", "--model", str(other / "base_model")],
                "--model: none ->")


def test_gradient_checkpointing_turns_the_cache_off_without_a_warning(data, tmp_path, monkeypatch):
    from transformers.utils import generic

    said = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **kw: said.append(msg))
    out = str(tmp_path / "out")
    assert train.main([data, "-o", out, "--max-steps", "1", "--gradient-checkpointing", *FAST]) == 0
    assert not [m for m in said if "use_cache" in m]


def test_dtype_bfloat16_trains_a_float32_prefix_on_a_bfloat16_base(data, tmp_path, capsys, monkeypatch):
    from safetensors import safe_open

    seen = []
    real_step = train.train_step

    def watch(model, opt, *args):
        seen.append((model.get_input_embeddings().weight.dtype, {p.dtype for g in opt.param_groups for p in g["params"]}))
        return real_step(model, opt, *args)
    monkeypatch.setattr(train, "train_step", watch)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        runs[dtype] = out = str(tmp_path / dtype)
        assert train.main([data, "-o", out, "--max-steps", "3", "--eval-every", "3", "--dtype", dtype, *FAST]) == 0
    assert seen[-1] == (torch.bfloat16, {torch.float32}) and seen[0] == (torch.float32, {torch.float32})
    bf16, f32 = _steps(runs["bfloat16"]), _steps(runs["float32"])
    assert abs(bf16[-1]["eval_loss"] - f32[-1]["eval_loss"]) < 0.05  # the same training, within bf16 rounding
    with safe_open(os.path.join(runs["bfloat16"], "adapter", "adapter_model.safetensors"), "pt") as f:
        assert f.get_tensor("prompt_embeddings").dtype == torch.float32
    with safe_open(os.path.join(runs["bfloat16"], "base_model", "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # the base is saved as drawn
    capsys.readouterr()
    _user_error(capsys, [data, "-o", runs["bfloat16"], "--max-steps", "4", "--resume", *FAST],
                "--dtype: bfloat16 -> float32")
    assert train.main([data, "-o", runs["bfloat16"], "--max-steps", "4", "--resume", "--dtype", "bfloat16",
                       *FAST]) == 0


def test_device_option(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    for bad in ("bogus", "cuda:99", "meta", "xpu", "mps"):  # meta, xpu, mps: tracebacks after
        _user_error(capsys, [data, "-o", str(out), "--device", bad, *FAST], f"--device {bad}")
    assert not out.exists()                                  # the base model was written
    assert train.main([data, "-o", str(out), "--device", "cpu", "--max-steps", "1", *FAST]) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    capsys.readouterr()
    assert train.training_device(None) == torch.device("cpu")
    assert "pass --device cuda" in capsys.readouterr().err


def test_a_text_file_of_json_lines_gets_a_hint(tmp_path, capsys):
    """A .txt file holding JSON objects trains on the raw lines (braces and field names): say so."""
    from prefix_attn.train_data import read_examples

    f = tmp_path / "data.txt"
    f.write_text('{"prompt": "a", "completion": "b"}\n{"text": "c"}\n')
    assert read_examples(str(f))[0] == ("", '{"prompt": "a", "completion": "b"}')
    assert "looks like a JSON object" in capsys.readouterr().err
    f.write_text('plain text\n{"text": "c"}\n')
    read_examples(str(f))
    assert "JSON" not in capsys.readouterr().err


def test_standard_input_is_refused_before_any_work(data, tmp_path, capsys):
    """`train -` read the data, loaded the model, then failed to fingerprint a file named '-'
    (a traceback): the checkpoint records the data file's content, which --resume checks."""
    out = tmp_path / "out"
    _user_error(capsys, ["-", "-o", str(out), *FAST], "data: train reads a file, not standard input")
    _user_error(capsys, [data, "--eval-data", "-", "-o", str(out), *FAST], "--eval-data: train reads a file")
    assert not out.exists()


def test_a_lone_surrogate_names_its_line(tmp_path, capsys):
    """JSON allows the escape \\ud800, which is not Unicode: the tokenizer raised
    UnicodeEncodeError (a traceback) after the model loaded."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "a\\ud800"}\n')
    _user_error(capsys, [str(path), "-o", str(tmp_path / "out"), *FAST],
                "d.jsonl:2: a string holds a lone surrogate (\\ud800)")
    arr = tmp_path / "arr.jsonl"
    arr.write_text('[{"text": "a"}, {"text": "b"}]\n')
    _user_error(capsys, [str(arr), "-o", str(tmp_path / "out"), *FAST],
                "arr.jsonl:1: expected a JSON object, got an array (a .jsonl file holds one object "
                "per line; name it .json for one array of objects)")


@pytest.mark.parametrize("name, kind", [("adapter", "file"), ("checkpoint.pt", "folder"),
                                        ("log.jsonl", "folder"), ("base_model", "file")])
def test_output_entries_of_the_wrong_kind_are_refused_up_front(data, tmp_path, capsys, name, kind):
    """OUT/adapter as a file failed after all the steps (NotADirectoryError), OUT/checkpoint.pt
    or OUT/log.jsonl as a folder in atomic.commit (IsADirectoryError): tracebacks, exit 1."""
    out = tmp_path / "out"
    out.mkdir()
    (out / name).mkdir() if kind == "folder" else (out / name).write_text("")
    _user_error(capsys, [data, "-o", str(out), "--max-steps", "1", *FAST],
                f"{name} there is a {kind}")
    assert sorted(os.listdir(out)) == [name]


def test_a_read_only_output_folder_is_refused_up_front(data, tmp_path, capsys, monkeypatch):
    """A read-only --output failed with an OSError traceback when the base model or the log was
    written. os.access stands in for the permissions (root, as CI may run, writes anywhere)."""
    from prefix_attn import train_state

    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(train_state.os, "access", lambda p, mode: p != str(ro) and real(p, mode))
    _user_error(capsys, [data, "-o", str(ro), *FAST], f"--output {ro}: the output folder is not writable")
    _user_error(capsys, [data, "-o", str(ro / "sub" / "run"), *FAST],
                f"the output folder's parent {ro} is not writable")
    assert os.listdir(ro) == []
    (tmp_path / "afile").write_text("")
    _user_error(capsys, [data, "-o", str(tmp_path / "afile" / "run"), *FAST],
                f"{tmp_path / 'afile'} is a file, not a folder")


def test_eval_fraction_is_no_setting_when_eval_data_is_given(data, tmp_path, capsys):
    """Resuming with another --eval-fraction was refused although --eval-data made it unused."""
    out = str(tmp_path / "out")
    base = [data, "-o", out, "--eval-data", data, "--save-every", "1", *FAST]
    assert train.main(base + ["--max-steps", "1"]) == 0
    assert train.main(base + ["--max-steps", "2", "--resume", "--eval-fraction", "0.3"]) == 0, \
        capsys.readouterr().err
    assert train.main([data, "-o", out, "--max-steps", "3", "--resume", *FAST]) == 2  # data split: refused
    assert "--eval-data" in capsys.readouterr().err

