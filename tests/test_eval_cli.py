"""`prefix-attn eval`: train's eval loss of a data file under each prefix, without training;
checked against what `prefix-attn train` logged on the same --eval-data and against a plain HF
forward."""
import json
import math
import os

import pytest
import torch

from prefix_attn import cli, evaluate, serve, tiny, train
from test_train_chat import _write

pytestmark = pytest.mark.hf

TRAIN = ["--num-virtual-tokens", "4", "--batch-size", "4", "--max-steps", "4", "--eval-every", "2",
         "--no-progress", "--lr", "0.05"]


def _examples(n, prefixes=None, shift=0):
    """n prompt/completion examples of unequal lengths, each with the next of ``prefixes``."""
    return [{"prompt": f"Q{i % 3}:", "completion": f" answer {(i + shift) % 4}" + " more" * (i % 3),
             **({"prefix": prefixes[i % len(prefixes)]} if prefixes else {})} for i in range(n)]


def _log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def _eval(tmp_path, *argv):
    """(exit status, the JSON output or None) of ``prefix-attn eval ARGV -o FILE``."""
    out = tmp_path / "scores.json"
    if out.exists():
        out.unlink()
    code = cli.main(["eval", *argv, "--no-progress", "-o", str(out)])
    return code, (json.loads(out.read_text()) if out.exists() else None)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """A short single-prefix run with --eval-data: (its folder, the eval file)."""
    root = tmp_path_factory.mktemp("eval_single")
    data, held = _write(root / "d.jsonl", _examples(14)), _write(root / "e.jsonl", _examples(7, shift=1))
    out = str(root / "run")
    assert train.main([data, "-o", out, "--eval-data", held, *TRAIN]) == 0
    return out, held


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """A short multi-task run (prefixes x and y) with --eval-data naming them."""
    root = tmp_path_factory.mktemp("eval_multi")
    data = _write(root / "d.jsonl", _examples(16, ["x", "y"]))
    held = _write(root / "e.jsonl", _examples(9, ["y", "x", "y"], shift=1))
    out = str(root / "run")
    assert train.main([data, "-o", out, "--eval-data", held, *TRAIN]) == 0
    return out, held


def test_the_loss_under_a_trained_adapter_is_the_eval_loss_train_logged(single, tmp_path, capsys):
    out, held = single
    code, scores = _eval(tmp_path, held, "--model", os.path.join(out, "base_model"),
                         "--adapter", f"a={os.path.join(out, 'adapter')}", "--batch-size", "4")
    assert code == 0
    a = scores["prefixes"]["a"]
    assert list(scores["prefixes"]) == ["a"]  # the one prefix given: the default
    assert a["loss"] == pytest.approx(_log(out)[-1]["eval_loss"], rel=1e-6, abs=1e-7)
    assert a["examples"] == 7 and a["perplexity"] == pytest.approx(math.exp(a["loss"]))
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["prefix", "examples", "tokens", "loss", "perplexity"]
    assert table[1].split()[:4] == ["a", "7", str(a["tokens"]), f"{a['loss']:.4f}"]


