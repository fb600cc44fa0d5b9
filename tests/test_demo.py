"""`prefix-attn demo` runs end to end (few steps; the check and the benchmark table are
covered by their own tests)."""
import re

import pytest
from conftest import BROKEN_MODEL_FOLDERS, broken_model_folder

from prefix_attn import cli


@pytest.mark.hf
def test_demo_runs_end_to_end(capsys):
    rc = cli.main(["demo", "--skip-check", "--skip-bench", "--pretrain-steps", "3", "--steps", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "trainable:" in out and "% )" not in out
    assert "[    poet]" in out and "[    shop]" in out and "demo finished" in out


def test_benchmark_table_rows(monkeypatch):
    from prefix_attn import demo
    calls = []

    def paired(fns, reps, bar=None):  # timing is not under test: ours and the baseline, in order
        calls.append(len(fns))
        if bar is not None:
            bar.update(reps)
        return [1.0, 2.0]

    monkeypatch.setattr(demo, "paired_ms", paired)
    rows = demo.benchmark("cpu", reps=1)
    assert calls == [2, 2, 2] and all(r["speedup"] == 2.0 for r in rows[:3])
    assert [r["what"].split(" ")[0] for r in rows] == ["prefill", "decode,", "training", "prefix"]
    assert rows[-1]["speedup"] == pytest.approx(64.0)  # one held copy per row of 64


def test_demo_says_which_backend_it_times_and_why_another_is_missing(monkeypatch, capsys):
    """Without the C++ extension (a failed build, PREFIX_ATTN_NO_EXT=1) the demo timed the
    pure-PyTorch reference as "ours", slower than the PEFT path, and never said why."""
    from prefix_attn import backends, demo
    monkeypatch.delenv(backends.ENV_BACKEND, raising=False)
    monkeypatch.setattr(backends, "available_backends", lambda: ["torch"])
    monkeypatch.setattr(backends, "load_errors",
                        lambda: {"prefix_attn.cpp_backend": "ImportError: _C is not built"})
    monkeypatch.setattr(demo, "paired_ms", lambda fns, reps, bar=None: [1.0, 2.0])
    assert demo.show_check("cpu")
    demo.benchmark("cpu", reps=1)
    out = capsys.readouterr().out
    assert "(not loaded: prefix_attn.cpp_backend: ImportError: _C is not built)" in out
    assert "ours: the 'torch' backend" in out and "the fast backends did not load" in out


def test_demo_benchmark_names_the_backend_it_times(monkeypatch):
    from prefix_attn import backends, demo
    inputs = demo._kernel_inputs(1, 2, 1, 3, 3, 2, 8, "cpu")
    monkeypatch.setenv(backends.ENV_BACKEND, "torch")
    assert demo._ours_backend(*inputs) == "torch"
    monkeypatch.delenv(backends.ENV_BACKEND)
    expected = "cpu" if "cpu" in backends.available_backends() else "torch"
    assert demo._ours_backend(*inputs) == expected


@pytest.mark.hf
def test_demo_on_a_local_model_folder(tmp_path, capsys):
    from prefix_attn import tiny
    tiny.default_model(hidden=32, layers=1).save_pretrained(tmp_path)
    tiny.ByteTokenizer().save_pretrained(tmp_path)
    rc = cli.main(["demo", "--model", str(tmp_path), "--skip-check", "--skip-bench", "--steps", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "[    shop]" in out and "demo finished" in out


def _hf_model_folder(folder, start_token=True):
    """The built-in tiny Llama saved with a word-level HF (fast) tokenizer of the demo's words,
    which puts a start token before each text when ``start_token``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from prefix_attn import demo, tiny

    text = " ".join(demo.CORPUS)  # the served prompts too: "roses", "one two", "apples"
    words = list(dict.fromkeys(["<pad>", "<s>", "</s>", "<unk>", *re.findall(r"\w+|[^\w\s]", text)]))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if start_token:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(folder))
    tiny.tiny_model("llama", vocab_size=len(words), hidden=32, layers=1).save_pretrained(str(folder))
    return str(folder)


@pytest.mark.hf
def test_demo_on_a_folder_with_an_hf_tokenizer(tmp_path, capsys):
    """Section 3 called the tokenizer on its three prompts without padding=True: an HF
    tokenizer (unlike the byte tokenizer, which always pads) refused to make one tensor of
    rows of different lengths, and the demo died in a traceback."""
    folder = _hf_model_folder(tmp_path)
    rc = cli.main(["demo", "--model", folder, "--skip-check", "--skip-bench", "--steps", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "[    shop]" in out and "demo finished" in out


@pytest.mark.hf
@pytest.mark.parametrize("tokenizer", ["byte", "hf"])
def test_demo_serves_the_prompt_prefix_row_without_a_start_token(tmp_path, monkeypatch, tokenizer):
    """The prompt-prefix row of section 3 (a bank entry made by add_prompt, whose KV holds the
    start token already) was tokenized with special tokens: a second start token in the middle
    of the text, and a continuation the model would never give. It runs without one now, as
    prefix-attn generate runs it; the trained prefixes' rows keep theirs."""
    from prefix_attn import demo, tiny
    from prefix_attn.tuning import prefix_tuning

    if tokenizer == "byte":
        model, tok = tiny.default_model(hidden=32, layers=1), tiny.ByteTokenizer()
    else:
        folder = _hf_model_folder(tmp_path)
        model, tok = demo.load_base(folder, "cpu", 0, 0)
    for name in demo.TASKS:
        prefix_tuning(model, num_virtual_tokens=2, name=name)
    seen = {}
    real = model.generate

    def generate(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    demo.serve_mixed_batch(model.eval(), tok, "cpu", max_new_tokens=2)
    assert seen["prefixes"] == ["poet", "counter", "shop"]
    rows = [r[m.bool()].tolist() for r, m in zip(seen["input_ids"], seen["attention_mask"])]
    assert rows == [tok.encode("roses"), tok.encode("one two"), tok.encode("apples", add_special_tokens=False)]
    assert rows[0][0] == tok.bos_token_id and tok.bos_token_id not in rows[2]


def test_demo_check_that_runs_nothing_is_not_a_pass(monkeypatch, capsys):
    """Section 1 counted an empty table (no backend ran on the device) as every check passed."""
    import dataclasses

    from prefix_attn import check, demo

    real = check.get_backend
    monkeypatch.setattr(check, "get_backend", lambda name: dataclasses.replace(real(name), devices=("cuda",)))
    monkeypatch.setattr(check, "available_backends", lambda: ["torch"])
    assert demo.show_check("cpu") is False
    assert "nothing was checked: torch runs on cuda tensors, not cpu" in capsys.readouterr().out


def test_demo_usage_errors_exit_2(tmp_path, capsys):
    for value, words in (("abc", "expected an integer, got 'abc'"), ("0", "must be at least 1, got 0")):
        with pytest.raises(SystemExit) as info:  # "abc" was an "invalid _positive value"
            cli.main(["demo", "--steps", value])
        assert info.value.code == 2 and f"argument --steps: {words}" in capsys.readouterr().err
    assert cli.main(["demo", "--model", str(tmp_path / "missing")]) == 2
    assert "model folder not found" in capsys.readouterr().err


@pytest.mark.hf
@pytest.mark.parametrize("how", sorted(BROKEN_MODEL_FOLDERS))
def test_demo_on_a_broken_model_folder_is_a_usage_error(tmp_path, capsys, how):
    """A config.json without model_type (and a folder without weights, or with truncated
    ones) ended in a traceback, after section 1 had run; now nothing runs."""
    folder = broken_model_folder(tmp_path / "model", how)
    capsys.readouterr()  # the save's progress bar
    assert cli.main(["demo", "--model", folder, "--skip-bench"]) == 2
    out = capsys.readouterr()
    assert out.err.startswith(f"prefix-attn demo: error: cannot load a model from {folder}: ")
    assert BROKEN_MODEL_FOLDERS[how] in out.err and out.out == ""


def test_paired_timing_alternates_the_functions():
    from prefix_attn import demo
    order = []
    ms = demo.paired_ms([lambda: order.append("a"), lambda: order.append("b")], 3)
    assert order == ["a", "b"] * 4 and len(ms) == 2 and all(m >= 0 for m in ms)


def test_demo_folder_without_a_tokenizer_is_a_usage_error(tmp_path, capsys):
    from prefix_attn import tiny
    tiny.default_model(hidden=32, layers=1).save_pretrained(tmp_path)
    assert cli.main(["demo", "--model", str(tmp_path), "--skip-bench"]) == 2
    assert "no tokenizer in the model folder" in capsys.readouterr().err
