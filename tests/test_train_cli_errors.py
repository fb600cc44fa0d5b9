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

from prefix_attn import train

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
        train.read_examples(str(path))


def test_json_suffixes_any_case_and_a_json_array(tmp_path):
    rows = [{"text": "one"}, {"prompt": "p", "completion": "two"}]
    want = [("", "one"), ("p", "two")]
    for name in ("a.JSONL", "b.Json"):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert train.read_examples(str(tmp_path / name)) == want
    array = tmp_path / "c.json"
    array.write_text(json.dumps(rows, indent=2))
    assert train.read_examples(str(array)) == want
    array.write_text(json.dumps(rows + [{"text": None}], indent=2))  # 3rd item starts on line 9
    with pytest.raises(ValueError, match="c.json:9: field 'text'"):
        train.read_examples(str(array))


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
    assert "examples per step (default: 8)" in text and "(0: no eval)" in text
    assert "--model OUTPUT/base_model" in text  # --seed draws the built-in base model