def _hf_loss(model_dir, held, prefix_ids=()):
    """The token-weighted cross-entropy of each example of ``held`` (ByteTokenizer ids: start
    token, bytes + 3, end token; the loss on the completion and the end token) in a plain HF
    forward (sdpa), after the tokens ``prefix_ids`` (a prompt: its logits are not scored, nor
    the start token then)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    total, count = 0.0, 0
    for line in open(held):
        ex = json.loads(line)
        start = [] if prefix_ids else [1]
        prompt = start + [b + 3 for b in ex["prompt"].encode()]
        completion = [b + 3 for b in ex["completion"].encode()] + [2]
        ids = torch.tensor([list(prefix_ids) + prompt + completion])
        labels = torch.tensor([[-100] * (len(prefix_ids) + len(prompt)) + completion])
        labels[0, len(prefix_ids)] = -100  # the first text token is never predicted
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum")
        total += float(nll)
        count += int((labels[0, 1:] != -100).sum())
    return total / count, count


def test_without_a_prefix_the_loss_is_a_plain_hf_forward(single, tmp_path):
    out, held = single
    base = os.path.join(out, "base_model")
    code, scores = _eval(tmp_path, held, "--model", base, "--prefix", "none")
    assert code == 0
    loss, count = _hf_loss(base, held)
    assert scores["prefixes"]["none"]["tokens"] == count
    assert scores["prefixes"]["none"]["loss"] == pytest.approx(loss, rel=1e-5)
    # no prefix given at all: the same, under none
    assert _eval(tmp_path, held, "--model", base)[1]["prefixes"] == scores["prefixes"]


def test_a_prompt_prefix_scores_the_text_after_the_prompt(single, tmp_path):
    """The examples continue the prompt: no start token of their own (the prompt has it)."""
    out, held = single
    base = os.path.join(out, "base_model")
    code, scores = _eval(tmp_path, held, "--model", base, "--prompt-prefix", "p=Answer: ")
    assert code == 0
    loss, count = _hf_loss(base, held, prefix_ids=[1] + [b + 3 for b in b"Answer: "])
    assert scores["prefixes"]["p"]["tokens"] == count
    assert scores["prefixes"]["p"]["loss"] == pytest.approx(loss, rel=1e-5)


def test_several_prefixes_in_one_run_each_as_alone_and_the_change_against_none(single, tmp_path, capsys):
    out, held = single
    base, adapter = os.path.join(out, "base_model"), os.path.join(out, "adapter")
    both = ["--model", base, "--adapter", f"a={adapter}", "--adapter", f"b={adapter}"]
    code, scores = _eval(tmp_path, held, *both, "--prefix", "none", "--prefix", "a", "--prefix", "b")
    assert code == 0
    by = scores["prefixes"]
    assert list(by) == ["none", "a", "b"]
    assert by["a"]["loss"] == by["b"]["loss"] == _eval(tmp_path, held, "--model", base, "--adapter",
                                                       f"a={adapter}")[1]["prefixes"]["a"]["loss"]
    assert by["none"]["loss"] == _eval(tmp_path, held, "--model", base)[1]["prefixes"]["none"]["loss"]
    assert by["a"]["delta_loss"] == pytest.approx(by["a"]["loss"] - by["none"]["loss"])
    assert "delta_loss" not in by["none"]
    capsys.readouterr()
    assert cli.main(["eval", held, *both, "--prefix", "none", "--prefix", "b", "--no-progress"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[-2:] == ["vs", "none"]
    assert table[2].split()[-1] == f"{by['b']['loss'] - by['none']['loss']:+.4f}"


def test_examples_are_scored_under_their_own_prefix_as_train_s_multi_task_eval(multi, tmp_path):
    out, held = multi
    code, scores = _eval(tmp_path, held, "--model", os.path.join(out, "base_model"),
                         "--bank", os.path.join(out, "bank"), "--batch-size", "4")
    assert code == 0
    logged = _log(out)[-1]
    by = scores["prefixes"]
    assert list(by) == ["x", "y"] and (by["x"]["examples"], by["y"]["examples"]) == (3, 6)
    for name, loss in logged["eval_loss_by_prefix"].items():
        assert by[name]["loss"] == pytest.approx(loss, rel=1e-6)
    overall = sum(s["loss"] * s["tokens"] for s in by.values()) / sum(s["tokens"] for s in by.values())
    assert overall == pytest.approx(logged["eval_loss"], rel=1e-6)


def test_a_prefix_option_that_scores_no_example_is_noted(multi, tmp_path, capsys):
    """Every example names its own prefix: --prefix none (meant as the baseline) applies to
    none of them; the table silently lacked the "vs none" column (found by the audit)."""
    out, held = multi
    capsys.readouterr()
    code, scores = _eval(tmp_path, held, "--model", os.path.join(out, "base_model"),
                         "--bank", os.path.join(out, "bank"), "--prefix", "none")
    assert code == 0 and list(scores["prefixes"]) == ["x", "y"]
    err = capsys.readouterr().err
    assert "prefix-attn eval: note: --prefix none scores no example: every example of" in err


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A short train --chat run on a tiny Llama with a ChatML template, with --eval-data."""
    from test_serve_chat import _model, chat_tokenizer

    root = tmp_path_factory.mktemp("eval_chat")
    model_dir = str(root / "model")
    _model().save_pretrained(model_dir)
    chat_tokenizer().save_pretrained(model_dir)
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    data = _write(root / "d.jsonl", _examples(8) + [{"messages": conv}] * 2)
    held = _write(root / "e.jsonl", _examples(3, shift=2) + [{"messages": conv}])
    out = str(root / "run")
    assert train.main([data, "-o", out, "--model", model_dir, "--eval-data", held, "--chat",
                       "--chat-turns", "all", *TRAIN]) == 0
    return out, held, model_dir


