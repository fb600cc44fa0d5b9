"""``prefix-attn generate`` from an audit of its edges (each test failed before its fix):
empty prompts (F11), over-long requests (F8), prefix name collisions (F9), an adapter served on
another base model (F10), output path / device / encoding errors (F12), all unknown prefixes
named up front and empty input (F16), request ids (F17), the help text (F14)."""
import json

import pytest
import torch
from conftest import BROKEN_MODEL_FOLDERS, broken_model_folder

from prefix_attn import serve, tiny
from prefix_attn.serve import RequestError, main, read_requests


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _results(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _no_leftovers(folder):
    return not list(folder.rglob(".tmp-*"))


@pytest.fixture
def no_model(monkeypatch):
    """Loading the model fails: a check that passes with this runs before the model loads."""
    def fail(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(serve, "_load_model", fail)


def _greedy(model, ids, n, **kw):
    tok = tiny.ByteTokenizer()
    with torch.no_grad():
        g = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw)
    new = g[0, len(ids):].tolist()
    return tok.decode(new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The built-in model saved as a folder, a byte tokenizer without a start token in another
    copy, an adapter recording the first folder as its base, and a bank with a prompt entry."""
    from prefix_attn.bank import PrefixBank

    root = tmp_path_factory.mktemp("saved")
    model = tiny.default_model()
    for name, tok in (("model", tiny.ByteTokenizer()), ("nobos", tiny.ByteTokenizer(add_bos=False))):
        model.save_pretrained(str(root / name))
        tok.save_pretrained(str(root / name))
    bank = PrefixBank.attach(model)
    shape = (bank.num_layers, bank.num_kv_heads, 6, bank.head_dim)
    g = torch.Generator().manual_seed(5)
    bank.add("t", 3 * torch.randn(shape, generator=g), 3 * torch.randn(shape, generator=g))
    bank.save_peft("t", str(root / "adapter"))
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(root / "model")  # as `prefix-attn train` records it
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    bank.add_prompt("sys", torch.tensor(tiny.ByteTokenizer().encode("Be kind. ")))
    bank.save(str(root / "bank"))
    return root


# -- F11: a request with no tokens ---------------------------------------------------------------

@pytest.mark.hf
def test_empty_prompt_after_a_prompt_prefix_continues_the_prompt(tmp_path):
    """The first new token comes from the prompt's end, as the plain model on the prompt text
    (before: from a masked pad token); in a batch with a longer row, so the row is padded."""
    system = "Answer briefly. "
    f = _write(tmp_path / "r.jsonl", ['{"prefix": "sys", "prompt": ""}', '{"prompt": "a longer request"}',
                                      '{"prefix": "sys", "prompt": "why?"}'])
    out = tmp_path / "o.jsonl"
    assert main(["-i", f, "-o", str(out), "--prompt-prefix", f"sys={system}", "--batch-size", "3",
                 "--max-new-tokens", "5", "--no-progress"]) == 0
    res = _results(out)
    assert [(r["prefix"], r["prompt"]) for r in res] == [("sys", ""), (None, "a longer request"), ("sys", "why?")]
    tok, model = tiny.ByteTokenizer(), tiny.default_model()
    assert res[0]["completion"] == _greedy(model, tok.encode(system), 5)
    assert res[2]["completion"] == _greedy(model, tok.encode(system + "why?"), 5)


@pytest.mark.hf
def test_one_token_prompt_prefix_runs_its_token_without_a_prefix():
    from prefix_attn.bank import PrefixBank

    model = tiny.default_model()  # the bank holds it weakly
    bank = PrefixBank.attach(model)
    bank.add_prompt("bos", torch.tensor([1]))
    bank.add_prompt("two", torch.tensor([1, 70]))
    reqs = [serve.Request(prompt="", prefix="bos", line=1), serve.Request(prompt="", prefix="two", line=2)]
    jobs = serve._plan(reqs, tiny.ByteTokenizer(), bank, {"bos": [1], "two": [1, 70]}, "r.jsonl")
    assert [(j.prefix, j.ids) for j in jobs[:1]] == [(None, [1])]
    head = jobs[1].prefix
    assert jobs[1].ids == [70] and bank.entry_len(head) == 1
    assert torch.equal(bank.get(head)[0], bank.get("two")[0][:, :, :1])


@pytest.mark.hf
def test_requests_with_nothing_to_continue_are_refused_with_their_lines(tmp_path, saved, capsys):
    """No start token and no prompt prefix, or a saved bank's prompt (no token ids kept):
    refused, every such line named (before: generated from a pad token)."""
    f = _write(tmp_path / "r.jsonl", ['{"prompt": "fine"}', '{"prompt": ""}', '{"prefix": "t", "prompt": ""}'])
    out = tmp_path / "o.jsonl"
    rc = main(["-i", f, "-o", str(out), "--model", str(saved / "nobos"), "--adapter", f"t={saved / 'adapter'}",
               "--max-new-tokens", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "2 request(s) with nothing to generate from" in err
    assert "r.jsonl:2: the prompt has no tokens" in err and "r.jsonl:3: the prompt has no tokens" in err
    assert not out.exists() and _no_leftovers(tmp_path)

    f = _write(tmp_path / "r.jsonl", ['{"prefix": "sys", "prompt": "hi"}', '{"prefix": "sys", "prompt": ""}'])
    rc = main(["-i", f, "-o", str(out), "--bank", str(saved / "bank"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "r.jsonl:2: empty prompt after prompt prefix 'sys' from --bank" in err
    assert "r.jsonl:1" not in err and not out.exists()


# -- F8: requests longer than the model's positions ----------------------------------------------

@pytest.mark.hf
def test_too_long_requests_are_refused_up_front(tmp_path, capsys):
    """GPT-2 (learned positions, 256): prompt + prefix + new tokens = 256 runs, more is refused
    with the numbers, before anything is generated (before: 258 was an IndexError traceback)."""
    folder = tmp_path / "gpt2"
    tiny.tiny_model("gpt2", vocab_size=tiny.ByteTokenizer.vocab_size).save_pretrained(str(folder))
    tiny.ByteTokenizer().save_pretrained(str(folder))
    fits = [json.dumps({"prefix": "sys", "prompt": "x" * 250}),  # 250 + 4 ("abc" + start) + 2
            json.dumps({"prompt": "y" * 253})]  # 254 + 0 + 2
    over = [json.dumps({"prefix": "sys", "prompt": "x" * 252}), json.dumps({"prompt": "y" * 254})]
    base = ["--model", str(folder), "--prompt-prefix", "sys=abc", "--max-new-tokens", "2", "--no-progress",
            "--batch-size", "1"]
    out = tmp_path / "o.jsonl"
    rc = main(["-i", _write(tmp_path / "r.jsonl", fits + over), "-o", str(out)] + base)
    err = capsys.readouterr().err
    assert rc == 2 and "2 request(s) longer than the model's 256 positions" in err
    assert "r.jsonl:3: 252 prompt tokens + 4 prefix tokens (prefix sys) + 2 new tokens = 258" in err
    assert "r.jsonl:4: 255 prompt tokens + 0 prefix tokens (prefix none) + 2 new tokens = 257" in err
    assert "r.jsonl:1" not in err and "r.jsonl:2" not in err
    assert not out.exists() and _no_leftovers(tmp_path)
    assert main(["-i", _write(tmp_path / "r.jsonl", fits), "-o", str(out)] + base) == 0
    assert [r["num_tokens"] for r in _results(out)] == [2, 2]


# -- F9: one name, two sources ---------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    (["--adapter", "sup={a}", "--adapter", "sup={a}2"],
     "prefix name 'sup' given twice (--adapter {a}, --adapter {a}2)"),
    (["--adapter", "sup={a}", "--prompt-prefix", "sup=You are"],
     "prefix name 'sup' given twice (--adapter {a}, --prompt-prefix 'You are')"),
    (["--bank", "{b}", "--prompt-prefix", "sys=Hi"],
     "prefix name 'sys' given twice (--bank {b}, --prompt-prefix 'Hi')"),
])
def test_a_prefix_name_given_twice_is_refused(tmp_path, saved, capsys, no_model, options, message):
    a, b = str(saved / "adapter"), str(saved / "bank")
    f = _write(tmp_path / "r.jsonl", ['{"prompt": "x"}'])
    rc = main(["-i", f, "-o", str(tmp_path / "o.jsonl"), "--no-progress"] + [o.format(a=a, b=b) for o in options])
    assert rc == 2 and message.format(a=a, b=b) in capsys.readouterr().err


# -- F10: an adapter served on another base --------------------------------------------------

@pytest.mark.hf
def test_adapter_trained_on_another_local_model_warns(tmp_path, saved, capsys):
    f = _write(tmp_path / "r.jsonl", ['{"prefix": "t", "prompt": "x"}'])
    base = ["-i", f, "-o", str(tmp_path / "o.jsonl"), "--adapter", f"t={saved / 'adapter'}",
            "--max-new-tokens", "1", "--no-progress"]
    model = str(saved / "model")
    assert main(base) == 0
    assert f"warning: adapter t was trained on {model}; pass --model {model}" in capsys.readouterr().err
    assert main(base + ["--model", str(saved / "nobos")]) == 0
    assert f"warning: adapter t was trained on {model}, not on --model {saved / 'nobos'}" in capsys.readouterr().err
    assert main(base + ["--model", model]) == 0
    assert "warning" not in capsys.readouterr().err


# -- F12: output path, device, encoding ---------------------------------------------------------

def test_output_path_errors_are_clean_and_come_before_the_model(tmp_path, capsys, no_model):
    """-o naming a folder, or a path below a regular file: exit 2 before the model loads
    (before: IsADirectoryError after all the generation, FileExistsError; tracebacks)."""
    f = _write(tmp_path / "r.jsonl", ['{"prompt": "x"}'])
    (tmp_path / "adir").mkdir()
    assert main(["-i", f, "-o", str(tmp_path / "adir"), "--no-progress"]) == 2
    assert f"error: output {str(tmp_path / 'adir')!r} is a folder" in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    assert main(["-i", f, "-o", str(tmp_path / "afile" / "x.jsonl"), "--no-progress"]) == 2
    assert "prefix-attn generate: error: cannot write output" in capsys.readouterr().err
    assert _no_leftovers(tmp_path) and (tmp_path / "afile").read_text() == ""


def test_an_empty_output_or_one_that_names_a_folder_is_refused_before_the_model(tmp_path, capsys, no_model,
                                                                                 monkeypatch):
    """-o "" and -o newdir/ (a trailing separator: a folder) were refused only when the answers
    were moved into place, after the model had loaded and every request had run."""
    f = _write(tmp_path / "r.jsonl", ['{"prompt": "x"}'])
    monkeypatch.chdir(tmp_path)
    assert main(["-i", f, "-o", "", "--no-progress"]) == 2
    assert "error: output '' is empty: give a file name (or - for standard output)" in capsys.readouterr().err
    for out in ("newdir/", "r.jsonl/", "sub/newdir/", "newdir/.", "nd/sub/.."):  # the last two: a review
        assert main(["-i", f, "-o", out, "--no-progress"]) == 2
        assert f"error: output {out!r} names a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl"]


def test_output_that_is_the_request_file_is_refused(tmp_path, capsys, no_model):
    """-o naming the request file (or a link to it) replaced the requests with the answers."""
    f = _write(tmp_path / "r.jsonl", ['{"prompt": "x"}'])
    (tmp_path / "link.jsonl").symlink_to(f)
    for out in (f, str(tmp_path / "link.jsonl")):
        assert main(["-i", f, "-o", out, "--no-progress"]) == 2
        assert "is the request file" in capsys.readouterr().err
    assert open(f).read() == '{"prompt": "x"}\n'


def test_a_failure_after_the_output_opened_leaves_no_temporary_file_or_folder(tmp_path, capsys):
    f = _write(tmp_path / "r.jsonl", ['{"prompt": "x"}'])
    rc = main(["-i", f, "-o", str(tmp_path / "new" / "sub" / "o.jsonl"), "--model", str(tmp_path / "missing"),
               "--no-progress"])
    assert rc == 2 and "model folder not found" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("how", sorted(BROKEN_MODEL_FOLDERS))
def test_a_broken_model_folder_is_a_clean_error(tmp_path, capsys, how):
    """A folder with no weights file (OSError) or a truncated one (safetensors'
    SafetensorError) ended in a traceback."""
    folder = broken_model_folder(tmp_path / "model", how)
    capsys.readouterr()  # the save's progress bar
    f = _write(tmp_path / "r.jsonl", ['{"prompt": "x"}'])
    out = tmp_path / "o.jsonl"
    assert main(["-i", f, "-o", str(out), "--model", folder, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prefix-attn generate: error: cannot load a model from {folder}: ") and \
        BROKEN_MODEL_FOLDERS[how] in err and "Traceback" not in err, err
    assert not out.exists() and _no_leftovers(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clean_error(tmp_path, capsys, no_model):
    f = _write(tmp_path / "r.jsonl", ['{"prompt": "x"}'])
    assert main(["-i", f, "-o", str(tmp_path / "o.jsonl"), "--device", "cuda", "--no-progress"]) == 2
    assert "error: --device cuda: CUDA is not available" in capsys.readouterr().err
    assert _no_leftovers(tmp_path)


def test_non_utf8_line_is_named_and_a_byte_order_mark_is_accepted(tmp_path):
    (tmp_path / "r.jsonl").write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(RequestError, match=r"r.jsonl:2: not UTF-8 text \(byte 0xe9"):
        read_requests(str(tmp_path / "r.jsonl"))
    (tmp_path / "b.jsonl").write_bytes('\ufeff{"prompt": "bom"}\n{"prompt": "\u00e9"}\n'.encode("utf-8"))
    assert [r.prompt for r in read_requests(str(tmp_path / "b.jsonl"))] == ["bom", "\u00e9"]


# -- F16: every unknown prefix named before loading; empty input ------------------------------

def test_all_unknown_prefixes_are_named_before_the_model_loads(tmp_path, capsys, saved, no_model):
    lines = ['{"prompt": "x", "prefix": "t"}'] + [json.dumps({"prompt": "x", "prefix": f"bad{i}"}) for i in range(12)]
    out = tmp_path / "o.jsonl"
    rc = main(["-i", _write(tmp_path / "r.jsonl", lines), "-o", str(out), "--adapter", f"t={saved / 'adapter'}",
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "12 request(s) name an unknown prefix; known prefixes: ['t']" in err
    assert all(f"r.jsonl:{i + 2}: unknown prefix 'bad{i}'" in err for i in range(10))
    assert "bad10" not in err and "and 2 more" in err
    assert not out.exists() and _no_leftovers(tmp_path)


def test_a_typo_and_a_folder_of_the_other_kind_get_a_hint(tmp_path, capsys, saved, no_model):
    """An unknown prefix close to a known one; --bank given a PEFT adapter folder and
    --adapter given a saved bank folder: each error says what to do instead."""
    f = _write(tmp_path / "r.jsonl", ['{"prompt": "x", "prefix": "suport"}'])
    adapter = str(saved / "adapter")
    assert main(["-i", f, "-o", "-", "--adapter", f"support={adapter}", "--no-progress"]) == 2
    assert "r.jsonl:1: unknown prefix 'suport'; did you mean 'support'?" in capsys.readouterr().err
    assert main(["-i", f, "-o", "-", "--bank", adapter, "--no-progress"]) == 2
    assert "holds a PEFT adapter: load it as one (--adapter NAME=DIR" in capsys.readouterr().err
    assert main(["-i", f, "-o", "-", "--adapter", adapter]) == 2
    assert "--adapter expects NAME=DIR, e.g. --adapter support=out/adapter" in capsys.readouterr().err


def test_empty_input_is_a_notice_and_an_empty_output(tmp_path, capsys, no_model):
    f = _write(tmp_path / "r.jsonl", ["", "  "])
    out = tmp_path / "o.jsonl"
    out.write_text("stale answers\n")
    assert main(["-i", f, "-o", str(out), "--no-progress"]) == 0
    assert f"prefix-attn generate: no requests in {f}" in capsys.readouterr().err
    assert out.read_text() == ""


# -- F17: request ids ------------------------------------------------------------------------

@pytest.mark.parametrize("lines, pattern", [
    (['{"prompt": "a", "id": "x"}', '{"prompt": "b", "id": "x"}'],
     r"r.jsonl:2: duplicate id 'x', already used by line 1"),
    (['{"prompt": "a"}', '{"prompt": "b", "id": 1}'], r"r.jsonl:2: duplicate id 1, already used by line 1 \(a request"),
])
def test_duplicate_ids_are_refused(tmp_path, lines, pattern):
    with pytest.raises(RequestError, match=pattern):
        read_requests(_write(tmp_path / "r.jsonl", lines))


@pytest.mark.parametrize("name, lines, pattern", [
    ("r.jsonl", ['{"prompt": "a", "id": NaN}'], r"r.jsonl:1: NaN is not JSON \(Python's extension\)"),
    ("r.jsonl", ['{"prompt": "a"}', '{"prompt": "b", "id": 1e999}'], r"r.jsonl:2: 1e999 is beyond a float's range"),
    ("r.json", ['[{"prompt": "a", "id": -Infinity}]'], r"r.json:1: -Infinity is not JSON"),
])
def test_non_standard_json_numbers_are_refused(tmp_path, name, lines, pattern):
    """NaN / Infinity (and 1e999, read as inf) were accepted and written back into the answers
    as NaN / Infinity, which strict JSON readers refuse."""
    with pytest.raises(RequestError, match=pattern):
        read_requests(_write(tmp_path / name, lines))


def test_default_id_is_the_line_number(tmp_path):
    f = _write(tmp_path / "r.jsonl", ['{"prompt": "a", "id": 0}', "", '{"prompt": "b"}', '{"prompt": "c"}'])
    assert [r.id for r in read_requests(f)] == [0, 3, 4]


# -- F14: help ---------------------------------------------------------------------------------

def test_help_shows_the_formats_defaults_and_every_option(capsys):
    from prefix_attn.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    out = capsys.readouterr().out
    assert '"completion": "...", "num_tokens": 17, "finish_reason": "stop"}' in out and "default: the request's line number" in out
    assert "(default: 8)" in out and "(default: float32)" in out and "(default: None)" not in out
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    assert all(action.help for action in sub.choices["generate"]._actions)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_keeps_the_finished_results_in_a_partial_file(tmp_path, capsys, monkeypatch, sig):
    """Ctrl-C (or SIGTERM) in the middle: the results finished so far go to OUTPUT.partial, the
    output itself is not written (a pipeline would take it for complete), exit 128 + signal."""
    import os
    import signal

    f = _write(tmp_path / "req.jsonl", [json.dumps({"prompt": f"p{i}"}) for i in range(6)])
    out = tmp_path / "out.jsonl"
    real, calls = serve._result, []

    def result_then_signal(*a, **kw):
        calls.append(1)
        if len(calls) == 3:  # after the first batch of two
            os.kill(os.getpid(), getattr(signal, sig))
        return real(*a, **kw)

    monkeypatch.setattr(serve, "_result", result_then_signal)
    rc = main(["-i", str(f), "-o", str(out), "--max-new-tokens", "2", "--batch-size", "2",
               "--no-progress"])
    assert rc == 128 + getattr(signal, sig)
    assert not out.exists()
    kept = _results(str(out) + ".partial")
    assert [r["prompt"] for r in kept] == ["p0", "p1"]
    err = capsys.readouterr().err
    assert f"stopped: {sig}" in err and "2 of 6 requests" in err and "out.jsonl.partial" in err
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl.partial", "req.jsonl"]


@pytest.mark.parametrize("value,words", [("bogus", "not a backend"),
                                         ("cuda", "not available on this machine")])
def test_an_unusable_backend_setting_is_refused_before_the_model(tmp_path, capsys, no_model,
                                                                 monkeypatch, value, words):
    """PREFIX_ATTN_BACKEND naming no backend, or one this machine lacks (no CUDA here), was a
    traceback from the first attention call, after the model loaded."""
    if value == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", value)
    f = _write(tmp_path / "r.jsonl", ['{"prompt": "x"}'])
    assert main(["-i", f, "-o", str(tmp_path / "o.jsonl"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"PREFIX_ATTN_BACKEND={value}" in err.replace("'", "") and words in err
    assert _no_leftovers(tmp_path)


@pytest.mark.parametrize("spec,message", [("sys=", "--prompt-prefix 'sys=': the text after sys= is empty"),
                                          ("sys", "--prompt-prefix expects NAME=TEXT, e.g. --prompt-prefix sys='You are terse.', got 'sys'"),
                                          ("=Hi", "--prompt-prefix expects NAME=TEXT, e.g. --prompt-prefix sys='You are terse.', got '=Hi'")])
def test_a_malformed_prompt_prefix_says_what_is_wrong(tmp_path, capsys, no_model, spec, message):
    f = _write(tmp_path / "r.jsonl", ['{"prompt": "x"}'])
    assert main(["-i", f, "-o", str(tmp_path / "o.jsonl"), "--prompt-prefix", spec,
                 "--no-progress"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.hf
def test_token_ids_outside_the_vocabulary_name_the_line(tmp_path, capsys):
    """The byte tokenizer on a model of 128 ids: a non-ASCII byte in a request or a
    --prompt-prefix crashed in the embedding (IndexError); train already named the line."""
    folder = tmp_path / "small"
    tiny.tiny_model("llama", vocab_size=128).save_pretrained(str(folder))
    tiny.ByteTokenizer().save_pretrained(str(folder))
    f = _write(tmp_path / "r.jsonl", ['{"prompt": "plain"}', '{"prompt": "tilde ~"}',
                                      '{"prompt": "caf\u00e9"}'])
    out = tmp_path / "o.jsonl"
    args = ["-i", f, "-o", str(out), "--model", str(folder), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "2 request(s) with tokens the model does not have" in err
    assert "r.jsonl:2: token id 129 is outside the model's vocabulary of 128" in err
    assert "r.jsonl:3:" in err and "byte tokenizer" in err and not out.exists()
    f = _write(tmp_path / "ok.jsonl", ['{"prompt": "plain", "prefix": "s"}'])
    assert main(["-i", f, "-o", str(out), "--model", str(folder), "--no-progress",
                 "--prompt-prefix", "s=a ~"]) == 2
    assert "--prompt-prefix s: token id 129" in capsys.readouterr().err and not out.exists()


@pytest.mark.hf
def test_the_models_own_stop_tokens_end_a_completion(tmp_path, capsys):
    """generate passed the tokenizer's eos as eos_token_id, replacing the model's list (instruct
    models stop at end of turn too), and cut the text only there: completions ran on to
    --max-new-tokens. The greedy run's third token is made a second stop id here."""
    model = tiny.default_model()
    tok = tiny.ByteTokenizer()
    ids = tok.encode("hello")
    with torch.no_grad():
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    assert tok.eos_token_id not in greedy[:3]
    model.generation_config.eos_token_id = [tok.eos_token_id, greedy[2]]
    folder = tmp_path / "model"
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    f = _write(tmp_path / "r.jsonl", ['{"prompt": "hello"}'])
    assert main(["-i", f, "-o", str(tmp_path / "o.jsonl"), "--model", str(folder),
                 "--max-new-tokens", "6", "--no-progress"]) == 0
    (result,) = _results(tmp_path / "o.jsonl")
    assert result["num_tokens"] == 2 and result["completion"] == tok.decode(greedy[:2])
    assert serve._stop_ids(model, tok) == [tok.eos_token_id, greedy[2]]
    model.generation_config.eos_token_id = greedy[2]  # a fine-tune that changed only one of them
    assert serve._stop_ids(model, tok) == [greedy[2], tok.eos_token_id]


@pytest.mark.hf
def test_a_bank_from_another_model_warns_in_the_commands_words(tmp_path, capsys, saved):
    """The bank's warning came out as Python's (file:line: UserWarning plus a source line)."""
    other = tmp_path / "other"
    tiny.default_model(seed=1).save_pretrained(str(other))
    tiny.ByteTokenizer().save_pretrained(str(other))
    f = _write(tmp_path / "r.jsonl", ['{"prompt": "x", "prefix": "sys"}'])
    assert main(["-i", f, "-o", str(tmp_path / "o.jsonl"), "--model", str(other), "--bank",
                 str(saved / "bank"), "--max-new-tokens", "1", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "prefix-attn generate: warning: " in err and "computed by another model" in err
    assert "give them as --prompt-prefix NAME=TEXT" in err and "UserWarning" not in err


def test_request_fields_that_look_like_options_are_named(tmp_path, capsys, no_model):
    """{"seed": 7} in a request is copied to its result as if applied, and not applied (one
    generator draws for every batch); "max_new_tokens" is applied per request: not named."""
    f = _write(tmp_path / "r.jsonl", ['{"prompt": "x", "max_new_tokens": 2, "seed": 7}',
                                      '{"prompt": "y", "user": "u1"}'])
    with pytest.raises(AssertionError, match="the model was loaded"):
        main(["-i", f, "-o", str(tmp_path / "o.jsonl"), "--no-progress"])
    err = capsys.readouterr().err
    assert "warning: request field seed: not applied per request (the command's --seed applies to every request)" \
        in err
    assert "user" not in err and "max_new_tokens" not in err


@pytest.mark.hf
def test_standard_output_closed_by_its_reader_stops_quietly(tmp_path):
    """`-o - | head -1`: an error about a broken pipe, exit 2 (a usage error)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    f = _write(tmp_path / "r.jsonl", [json.dumps({"prompt": f"request {i}"}) for i in range(40)])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PYTHONUNBUFFERED", None)  # standard output block-buffered, as in a plain shell
    proc = subprocess.Popen([sys.executable, "-m", "prefix_attn.cli", "generate", "-i", f, "-o", "-",
                             "--batch-size", "1", "--max-new-tokens", "2", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert json.loads(proc.stdout.readline())["prompt"] == "request 0"
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert "stopped: standard output was closed after" in err and "Traceback" not in err
    # said once: not also as a failed batch ("1 of 40 requests were finished; ...")
    assert "requests were finished" not in err, err


def test_serve_unknown_prefix_error_names_some_of_a_large_bank():
    """A request file naming an unknown prefix against a bank of thousands: the refusal lists 20
    names and a count (it listed all of them). Kills: check_prefix_names printing ``known``."""
    from prefix_attn.serve_inputs import Request, RequestError, check_prefix_names

    known = [f"tenant-{i}" for i in range(3000)]
    with pytest.raises(RequestError) as info:
        check_prefix_names([Request("hi", prefix="nope", line=3)], known, "r.jsonl")
    msg = str(info.value)
    assert len(msg) < 800 and "and 2980 more" in msg and "r.jsonl:3: unknown prefix 'nope'" in msg
