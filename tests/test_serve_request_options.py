"""A request line of ``prefix-attn generate`` may set its own decoding: "max_new_tokens" (or
"max_tokens", "max_completion_tokens"), "stop", "do_sample", "temperature", "top_p", "top_k",
"min_p", "repetition_penalty", "num_beams". Each request gets the answer of a run whose options
were its settings; requests of equal settings share model.generate calls; bad fields are refused
before the model loads, every bad line named in one error."""
import json

import pytest

from prefix_attn import serve
from prefix_attn.serve import main
from prefix_attn.serve_batching import by_setting

pytestmark = pytest.mark.hf

# the command's options of the mixed runs below
BASE = {"max_new_tokens": 12, "stop": ["b"]}
# prompt and fields of each request: plain ones, each field alone, several together, null fields.
# In the built-in model's greedy answers (bytes) "<p" is in the first prompt's, "b" in the second's
MIXED = [
    ("hello there", {}),
    ("abc", {}),
    ("hello there", {"stop": "<p"}),
    ("abc", {"stop": []}),
    ("the quick brown fox", {"max_new_tokens": 5}),
    ("1 + 1 =", {"max_tokens": 7}),
    ("abc", {"repetition_penalty": 1.5}),
    ("the quick brown fox", {"num_beams": 2, "stop": ["<", "b"]}),
    ("hello there", {"do_sample": True, "top_k": 1, "temperature": 0.5}),
    ("1 + 1 =", {"temperature": None, "max_new_tokens": None}),
    ("hello there", {"repetition_penalty": 1.5}),
    ("the quick brown fox", {"max_new_tokens": 5, "max_completion_tokens": None}),
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _results(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _options(settings: dict) -> list:
    """The command line that gives ``settings`` (dest -> value) as options."""
    argv = []
    for name, value in settings.items():
        if name == "do_sample":
            argv += ["--do-sample"] if value else []
        elif name == "stop":
            argv += [a for text in ([value] if isinstance(value, str) else value) for a in ("--stop", text)]
        else:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def _answer(r):
    return r["completion"], r["num_tokens"], r["finish_reason"]


def _run(tmp_path, name, rows, *options):
    f = _write(tmp_path / f"{name}.in.jsonl", rows)
    out = tmp_path / f"{name}.jsonl"
    assert main(["-i", f, "-o", str(out), "--no-progress", *options]) == 0
    return _results(out)


def _alone(tmp_path, prompt, fields):
    """The answer of ``prompt`` run alone, with the command's options set to its fields."""
    settings = dict(BASE)
    for name, value in fields.items():
        if value is not None:
            settings["max_new_tokens" if name in ("max_tokens", "max_completion_tokens") else name] = value
    return _answer(_run(tmp_path, "alone", [{"prompt": prompt}], *_options(settings))[0])


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("alone")
    return [_alone(tmp_path, prompt, fields) for prompt, fields in MIXED]


@pytest.mark.parametrize("batch_size", ["1", "3"])
def test_each_request_gets_the_answer_of_a_run_with_its_settings_as_options(tmp_path, alone, batch_size):
    """Every request's answer is the one of a single-request run whose options are the command's
    with its fields in their place (null: the option's); the fields are copied to the result."""
    rows = [{"id": f"r{i}", "prompt": p, **fields} for i, (p, fields) in enumerate(MIXED)]
    res = _run(tmp_path, "mixed", rows, "--batch-size", batch_size, *_options(BASE))
    assert [r["id"] for r in res] == [r["id"] for r in rows]
    assert [_answer(r) for r in res] == alone
    assert all(r[k] == v for r, (_, fields) in zip(res, MIXED) for k, v in fields.items())
    # the fields matter: the same prompts with the command's options alone answer otherwise
    plain = _run(tmp_path, "plain", [{"prompt": p} for p, _ in MIXED], "--batch-size", batch_size, *_options(BASE))
    changed = [i for i, (a, b) in enumerate(zip(res, plain)) if _answer(a) != _answer(b)]
    assert changed == [i for i, (_, fields) in enumerate(MIXED) if any(v is not None for v in fields.values())
                       and fields.get("do_sample") is None]  # top_k 1 samples the greedy answer


def test_per_request_stop_texts_and_finish_reason(tmp_path):
    """"stop" is a text or an array of texts; the completion ends before it ("stop"), or runs to
    max_new_tokens ("length"); [] takes the command's --stop away from a request."""
    rows = [{"prompt": "hello there", "stop": "<p"}, {"prompt": "abc", "stop": ["zz", "b"]},
            {"prompt": "abc", "stop": []}, {"prompt": "abc"}]
    res = _run(tmp_path, "stops", rows, "--batch-size", "4", "--max-new-tokens", "12", "--stop", "<p")
    whole = _run(tmp_path, "whole", [{"prompt": "hello there"}, {"prompt": "abc"}], "--max-new-tokens", "12")
    first, second = whole[0]["completion"], whole[1]["completion"]
    assert [r["finish_reason"] for r in res] == ["stop", "stop", "length", "length"]
    assert res[0]["completion"] == first[:first.index("<p")] and res[0]["num_tokens"] == 6
    assert res[1]["completion"] == second[:second.index("b")] and res[1]["num_tokens"] == 4
    assert _answer(res[2]) == _answer(res[3]) == _answer(whole[1])  # "abc"'s answer holds no "<p"


def _watch_generate(monkeypatch):
    """Each model.generate call's rows (their prompt tokens) and decoding keywords."""
    load, calls = serve._load_model, []

    def load_and_watch(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        generate = model.generate

        def watched(input_ids, attention_mask, **kw):
            settings = {k: v for k, v in kw.items() if k not in ("prefixes", "pad_token_id", "eos_token_id")}
            settings["stopping_criteria"] = [c.stops for c in settings.get("stopping_criteria", [])]
            calls.append((attention_mask.sum(1).tolist(), settings))
            return generate(input_ids, attention_mask=attention_mask, **kw)

        model.generate = watched
        return model, tokenizer

    monkeypatch.setattr(serve, "_load_model", load_and_watch)
    return calls


def test_requests_of_equal_settings_share_generate_calls(tmp_path, monkeypatch):
    """One model.generate call per batch of a setting: the groups' batches longest first, each
    holding requests of one setting, cut by length as before; greedy requests whose sampling
    values differ decode alike and share calls (a "temperature" of 0 is OpenAI's greedy decoding)."""
    prompts = ["a" * n for n in (3, 9, 5, 7, 2, 8, 4, 6)]  # prompt tokens: one more (start token)
    fields = [{}, {"max_new_tokens": 3}, {}, {"max_new_tokens": 3, "temperature": 0},
              {"stop": "x"}, {}, {"max_tokens": 3}, {"stop": ["x"], "top_k": 3}]
    calls = _watch_generate(monkeypatch)
    _run(tmp_path, "groups", [{"prompt": p, **f} for p, f in zip(prompts, fields)],
         "--batch-size", "2", "--max-new-tokens", "4")
    plain = {"max_new_tokens": 4, "do_sample": False, "num_beams": 1, "repetition_penalty": 1.0,
             "stopping_criteria": []}
    three, stop = dict(plain, max_new_tokens=3), dict(plain, stopping_criteria=[["x"]])
    assert calls == [([10, 8], three), ([9, 6], plain), ([7, 3], stop), ([5], three), ([4], plain)]


def test_by_setting_groups_then_cuts_by_length_longest_first():
    assert by_setting([3, 9, 5, 7, 2, 8], ["a", "b", "a", "b", "a", "a"], 2) == [[1, 3], [5, 2], [0, 4]]
    # one setting: by_length's batches
    assert by_setting([3, 9, 3, 1, 9, 4], [0] * 6, 2) == [[1, 4], [5, 0], [2, 3]]
    assert by_setting([], [], 4) == []


def test_the_length_check_uses_each_request_s_max_new_tokens(tmp_path, capsys):
    """The built-in model has 256 positions: a 201-token prompt with 100 new tokens does not
    fit (named with its own count), one with its own 4 does although --max-new-tokens 100 would
    not: it runs."""
    rows = [{"prompt": "x" * 200, "max_new_tokens": 100}, {"prompt": "y"}, {"prompt": "x" * 200, "max_tokens": 60}]
    f = _write(tmp_path / "r.jsonl", rows)
    assert main(["-i", f, "-o", str(tmp_path / "o.jsonl"), "--max-new-tokens", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "2 request(s) longer than the model's 256 positions" in err
    assert f"{f}:1: 201 prompt tokens + 0 prefix tokens (prefix none) + 100 new tokens = 301" in err
    assert f"{f}:3: 201 prompt tokens + 0 prefix tokens (prefix none) + 60 new tokens = 261" in err
    assert not (tmp_path / "o.jsonl").exists()
    f = _write(tmp_path / "r2.jsonl", [{"prompt": "x" * 200, "max_new_tokens": 4}, {"prompt": "y"}])
    res = _run(tmp_path, "fits", _results(f), "--max-new-tokens", "40")
    assert [r["num_tokens"] for r in res] == [4, 40]


@pytest.mark.parametrize("line, message", [
    ({"temperature": -1}, "'temperature': must be > 0, got -1"),
    ({"temperature": 0, "do_sample": True}, "'temperature' 0 is greedy decoding: it cannot go with 'do_sample': true"),
    ({"top_p": 1.5}, "'top_p': must be in (0, 1], got 1.5"),
    ({"top_k": -1}, "'top_k': must be at least 0, got -1"),
    ({"top_k": 2.5}, "'top_k': expected an integer, got '2.5'"),
    ({"min_p": "0.1"}, "'min_p': must be a number, got a string"),
    ({"repetition_penalty": 0}, "'repetition_penalty': must be > 0, got 0"),
    ({"num_beams": 0}, "'num_beams': must be at least 1, got 0"),
    ({"max_new_tokens": True}, "'max_new_tokens': must be a number, got a boolean"),
    ({"max_tokens": 0}, "'max_tokens': must be at least 1, got 0"),
    ({"max_new_tokens": 3, "max_tokens": 3}, "'max_new_tokens' and 'max_tokens' both give max_new_tokens: give one"),
    ({"do_sample": "yes"}, "'do_sample': must be true or false, got a string"),
    ({"stop": ""}, "'stop': the stop text must not be empty"),
    ({"stop": ["a", 1]}, "'stop': must be a string or an array of strings, got an array holding a number"),
    ({"stop": {"a": 1}}, "'stop': must be a string or an array of strings, got an object"),
])
def test_a_bad_field_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, line, message):
    monkeypatch.setattr(serve, "_load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    f = _write(tmp_path / "r.jsonl", [{"prompt": "a"}, {"prompt": "b", **line}])
    assert main(["-i", f, "-o", str(tmp_path / "o.jsonl"), "--no-progress"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"  {f}:2: {message}"
    assert not (tmp_path / "o.jsonl").exists()


def test_every_bad_field_of_every_line_in_one_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(serve, "_load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    f = _write(tmp_path / "r.jsonl", [{"prompt": "a", "top_p": 0, "num_beams": 0}, {"prompt": "b"},
                                      {"prompt": "c", "stop": [""]}])
    assert main(["-i", f, "-o", str(tmp_path / "o.jsonl"), "--no-progress"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "prefix-attn generate: error: 3 bad decoding field(s) (each takes what the command's option of the "
        "same name takes):",
        f"  {f}:1: 'top_p': must be in (0, 1], got 0",
        f"  {f}:1: 'num_beams': must be at least 1, got 0",
        f"  {f}:3: 'stop': the stop text must not be empty"]


def test_sampling_fields_and_options_unused_are_named_in_warnings(tmp_path, capsys):
    """A request's sampling fields without sampling are named with its line; the command's
    --top-k is used once a request samples ("do_sample": true): no warning of it then."""
    rows = [{"prompt": "a", "temperature": 0.5, "do_sample": False}, {"prompt": "b", "do_sample": True},
            {"prompt": "c", "do_sample": False, "top_p": 0.5, "min_p": 0.1}]
    f = _write(tmp_path / "r.jsonl", rows)
    assert main(["-i", f, "-o", str(tmp_path / "o.jsonl"), "--max-new-tokens", "2", "--top-k", "5",
                 "--no-progress"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [f"prefix-attn generate: warning: request fields min_p, temperature, top_p apply with do_sample "
                   f"only: not used by {f}:1, {f}:3, which decode without sampling (do_sample false: the "
                   "request's field, else the command's --do-sample)"]


def test_sampled_requests_are_reproducible_for_a_file_batch_size_and_options(tmp_path):
    """Requests that sample by their own fields are sampled (not the greedy answers), and the same
    file, batch size and options (--seed included) give the same answers again."""
    rows = [{"prompt": p, "do_sample": True, "temperature": 1.5} for p in ("hello there", "abc", "1 + 1 =")]
    rows.insert(1, {"prompt": "abc"})
    runs = [_run(tmp_path, f"s{i}", rows, "--batch-size", "2", "--seed", "3", "--max-new-tokens", "8")
            for i in range(2)]
    greedy = _run(tmp_path, "greedy", [{"prompt": r["prompt"]} for r in rows], "--max-new-tokens", "8")
    assert runs[0] == runs[1]
    assert [a["completion"] != b["completion"] for a, b in zip(runs[0], greedy)] == [True, False, True, True]


def test_a_request_s_temperature_decides_whether_it_samples_as_openai_s_does(tmp_path):
    """OpenAI's API samples at a request's "temperature" and decodes greedily at 0; a request
    giving only a temperature samples (as with "do_sample": true), at 0 it gets the greedy answer
    (a 400 "must be > 0" before), and "do_sample" given decides (false: greedy, the temperature
    unused). The command's --temperature alone does not sample: --do-sample does."""
    prompts = ("hello there", "abc", "1 + 1 =")
    greedy = _run(tmp_path, "greedy", [{"prompt": p} for p in prompts], "--max-new-tokens", "8")
    zero = _run(tmp_path, "zero", [{"prompt": p, "temperature": 0} for p in prompts], "--max-new-tokens", "8")
    hot = _run(tmp_path, "hot", [{"prompt": p, "temperature": 1.5} for p in prompts], "--max-new-tokens", "8")
    told = _run(tmp_path, "told", [{"prompt": p, "temperature": 1.5, "do_sample": True} for p in prompts],
                "--max-new-tokens", "8")
    kept = _run(tmp_path, "kept", [{"prompt": p, "temperature": 1.5, "do_sample": False} for p in prompts],
                "--max-new-tokens", "8")
    option = _run(tmp_path, "option", [{"prompt": p} for p in prompts], "--max-new-tokens", "8",
                  "--temperature", "1.5")
    completions = {name: [r["completion"] for r in run] for name, run in
                   dict(greedy=greedy, zero=zero, hot=hot, told=told, kept=kept, option=option).items()}
    assert completions["zero"] == completions["kept"] == completions["option"] == completions["greedy"]
    assert completions["hot"] == completions["told"] != completions["greedy"]