def test_chat_data_is_scored_as_train_chat_evaluates_it(chat_run, tmp_path):
    out, held, model_dir = chat_run
    adapter = ["--model", model_dir, "--adapter", f"c={os.path.join(out, 'adapter')}", "--batch-size", "4"]
    code, scores = _eval(tmp_path, held, *adapter, "--chat", "--chat-turns", "all")
    assert code == 0
    assert scores["prefixes"]["c"]["loss"] == pytest.approx(_log(out)[-1]["eval_loss"], rel=1e-6)
    # the last turn only (the default) scores fewer tokens: --chat-turns is train's
    last = _eval(tmp_path, held, *adapter, "--chat")[1]["prefixes"]["c"]
    assert last["tokens"] < scores["prefixes"]["c"]["tokens"]


SYSTEM = "Answer in one word."


def _hf_chat_loss(model_dir, held, turns, system=None):
    """The token-weighted cross-entropy of each conversation of ``held`` (--chat-turns ``turns``:
    last; each: every assistant turn, the conversation up to it; all: every turn in one row) in
    a plain HF forward (sdpa) of the whole conversation as the template renders it, ``system``
    (if any) its system message: the loss on each learnt turn's tokens, from the end of its
    context (rendered with the generation prompt) to the end of the conversation up to it; no
    token of the system part scored."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    total, count = 0.0, 0
    for line in open(held):
        ex = json.loads(line)
        messages = ex.get("messages") or [{"role": "user", "content": ex.get("prompt", "")},
                                          {"role": "assistant", "content": ex["completion"]}]
        ends = [j + 1 for j, m in enumerate(messages) if m["role"] == "assistant"]
        for end in (ends if turns == "each" else ends[-1:]):
            conv = ([{"role": "system", "content": system}] if system else []) + messages[:end]
            render = lambda m, g: list(tok.apply_chat_template(m, add_generation_prompt=g, tokenize=True,
                                                                return_dict=False))
            ids, labels = render(conv, False), [-100] * len(render(conv, False))
            given = len(conv) - end  # the system message
            for e in ([k + given for k in ends] if turns == "all" else [len(conv)]):
                n, upto = len(render(conv[:e - 1], True)), len(render(conv[:e], False))
                labels[n:upto] = ids[n:upto]
            labels = torch.tensor([labels])
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100,
                                                             reduction="sum"))
            count += int((labels[0, 1:] != -100).sum())
    return total / count, count


@pytest.mark.parametrize("turns", ["last", "each", "all"])
def test_a_chat_prompt_prefix_is_the_system_message_of_each_conversation(chat_run, tmp_path, turns):
    """Under --chat a --prompt-prefix is the system message, as generate --chat serves it: the
    loss is the model's on each whole conversation with that system message and no prefix."""
    out, held, model_dir = chat_run
    code, scores = _eval(tmp_path, held, "--model", model_dir, "--chat", "--chat-turns", turns,
                         "--prompt-prefix", f"sys={SYSTEM}", "--prefix", "sys", "--prefix", "none")
    assert code == 0 and list(scores["prefixes"]) == ["sys", "none"]
    for name, system in (("sys", SYSTEM), ("none", None)):
        loss, count = _hf_chat_loss(model_dir, held, turns, system)
        assert scores["prefixes"][name]["tokens"] == count
        assert scores["prefixes"][name]["loss"] == pytest.approx(loss, rel=1e-5)
    assert scores["prefixes"]["sys"]["examples"] == (5 if turns == "each" else 4)
    assert scores["prefixes"]["sys"]["loss"] != scores["prefixes"]["none"]["loss"]


