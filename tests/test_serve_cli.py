"""``prefix-attn generate`` (prefix_attn.serve): request parsing, batching, outputs, errors."""
import json

import pytest
import torch

from prefix_attn.serve import RequestError, main, read_requests


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_read_requests_parses_and_skips_blank_lines(tmp_path):
    f = _write(tmp_path / "r.jsonl", ['{"id": "x", "prefix": "a", "prompt": "hi"}', "",
                                      '{"prompt": "\u00e9t\u00e9", "prefix": "", "temperature": 3}'])
    reqs = read_requests(f)
    assert [(r.id, r.prefix, r.prompt, r.line) for r in reqs] == [("x", "a", "hi", 1), (3, None, "\u00e9t\u00e9", 3)]
    assert reqs[1].extra == {"temperature": 3}


@pytest.mark.parametrize("line, pattern", [
    ('{"prompt": "a"', r"r.jsonl:2: not JSON"),
    ('["prompt"]', r"r.jsonl:2: expected a JSON object, got an array"),
    ('{"promt": "x", "prefix": "a"}', r"r.jsonl:2: missing 'prompt' \(fields found: 'promt', 'prefix'\)"),
    ('{"prompt": 3}', r"r.jsonl:2: 'prompt' must be a string, got a number"),
    ('{"prompt": "a", "prefix": 3}', r"r.jsonl:2: 'prefix' must be a name"),
])
def test_read_requests_errors_name_file_and_line(tmp_path, line, pattern):
    f = _write(tmp_path / "r.jsonl", ['{"prompt": "ok"}', line])
    with pytest.raises(RequestError, match=pattern):
        read_requests(f)


def test_missing_input_file_is_a_clean_error(tmp_path, capsys):
    rc = main(["-i", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "o.jsonl"), "--no-progress"])
    assert rc == 2 and "requests file not found" in capsys.readouterr().err


def test_cli_dispatches_generate(tmp_path, capsys):
    from prefix_attn.cli import main as cli_main

    rc = cli_main(["generate", "-i", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "o.jsonl"), "--no-progress"])
    assert rc == 2 and "prefix-attn generate: error: requests file not found" in capsys.readouterr().err


# -- end to end on the built-in tiny model -------------------------------------------------------

