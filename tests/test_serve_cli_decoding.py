"""``prefix-attn generate``'s decoding options: --top-k, --min-p, --repetition-penalty, --stop,
the "finish_reason" of each result, and a model folder's generation_config.json (not applied)."""
import json

import pytest
import torch

from prefix_attn import serve, tiny
from prefix_attn.serve import main
from test_serve_cli import save_word_level_model

pytestmark = pytest.mark.hf

PROMPTS = ["hello there", "abc", "the quick brown fox", "1 + 1 ="]
NEW = 12
# in the built-in model's greedy answers (bytes): "<p" in the first (its 5th and 6th new bytes),
# "b" in the second (its 4th); the other two hold neither
STOPS = ["<p", "b"]


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _results(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _save(folder, model=None):
    model = model if model is not None else tiny.default_model()
    model.save_pretrained(str(folder))
    tiny.ByteTokenizer().save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The built-in default model saved as a folder, with its byte tokenizer."""
    return _save(tmp_path_factory.mktemp("model"))


def _run(tmp_path, model_dir, name, *options, capsys=None):
    f = _write(tmp_path / "req.jsonl", [json.dumps({"prompt": p}) for p in PROMPTS])
    out = tmp_path / f"{name}.jsonl"
    assert main(["-i", f, "-o", str(out), "--model", model_dir, "--max-new-tokens", str(NEW),
                 "--no-progress", *options]) == 0
    return _results(out)


def _generate(prompt, **kwargs):
    """The new tokens of the built-in model's model.generate on ``prompt`` alone."""
    tok = tiny.ByteTokenizer()
    ids = tok.encode(prompt)
    with torch.no_grad():
        out = tiny.default_model().generate(torch.tensor([ids]), max_new_tokens=NEW, pad_token_id=tok.pad_token_id,
                                            eos_token_id=tok.eos_token_id, **kwargs)
    return out[0, len(ids):].tolist()


def record_calls(monkeypatch) -> list:
    """``(keywords, new tokens' width)`` of each model.generate call of the command."""
    calls, load_model = [], serve._load_model

    def recording_load(*args, **kwargs):
        model, tok = load_model(*args, **kwargs)
        generate = model.generate

        def recording_generate(input_ids, **kw):
            out = generate(input_ids, **kw)
            calls.append((kw, out.shape[1] - input_ids.shape[1]))
            return out
        model.generate = recording_generate
        return model, tok
    monkeypatch.setattr(serve, "_load_model", recording_load)
    return calls


# -- --stop and finish_reason ------------------------------------------------------------------

@pytest.mark.parametrize("batch_size", ["1", "3"])
def test_stop_texts_cut_the_greedy_answers(tmp_path, model_dir, batch_size):
    """Each answer is the greedy one cut before the first stop text it holds (rows that hold none
    unchanged, in a batch with rows that stop); num_tokens counts the tokens up to the one that
    completed the stop text; finish_reason is "stop" there, "length" where the tokens ran out."""
    tok = tiny.ByteTokenizer()
    greedy = [_generate(p, do_sample=False) for p in PROMPTS]
    res = _run(tmp_path, model_dir, "stop", "--batch-size", batch_size, *[a for s in STOPS for a in ("--stop", s)])
    held = 0
    for r, tokens in zip(res, greedy):
        text, raw = tok.decode(tokens), bytes(t - 3 for t in tokens)  # byte b is token b + 3
        ends = [raw.find(s.encode()) + len(s) for s in STOPS if s.encode() in raw]
        if ends:
            held += 1
            cut = min(text.find(s) for s in STOPS if s in text)
            assert (r["completion"], r["num_tokens"], r["finish_reason"]) == (text[:cut], min(ends), "stop")
        else:
            assert (r["completion"], r["num_tokens"], r["finish_reason"]) == (text, NEW, "length")
    assert held == 2  # rows that stop and rows that do not


def test_a_row_that_reaches_its_stop_text_generates_no_further(tmp_path, model_dir, monkeypatch):
    """Alone in its batch, the first request ends its model.generate at its stop text (6 new
    tokens, not --max-new-tokens): no step is spent past it."""
    calls = record_calls(monkeypatch)
    res = _run(tmp_path, model_dir, "alone", "--batch-size", "1", "--stop", "<p")
    assert res[0]["num_tokens"] == 6 and res[0]["finish_reason"] == "stop"
    assert sorted(width for _, width in calls) == [6, NEW, NEW, NEW]


def test_stop_texts_with_beams_do_not_depend_on_the_batch(tmp_path, model_dir, monkeypatch):
    """With --num-beams each beam ends at its stop text: no answer holds one, some stop early
    (their beam search too), and batch sizes 1 and 3 give the same answers."""
    calls = record_calls(monkeypatch)
    runs = [_run(tmp_path, model_dir, f"beams{b}", "--num-beams", "3", "--batch-size", b,
                 "--stop", "<", "--stop", "b") for b in ("1", "3")]
    assert runs[0] == runs[1]
    assert min(width for _, width in calls[:len(PROMPTS)]) < NEW  # alone, a row ended its search
    assert all("<" not in r["completion"] and "b" not in r["completion"] for r in runs[0])
    assert any(r["finish_reason"] == "stop" and r["num_tokens"] < NEW for r in runs[0])


def test_finish_reason_of_an_end_of_sequence_id(tmp_path):
    """A completion ended by a stop id is "stop" (the id not counted), the others "length"."""
    greedy = _generate("hello there", do_sample=False)
    model = tiny.default_model()
    model.generation_config.eos_token_id = [tiny.ByteTokenizer().eos_token_id, greedy[2]]
    folder = _save(tmp_path / "model", model)
    ends = [_generate(p, do_sample=False) for p in PROMPTS]
    expected = [("stop", t.index(greedy[2])) if greedy[2] in t else ("length", NEW) for t in ends]
    assert expected[0] == ("stop", 2) and ("length", NEW) in expected
    res = _run(tmp_path, folder, "eos", "--batch-size", "3")
    assert [(r["finish_reason"], r["num_tokens"]) for r in res] == expected


# -- --repetition-penalty, --top-k, --min-p ----------------------------------------------------

def test_repetition_penalty_is_model_generate_s(tmp_path, model_dir):
    """--repetition-penalty changes the greedy answers as model.generate(repetition_penalty=)
    does, in batches."""
    tok = tiny.ByteTokenizer()
    plain = _run(tmp_path, model_dir, "plain", "--batch-size", "3")
    penalised = _run(tmp_path, model_dir, "penalised", "--batch-size", "3", "--repetition-penalty", "1.5")
    assert [r["completion"] for r in penalised] == [tok.decode(_generate(p, do_sample=False, repetition_penalty=1.5))
                                                   for p in PROMPTS]
    assert all(a["completion"] != b["completion"] for a, b in zip(plain, penalised))


def test_top_k_1_and_min_p_1_sample_the_greedy_answers(tmp_path, model_dir):
    """--top-k 1 and --min-p 1 leave only the likeliest token to sample: the greedy answers,
    where plain sampling with the same seed differs."""
    greedy = _run(tmp_path, model_dir, "greedy")
    sampled = _run(tmp_path, model_dir, "sampled", "--do-sample", "--seed", "3")
    top_k = _run(tmp_path, model_dir, "top_k", "--do-sample", "--seed", "3", "--top-k", "1")
    min_p = _run(tmp_path, model_dir, "min_p", "--do-sample", "--seed", "3", "--min-p", "1")
    assert top_k == greedy and min_p == greedy
    assert all(a["completion"] != b["completion"] for a, b in zip(sampled, greedy))


def test_decoding_keywords_given_to_generate(tmp_path, model_dir, monkeypatch):
    """Every decoding value is given to model.generate: the options' defaults when sampling
    (top_k 0, not transformers' 50; min_p off) and the values given."""
    calls = record_calls(monkeypatch)
    _run(tmp_path, model_dir, "defaults", "--do-sample", "--batch-size", "4")
    _run(tmp_path, model_dir, "given", "--do-sample", "--batch-size", "4", "--top-k", "5", "--min-p", "0.25",
         "--repetition-penalty", "1.2", "--temperature", "0.5", "--top-p", "0.9")
    keys = ("do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    assert [tuple(kw[k] for k in keys) for kw, _ in calls] == [(True, 1.0, 1.0, 0, None, 1.0),
                                                             (True, 0.5, 0.9, 5, 0.25, 1.2)]


def test_the_model_folder_s_generation_config_is_not_applied(tmp_path, model_dir, capsys):
    """A folder whose generation_config.json sets repetition_penalty, no_repeat_ngram_size (no
    option gives it: model.generate took it from the folder) and sampling values answers as one
    without them, greedy by default; a note names the values not applied; --repetition-penalty
    gives the penalty."""
    model = tiny.default_model()
    model.generation_config.update(repetition_penalty=1.5, no_repeat_ngram_size=2, do_sample=True,
                                   temperature=0.7, top_k=5)
    folder = _save(tmp_path / "model", model)
    assert '"repetition_penalty": 1.5' in open(f"{folder}/generation_config.json").read()
    capsys.readouterr()
    assert _run(tmp_path, folder, "set") == _run(tmp_path, model_dir, "plain")
    err = capsys.readouterr().err
    assert "generation_config.json sets do_sample=true, no_repeat_ngram_size=2, repetition_penalty=1.5, " \
           "temperature=0.7, top_k=5: not applied" in err
    assert _run(tmp_path, folder, "given", "--repetition-penalty", "1.5") \
        == _run(tmp_path, model_dir, "plain_given", "--repetition-penalty", "1.5")
    assert "note" not in _run_err(tmp_path, model_dir, capsys)  # nothing to drop: no note


def _run_err(tmp_path, model_dir, capsys):
    capsys.readouterr()
    _run(tmp_path, model_dir, "quiet")
    return capsys.readouterr().err


# -- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value, message", [
    ("--top-k", "-1", "argument --top-k: must be at least 0, got -1"),
    ("--top-k", "2.5", "argument --top-k: expected an integer, got '2.5'"),
    ("--min-p", "1.5", "argument --min-p: must be in [0, 1], got 1.5"),
    ("--min-p", "nan", "argument --min-p: must be in [0, 1], got nan"),
    ("--repetition-penalty", "0", "argument --repetition-penalty: must be > 0, got 0"),
    ("--repetition-penalty", "inf", "argument --repetition-penalty: must be > 0, got inf"),
    ("--stop", "", "argument --stop: the stop text must not be empty"),
])
def test_bad_decoding_values_are_usage_errors(tmp_path, capsys, monkeypatch, option, value, message):
    """A bad value is one usage error line naming the option (exit status 2) before the model
    loads; no output is written."""
    monkeypatch.setattr(serve, "_load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    f = _write(tmp_path / "req.jsonl", ['{"prompt": "a"}'])
    with pytest.raises(SystemExit) as exit_:
        main(["-i", f, "-o", str(tmp_path / "o.jsonl"), option, value])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"prefix-attn generate: error: {message}"
    assert not (tmp_path / "o.jsonl").exists()


def test_request_fields_of_the_new_options_are_applied_not_warned_of(tmp_path, capsys):
    """"top_k" and "stop" in a request apply to it (tests/test_serve_request_options.py): no
    "not applied" warning names them; top_k without sampling is named as unused."""
    f = _write(tmp_path / "req.jsonl", ['{"prompt": "a", "top_k": 3, "stop": ["x"]}'])
    assert main(["-i", f, "-o", str(tmp_path / "o.jsonl"), "--max-new-tokens", "2", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "not applied per request" not in err
    assert f"warning: request field top_k applies with do_sample only: not used by {f}:1, which decodes " \
           "without sampling" in err


def test_a_stop_text_that_is_not_utf8_is_a_usage_error(tmp_path, capsys):
    f = _write(tmp_path / "req.jsonl", ['{"prompt": "a"}'])
    with pytest.raises(SystemExit) as exit_:
        main(["-i", f, "-o", str(tmp_path / "o.jsonl"), "--stop", b"ab\xff".decode("utf-8", "surrogateescape")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        "prefix-attn generate: error: argument --stop: the stop text is not UTF-8 (byte 0xff at character 3)"


def test_stop_texts_with_a_transformers_tokenizer_without_pad_or_end_token(tmp_path):
    """A word-level transformers tokenizer with neither a pad nor an end token: a row that reaches
    its stop text in a batch goes on with real tokens (nothing to pad it with) until the other row
    ends, and its answer is still the greedy one cut there, counted to the stop text's token."""
    folder = save_word_level_model(tmp_path / "model")
    f = _write(tmp_path / "req.jsonl", [json.dumps({"prompt": "e e"}), json.dumps({"prompt": "g"})])

    def run(name, *options):
        out = tmp_path / f"{name}.jsonl"
        assert main(["-i", f, "-o", str(out), "--model", str(folder), "--max-new-tokens", "8",
                     "--batch-size", "2", "--no-progress", *options]) == 0
        return [(r["completion"], r["num_tokens"], r["finish_reason"]) for r in _results(out)]

    # greedy tokens: c c c <unk> b b b b (<unk> is special: left out of the text) and d x 8
    assert run("plain") == [("c c c b b b b", 8, "length"), ("d d d d d d d d", 8, "length")]
    # "c b" is complete at the 5th token: the row runs on with the other, cut back to it
    assert run("stop", "--stop", "c b") == [("c c ", 5, "stop"), ("d d d d d d d d", 8, "length")]


@pytest.mark.parametrize("options, warning", [
    (["--top-k", "5"], "warning: --top-k applies with --do-sample only: without it decoding is greedy and it is "
                       "not used"),
    (["--temperature", "0.5", "--min-p", "0.1", "--num-beams", "2"],
     "warning: --temperature, --min-p apply with --do-sample only: without it decoding is greedy (beam search) "
     "and they are not used"),
    (["--top-k", "5", "--do-sample"], None),
    (["--top-k", "0", "--temperature", "1"], None),  # the defaults: nothing is lost
])
def test_sampling_options_without_do_sample_are_named_in_a_warning(tmp_path, capsys, options, warning):
    """Greedy decoding and beam search do not sample: sampling options given without
    --do-sample were silently unused."""
    f = _write(tmp_path / "req.jsonl", ['{"prompt": "a"}'])
    assert main(["-i", f, "-o", str(tmp_path / "o.jsonl"), "--max-new-tokens", "2", "--no-progress", *options]) == 0
    err = capsys.readouterr().err
    assert (f"prefix-attn generate: {warning}" in err) if warning else "warning" not in err


def test_the_stop_criterion_decodes_a_window_of_the_last_tokens_and_finds_multibyte_stops():
    """It decoded each row's whole completion at every step (1.1 s over 1024 steps of 8 rows
    with a BPE tokenizer, growing with the square of the length); now a window of the last
    tokens, which still holds a stop text of several multi-byte characters the newest token
    completes (each is 2 byte tokens here), after a prompt and 500 tokens."""
    from prefix_attn.serve_stop import StopTexts

    tok = tiny.ByteTokenizer()
    decoded = []
    real_decode = tok.decode
    tok.decode = lambda ids, **kw: decoded.append(len(ids)) or real_decode(ids, **kw)
    stop = "éàü"
    prompt = tok.encode("a prompt")
    body = tok.encode("x" * 500, add_special_tokens=False)
    ends = tok.encode(stop, add_special_tokens=False)
    rows = torch.tensor([prompt + body + ends, prompt + body + tok.encode("eau", add_special_tokens=False) + ends[3:]])
    criterion = StopTexts(tok, [stop], len(prompt), [tok.eos_token_id], None)
    assert criterion(rows, None).tolist() == [True, False]
    assert max(decoded) <= criterion.window < 100
    assert criterion(rows[:, :-1], None).tolist() == [False, False]  # the last byte of "ü" missing


@pytest.mark.parametrize("private_defaults", [True, False])
def test_the_model_s_decoding_values_are_dropped_without_transformers_private_defaults(monkeypatch, private_defaults):
    """The defaults come from a private helper of transformers 5 (GenerationConfig.
    _get_default_generation_params); without it, GenerationConfig()'s, not an AttributeError."""
    from transformers import GenerationConfig

    model = tiny.tiny_model("llama")
    model.generation_config = GenerationConfig(repetition_penalty=1.5, eos_token_id=2, top_k=50)
    if not private_defaults:  # as an older transformers (which does not call it either)
        monkeypatch.setattr(GenerationConfig, "_get_default_generation_params", None)
    dropped = serve._drop_model_decoding(model)
    assert dropped["repetition_penalty"] == 1.5 and model.generation_config.eos_token_id == 2
    assert model.generation_config.repetition_penalty in (None, 1.0)