def test_a_chat_prompt_prefix_beside_an_adapter_and_examples_naming_their_own(chat_run, tmp_path):
    """Each prefix's examples rendered as it needs, in one run: the adapter's as train --chat
    evaluates them, the prompt prefix's with its system message, each as when scored alone."""
    out, held, model_dir = chat_run
    named = _write(tmp_path / "named.jsonl", [dict(json.loads(line), prefix="sys" if i % 2 else "c")
                                              for i, line in enumerate(open(held))])
    argv = ["--model", model_dir, "--chat", "--adapter", f"c={os.path.join(out, 'adapter')}",
            "--prompt-prefix", f"sys={SYSTEM}"]
    code, scores = _eval(tmp_path, named, *argv)
    assert code == 0 and list(scores["prefixes"]) == ["c", "sys"]
    alone = {name: _eval(tmp_path, held, *argv, "--prefix", name)[1]["prefixes"][name] for name in ("c", "sys")}
    assert scores["prefixes"]["c"]["examples"] == scores["prefixes"]["sys"]["examples"] == 2
    assert alone["sys"]["loss"] == pytest.approx(_hf_chat_loss(model_dir, held, "last", SYSTEM)[0], rel=1e-5)
    for name in ("c", "sys"):
        assert scores["prefixes"][name]["tokens"] < alone[name]["tokens"]


def test_a_template_rendering_the_system_message_otherwise_before_a_user_turn_is_refused(tmp_path, capsys):
    """As generate --chat refuses it: the prompt prefix's KV would not be the conversation's."""
    from test_serve_chat import FOLDED, _model, chat_tokenizer

    model_dir = str(tmp_path / "folded")
    _model().save_pretrained(model_dir)
    chat_tokenizer(FOLDED).save_pretrained(model_dir)
    data = _write(tmp_path / "data.jsonl", [{"prompt": "hi", "completion": "Hello."}])
    code, scores = _eval(tmp_path, data, "--model", model_dir, "--chat", "--prompt-prefix", f"sys={SYSTEM}")
    err = capsys.readouterr().err
    assert code == 2 and scores is None
    assert ("prefix-attn eval: error: --prompt-prefix sys: the system prompt cannot be shared as a prefix "
            "with this chat template") in err and f"{data}:1: the system message's " in err


def test_an_earlier_turn_refused_after_a_chat_prompt_prefix_is_named_as_in_the_example(tmp_path, capsys):
    """--chat-turns all renders the system message first: the turns are still named by their
    place among the example's own messages."""
    from test_serve_chat import _model
    from test_train_chat import THINKS_LAST, TWO_TURNS, chat_tokenizer

    model_dir = str(tmp_path / "thinks_last")
    _model().save_pretrained(model_dir)
    chat_tokenizer(THINKS_LAST).save_pretrained(model_dir)
    data = _write(tmp_path / "data.jsonl", [{"messages": TWO_TURNS}])
    code, _ = _eval(tmp_path, data, "--model", model_dir, "--chat", "--chat-turns", "all",
                    "--prompt-prefix", f"sys={SYSTEM}")
    err = capsys.readouterr().err
    assert code == 2 and "--chat-turns all: in 1 example(s) an earlier assistant turn" in err
    assert f"{data}:1: messages[1] (assistant turn 1 of 2): the conversation ending with it" in err