def _results(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A PEFT adapter for the built-in default model, written by save_peft."""
    from prefix_attn import tiny
    from prefix_attn.bank import PrefixBank

    model = tiny.default_model()
    bank = PrefixBank.attach(model)
    g = torch.Generator().manual_seed(5)
    shape = (bank.num_layers, bank.num_kv_heads, 6, bank.head_dim)
    bank.add("t", 3 * torch.randn(shape, generator=g), 3 * torch.randn(shape, generator=g))
    d = tmp_path_factory.mktemp("adapter")
    bank.save_peft("t", str(d))
    return str(d)


@pytest.mark.hf
def test_generate_mixed_prefixes_matches_per_row_generate(tmp_path, adapter_dir):
    """A batch mixing an adapter, a shared prompt and no prefix answers every request as a
    one-row generate would: the adapter row as model.generate(prefixes=[...]), the prompt row
    as the plain model on prompt + text."""
    from prefix_attn import tiny
    from prefix_attn.bank import PrefixBank

    system = "Answer briefly. "
    reqs = [{"id": "a", "prefix": "tenant", "prompt": "hello there"},
            {"id": "b", "prefix": "sys", "prompt": "why?"},
            {"id": "c", "prompt": "no prefix"},
            {"id": "d", "prefix": "tenant", "prompt": "x"}]
    f = _write(tmp_path / "r.jsonl", [json.dumps(r) for r in reqs])
    out = tmp_path / "o" / "res.jsonl"
    rc = main(["-i", f, "-o", str(out), "--adapter", f"tenant={adapter_dir}", "--prompt-prefix", f"sys={system}",
               "--batch-size", "3", "--max-new-tokens", "4", "--no-progress"])
    assert rc == 0
    res = _results(out)
    assert [r["id"] for r in res] == ["a", "b", "c", "d"]
    assert [r["prefix"] for r in res] == ["tenant", "sys", None, "tenant"]

    tok = tiny.ByteTokenizer()
    model = tiny.default_model()
    bank = PrefixBank.attach(model)
    bank.load_peft("tenant", adapter_dir)

    def greedy(ids, **kw):
        with torch.no_grad():
            g = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False,
                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw)
        new = g[0, len(ids):].tolist()
        return tok.decode(new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new)

    assert res[0]["completion"] == greedy(tok.encode("hello there"), prefixes=["tenant"])
    assert res[0]["completion"] != greedy(tok.encode("hello there"))  # the prefix is not a no-op here
    assert res[3]["completion"] == greedy(tok.encode("x"), prefixes=["tenant"])
    assert res[2]["completion"] == greedy(tok.encode("no prefix"))
    # the prompt prefix carries the start token; the request text follows it without one
    assert res[1]["completion"] == greedy(tok.encode(system) + tok.encode("why?")[1:])


@pytest.mark.hf
def test_unknown_prefix_fails_before_generating(tmp_path, capsys, adapter_dir):
    f = _write(tmp_path / "r.jsonl", ['{"prompt": "a", "prefix": "tenant"}', '{"prompt": "b", "prefix": "nope"}'])
    out = tmp_path / "res.jsonl"
    rc = main(["-i", f, "-o", str(out), "--adapter", f"tenant={adapter_dir}", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "r.jsonl:2: unknown prefix 'nope'" in err and "['tenant']" in err
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.hf
def test_model_folder_and_saved_bank(tmp_path, adapter_dir, capsys):
    """--model loads a saved folder (with its byte tokenizer) and --bank a saved bank (an adapter
    and a prompt prefix); the progress bar goes to stderr and the results to the output file."""
    from prefix_attn import tiny
    from prefix_attn.bank import PrefixBank

    model = tiny.default_model()
    model.save_pretrained(str(tmp_path / "model"))
    tiny.ByteTokenizer().save_pretrained(str(tmp_path / "model"))
    bank = PrefixBank.attach(model)
    bank.load_peft("saved", adapter_dir)
    system = "Be kind. "
    bank.add_prompt("sys", torch.tensor(tiny.ByteTokenizer().encode(system)))
    bank.default_prefix = "saved"  # saved with the bank; a request without "prefix" still gets none
    bank.save(str(tmp_path / "bank"))

    f = _write(tmp_path / "r.jsonl", ['{"prompt": "hi", "prefix": "saved"}', '{"prompt": "hey"}',
                                      '{"prompt": "why?", "prefix": "sys"}'])
    base = ["-i", f, "--max-new-tokens", "3", "--batch-size", "2"]
    assert main(base + ["-o", str(tmp_path / "a.jsonl"), "--model", str(tmp_path / "model"),
                        "--bank", str(tmp_path / "bank")]) == 0
    assert "generate" in capsys.readouterr().err  # progress bar
    # the saved prompt entry is served like --prompt-prefix (request text without a start token)
    assert main(base + ["-o", str(tmp_path / "b.jsonl"), "--adapter", f"saved={adapter_dir}",
                        "--prompt-prefix", f"sys={system}", "--no-progress"]) == 0
    assert _results(tmp_path / "a.jsonl") == _results(tmp_path / "b.jsonl")
    assert main(base + ["-o", str(tmp_path / "c.jsonl"), "--model", str(tmp_path / "missing")]) == 2


# -- sampling: --do-sample, --seed, --temperature ----------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The built-in default model saved as a folder (loading it draws nothing from torch's RNG)."""
    from prefix_attn import tiny

    d = tmp_path_factory.mktemp("model")
    tiny.default_model().save_pretrained(str(d))
    tiny.ByteTokenizer().save_pretrained(str(d))
    return str(d)


_SAMPLE_PROMPTS = ["hello there", "abc", "the quick brown fox", "1 + 1 ="]


def _completions(tmp_path, model_dir, name, *options):
    f = _write(tmp_path / "req.jsonl", [json.dumps({"prompt": p}) for p in _SAMPLE_PROMPTS])
    out = tmp_path / f"{name}.jsonl"
    model = ["--model", model_dir] if model_dir is not None else []
    assert main(["-i", f, "-o", str(out), *model, "--max-new-tokens", "8",
                 "--batch-size", "2", "--no-progress", *options]) == 0
    return [r["completion"] for r in _results(out)]


@pytest.mark.hf
def test_sampling_is_fixed_by_the_seed(tmp_path, model_dir):
    """--do-sample draws from torch's RNG seeded by --seed: the same seed gives the same
    completions (whatever the process drew before), another seed other ones."""
    greedy = _completions(tmp_path, model_dir, "greedy")
    torch.manual_seed(99)
    a = _completions(tmp_path, model_dir, "a", "--do-sample", "--seed", "3")
    torch.rand(7)  # the process's RNG moved on: --seed still fixes the draw
    b = _completions(tmp_path, model_dir, "b", "--do-sample", "--seed", "3")
    c = _completions(tmp_path, model_dir, "c", "--do-sample", "--seed", "4")
    assert a == b
    assert a != c and all(x != y for x, y in zip(a, c))
    assert a != greedy  # it does sample


@pytest.mark.hf
def test_seed_also_fixes_sampling_with_the_built_in_model(tmp_path):
    """Without --model the built-in model is built (seeding torch itself): --seed must still
    decide the draw (it was overwritten by the model's own seed)."""
    a = _completions(tmp_path, None, "a", "--do-sample", "--seed", "3")
    b = _completions(tmp_path, None, "b", "--do-sample", "--seed", "4")
    assert a != b


@pytest.mark.hf
def test_sampling_temperature(tmp_path, model_dir):
    """--temperature scales the logits: a tiny one samples the greedy completions, the default
    (1) and a huge one (nearly uniform over the bytes) do not."""
    greedy = _completions(tmp_path, model_dir, "greedy")
    cold = _completions(tmp_path, model_dir, "cold", "--do-sample", "--seed", "3", "--temperature", "1e-4")
    hot = _completions(tmp_path, model_dir, "hot", "--do-sample", "--seed", "3", "--temperature", "100")
    warm = _completions(tmp_path, model_dir, "warm", "--do-sample", "--seed", "3")
    assert cold == greedy
    assert all(h != g for h, g in zip(hot, greedy)) and all(w != g for w, g in zip(warm, greedy))


def save_word_level_model(folder):
    """A tiny Llama saved in ``folder`` with a word-level transformers tokenizer of the words
    <unk> (special), a ... g, which has neither a pad nor an end-of-sequence token (nor has the
    model's generation config an eos_token_id); returns the folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from prefix_attn import tiny

    words = ["<unk>", "a", "b", "c", "d", "e", "f", "g"]
    model = tiny.tiny_model("llama", vocab_size=len(words), eos_token_id=None, pad_token_id=None,
                            bos_token_id=None)
    model.generation_config.eos_token_id = None
    model.save_pretrained(str(folder))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(folder))
    return folder


@pytest.mark.hf
def test_a_tokenizer_without_pad_or_end_token(tmp_path):
    """A model folder whose tokenizer has neither a pad nor an end-of-sequence token (and whose
    generation config no eos_token_id): the padding id was None, and torch.full(..., None)
    ended the command with a TypeError traceback. The padding is masked: any id does."""
    folder = save_word_level_model(tmp_path / "model")
    f = _write(tmp_path / "req.jsonl", [json.dumps({"prompt": "a b"}), json.dumps({"prompt": "c d e f"})])
    runs = {}
    for batch in ("1", "2"):  # alone, and padded in one batch
        out = tmp_path / f"out{batch}.jsonl"
        assert main(["-i", f, "-o", str(out), "--model", str(folder), "--max-new-tokens", "4",
                     "--batch-size", batch, "--no-progress"]) == 0
        runs[batch] = _results(out)
    assert runs["2"] == runs["1"]
    assert [r["num_tokens"] for r in runs["2"]] == [4, 4]