def test_an_example_with_its_own_system_message_is_refused_after_a_chat_prompt_prefix(tmp_path, capsys,
                                                                                     no_model_load):
    """As generate --chat refuses such a request; before the model loads. Scored under none, it is taken."""
    from test_serve_chat import chat_tokenizer

    model_dir = str(tmp_path / "tok")
    chat_tokenizer().save_pretrained(model_dir)
    own = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"},
           {"role": "assistant", "content": "Hello."}]
    data = _write(tmp_path / "data.jsonl", [{"prompt": "q", "completion": "a"}, {"messages": own},
                                            {"messages": own, "prefix": "none_here"}])
    argv = ["eval", data, "--model", model_dir, "--chat", "--prompt-prefix", f"sys={SYSTEM}",
            "--prompt-prefix", "none_here=x", "--prefix", "none", "--prefix", "sys", "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("prefix-attn eval: error: 2 example(s) that --chat cannot score after a --prompt-prefix:")
    assert (f"{data}:2: 'messages' starts with a system message, but prefix 'sys' is the system message" in err
            and f"{data}:3: 'messages' starts with a system message, but prefix 'none_here'" in err)
    assert f"{data}:1:" not in err
    # under none only, the example's own system message is its conversation's: taken (the model load is reached)
    with pytest.raises(AssertionError, match="the model was loaded"):
        cli.main(["eval", _write(tmp_path / "own.jsonl", [{"messages": own}]), "--model", model_dir, "--chat",
                  "--prompt-prefix", f"sys={SYSTEM}", "--prefix", "none", "--no-progress"])


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading the model fails the test: the error must come before it."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(serve, "load", refuse)


@pytest.mark.parametrize("data, argv, words", [
    ([{"completion": "q", "prefix": "zz"}], ["--adapter", "a=A"], "1 example(s) name a prefix not given"),
    ([{"completion": "c", "prefix": "zz"}], ["--adapter", "zy=A"], "unknown prefix 'zz'"),
    ([{"completion": "c"}], ["--prefix", "b"], "--prefix b: unknown prefix; no prefix was given"),
    ([{"completion": "c"}], ["--adapter", "a=A", "--adapter", "b=A"],
     "1 example(s) of DATA name no prefix and 2 are given ['a', 'b']: say which to score them under with --prefix"),
    ([{"completion": "c"}], ["--adapter", "none=A", "--prefix", "none"], "--prefix none means no prefix"),
    ([{"prompt": "q"}], [], "DATA:1: expected a 'text' field, or 'completion'"),
    ([{"completion": "c"}], ["--chat-turns", "all"], "--chat-turns all: chooses the assistant turns"),
    ([{"completion": "c"}], ["--output", "."], "--output '.': give a file name, not a folder"),
    ([{"completion": "c"}], ["--adapter", "a"], "--adapter expects NAME=DIR"),
    ([{"completion": "c"}], ["--device", "tpu"], "--device tpu: not a torch device"),
])
def test_errors_before_the_model_loads(tmp_path, capsys, no_model_load, data, argv, words):
    path = _write(tmp_path / "data.jsonl", data)
    assert cli.main(["eval", path, *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prefix-attn eval: error: ") and words.replace("DATA", path) in err
    assert sorted(os.listdir(tmp_path)) == ["data.jsonl"]


def test_a_max_length_beyond_the_positions_left_by_the_prefix_is_an_error(single, tmp_path, capsys):
    out, held = single
    argv = [held, "--model", os.path.join(out, "base_model"), "--adapter", f"a={os.path.join(out, 'adapter')}"]
    code, scores = _eval(tmp_path, *argv, "--max-length", "253")
    assert code == 2 and scores is None
    assert ("prefix-attn eval: error: --max-length 253: the model numbers 256 positions and prefix a "
            "takes 4: at most 252") in capsys.readouterr().err
    assert _eval(tmp_path, *argv, "--max-length", "252")[1]["max_length"] == 252
    assert _eval(tmp_path, *argv)[1]["max_length"] == 252  # the default, lowered to fit


def test_the_prefix_name_of_an_example_must_be_given_even_as_none(single, tmp_path, capsys):
    """An example's "prefix" names a source; none there is no prefix of the command line."""
    out, held = single
    path = _write(tmp_path / "data.jsonl", [{"completion": "c", "prefix": "none"}])
    assert cli.main(["eval", path, "--model", os.path.join(out, "base_model"), "--no-progress"]) == 2
    assert "unknown prefix 'none'" in capsys.readouterr().err


def test_the_base_model_of_an_adapter_is_checked_as_generate_checks_it(single, tmp_path, capsys):
    out, held = single
    assert cli.main(["eval", held, "--adapter", f"a={os.path.join(out, 'adapter')}", "--no-progress"]) == 0
    assert (f"prefix-attn eval: warning: adapter a was trained on {os.path.join(out, 'base_model')}; "
            f"pass --model") in capsys.readouterr().err


def test_data_warnings_speak_as_eval(single, tmp_path, capsys):
    out, _ = single
    path = _write(tmp_path / "data.jsonl", [{"completion": "c"}, {"text": ""}])
    assert cli.main(["eval", path, "--model", os.path.join(out, "base_model"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "prefix-attn eval: warning: " in err and "prefix-attn train" not in err


def test_json_output_is_written_atomically(single, tmp_path, monkeypatch):
    """The JSON goes through atomic.write_text (a temporary file renamed into place)."""
    out, held = single
    seen = []
    write = evaluate.atomic.write_text
    monkeypatch.setattr(evaluate.atomic, "write_text", lambda path, text: (seen.append(path), write(path, text)))
    code, scores = _eval(tmp_path, held, "--model", os.path.join(out, "base_model"))
    assert code == 0 and seen == [str(tmp_path / "scores.json")] and scores["prefixes"]["none"]["examples"] == 7


def test_start_tokens_of_the_byte_tokenizer_and_one_without():
    assert evaluate.start_tokens(tiny.ByteTokenizer()) == [1]
    assert evaluate.start_tokens(tiny.ByteTokenizer(add_bos=False)) == []


def test_a_single_prefix_named_none_is_that_prefix_not_the_base_model(single, tmp_path, capsys):
    """Only --prefix none means no prefix: the one source given, even named none, is scored."""
    out, held = single
    argv = [held, "--model", os.path.join(out, "base_model")]
    adapter = os.path.join(out, "adapter")
    code, scores = _eval(tmp_path, *argv, "--adapter", f"none={adapter}")
    assert code == 0
    assert scores["prefixes"]["none"]["loss"] == _eval(tmp_path, *argv, "--adapter", f"a={adapter}")[1]["prefixes"]["a"]["loss"]
    assert scores["prefixes"]["none"]["loss"] != _eval(tmp_path, *argv)[1]["prefixes"]["none"]["loss"]


def test_examples_the_cut_leaves_nothing_to_score_name_evals_limit_not_trains_option(tmp_path, capsys):
    """eval has no --num-virtual-tokens: its --max-length is capped by the longest prefix scored."""
    data = _write(tmp_path / "long.jsonl", [{"prompt": "a" * 40, "completion": "b"}])
    code, _ = _eval(tmp_path, data, "--max-length", "8")
    err = capsys.readouterr().err
    assert code == 2 and "no token to learn" in err
    assert "--num-virtual-tokens" not in err and "the longest prefix scored" in err


def test_a_missing_or_mismatched_adapter_is_said_as_such(single, tmp_path, capsys):
    """Not as an --output that cannot be written (a FileNotFoundError is an OSError), nor as a
    traceback (an adapter of another model)."""
    out, held = single
    code, _ = _eval(tmp_path, held, "--adapter", f"a={tmp_path / 'nowhere'}")
    err = capsys.readouterr().err
    assert code == 2 and "prefix-attn eval: error: PEFT adapter folder not found" in err and "--output" not in err
    from prefix_attn.bank import PrefixBank

    other = PrefixBank(3, 2, 16)
    other.add("a", torch.randn(3, 2, 4, 16), torch.randn(3, 2, 4, 16))
    other.save_peft("a", str(tmp_path / "other"))
    code, _ = _eval(tmp_path, held, "--model", os.path.join(out, "base_model"), "--adapter", f"a={tmp_path / 'other'}")
    assert code == 2 and "num_layers=3 but this model needs num_layers=" in capsys.readouterr().err
