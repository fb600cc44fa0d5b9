"""``prefix-attn generate`` batches requests of similar prompt length (longest first), so a batch
holds little padding, and still writes the results in the request file's order: in the output,
and in OUTPUT.partial when a later batch fails."""
import json

import pytest

from prefix_attn import serve
from prefix_attn.serve_batching import by_length

pytestmark = pytest.mark.hf


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _results(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _watch_generate(monkeypatch, fail_call=None):
    """Records each model.generate call's prompt lengths (rows, padded width); call number
    ``fail_call`` (1-based) raises instead."""
    load, calls = serve._load_model, []

    def load_and_watch(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        generate = model.generate

        def watched(input_ids, attention_mask, **kw):
            calls.append((attention_mask.sum(1).tolist(), input_ids.shape[1]))
            if len(calls) == fail_call:
                raise RuntimeError("injected failure")
            return generate(input_ids, attention_mask=attention_mask, **kw)

        model.generate = watched
        return model, tokenizer

    monkeypatch.setattr(serve, "_load_model", load_and_watch)
    return calls


def test_by_length_longest_first_in_file_order_among_equals():
    assert by_length([3, 9, 3, 1, 9, 4], 2) == [[1, 4], [5, 0], [2, 3]]
    assert by_length([5], 8) == [[0]] and by_length([], 4) == []


def test_batches_hold_prompts_of_similar_length_and_answers_stay_in_file_order(tmp_path, monkeypatch):
    """Long and short prompts alternate in the file: batched in file order each batch of two
    padded the short one to the long one's length (4 x 28 pad tokens); by length, 4 in all."""
    prompts = ["x" * 30, "ab", "y" * 31, "abc", "z" * 29, "a", "w" * 32, "abcd"]
    f = _write(tmp_path / "r.jsonl", [{"prompt": p} for p in prompts])
    calls = _watch_generate(monkeypatch)
    common = ["-i", f, "--max-new-tokens", "4", "--no-progress"]
    assert serve.main(common + ["-o", str(tmp_path / "two.jsonl"), "--batch-size", "2"]) == 0
    # prompt tokens with the start token: 31 3 32 4 30 2 33 5
    assert calls == [([33, 32], 33), ([31, 30], 31), ([5, 4], 5), ([3, 2], 3)]
    calls.clear()
    assert serve.main(common + ["-o", str(tmp_path / "one.jsonl"), "--batch-size", "1"]) == 0
    two, one = _results(tmp_path / "two.jsonl"), _results(tmp_path / "one.jsonl")
    assert [r["id"] for r in two] == list(range(1, 9)) and [r["prompt"] for r in two] == prompts
    assert two == one


@pytest.mark.parametrize("search", [[], ["--num-beams", "2"]], ids=["greedy", "beams"])
def test_greedy_answers_do_not_depend_on_the_batch_size(tmp_path, search):
    """Mixed lengths, an adapter, a prompt prefix (an empty prompt after it too) and no prefix:
    batch sizes 1, 3 and 8 write the same bytes (batch size 1 is the file-order run of before)."""
    import torch

    from prefix_attn import tiny
    from prefix_attn.bank import PrefixBank

    model = tiny.default_model()
    bank = PrefixBank.attach(model)
    g = torch.Generator().manual_seed(5)
    shape = (bank.num_layers, bank.num_kv_heads, 6, bank.head_dim)
    bank.add("t", 3 * torch.randn(shape, generator=g), 3 * torch.randn(shape, generator=g))
    bank.save_peft("t", str(tmp_path / "adapter"))
    words = "the quick brown fox jumps over a lazy dog".split()
    rows = [{"id": f"r{i}", "prefix": ["t", "sys", None][i % 3],
             "prompt": " ".join(words[j % 9] for j in range((7 * i) % 23))} for i in range(14)]
    f = _write(tmp_path / "r.jsonl", rows)
    texts = []
    for bs in (1, 3, 8):
        out = tmp_path / f"o{bs}.jsonl"
        assert serve.main(["-i", f, "-o", str(out), "--adapter", f"t={tmp_path / 'adapter'}",
                           "--prompt-prefix", "sys=Be brief. ", "--batch-size", str(bs),
                           "--max-new-tokens", "6", "--no-progress", *search]) == 0
        texts.append(out.read_bytes())
    assert texts[0] == texts[1] == texts[2]
    assert [r["id"] for r in map(json.loads, texts[0].splitlines())] == [r["id"] for r in rows]


@pytest.mark.parametrize("to_stdout", [False, True])
def test_a_failing_batch_keeps_every_finished_answer_in_file_order(tmp_path, monkeypatch, capsys,
                                                                    to_stdout):
    """The longest requests (lines 2 and 4) ran first; the next batch fails: their answers,
    held for line 1's, are kept (OUTPUT.partial, or standard output), in file order."""
    f = _write(tmp_path / "r.jsonl", [{"prompt": p} for p in ["b", "long one", "c", "longer one", "d"]])
    out = tmp_path / "o.jsonl"
    calls = _watch_generate(monkeypatch, fail_call=2)
    with pytest.raises(RuntimeError, match="injected failure"):
        serve.main(["-i", f, "-o", "-" if to_stdout else str(out), "--batch-size", "2",
                    "--max-new-tokens", "2", "--no-progress"])
    assert [lengths for lengths, _ in calls] == [[11, 9], [2, 2]]
    captured = capsys.readouterr()
    assert "2 of 5 requests were finished" in captured.err
    if to_stdout:
        kept = [json.loads(line) for line in captured.out.splitlines()]
    else:
        assert not out.exists()
        kept = _results(str(out) + ".partial")
    assert [r["id"] for r in kept] == [2, 4]
    assert not list(tmp_path.glob(".tmp-*"))


# -- a batch that runs out of memory runs in halves ----------------------------------------------

def _out_of_memory_when(monkeypatch, too_big):
    """model.generate raises torch.OutOfMemoryError when ``too_big(row lengths)``."""
    import torch

    load = serve._load_model

    def load_and_limit(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        generate = model.generate

        def limited(input_ids, attention_mask, **kw):
            if too_big(attention_mask.sum(1).tolist()):
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return generate(input_ids, attention_mask=attention_mask, **kw)

        model.generate = limited
        return model, tokenizer

    monkeypatch.setattr(serve, "_load_model", load_and_limit)


def test_a_batch_out_of_memory_is_retried_in_halves(tmp_path, monkeypatch, capsys):
    """Batches of more than two rows run out of memory in their first decode step: 7 runs as
    4 + 3, 4 as 2 + 2, each split said once; 3, more than the 2 that then ran, as 2 + 1 without
    trying 3 (:class:`serve_batching.Fitting`); and the answers are those of a run with memory to
    spare (generate's state from the failed call does not leak into the retries)."""
    import torch

    prompts = ["a", "hello there", "the quick brown fox", "xyz", "1 + 1 =", "", "a longer prompt than most"]
    f = _write(tmp_path / "r.jsonl", [{"prompt": p} for p in prompts])
    common = ["-i", f, "--batch-size", "8", "--max-new-tokens", "5", "--no-progress"]
    assert serve.main(common + ["-o", str(tmp_path / "free.jsonl")]) == 0
    assert capsys.readouterr().err == ""
    load = serve._load_model

    def load_and_limit(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        mlp = model.model.layers[-1].mlp
        forward = mlp.forward

        def limited(x):
            if x.shape[0] > 2 and x.shape[1] == 1:  # a decode step of more than two rows
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return forward(x)

        mlp.forward = limited
        return model, tokenizer

    monkeypatch.setattr(serve, "_load_model", load_and_limit)
    assert serve.main(common + ["-o", str(tmp_path / "tight.jsonl")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["prefix-attn generate: batch of 7 ran out of memory: retrying as 2 batches of 4 and 3",
                   "prefix-attn generate: batch of 4 ran out of memory: retrying as 2 batches of 2"]
    assert (tmp_path / "tight.jsonl").read_bytes() == (tmp_path / "free.jsonl").read_bytes()


def test_later_batches_start_at_the_size_that_fit(tmp_path, monkeypatch, capsys):
    """10 batches of 4, where more than 2 rows run out of memory: the first batch fails once
    (4 -> 2 + 2) and every later one runs as 2 + 2 without failing (before: each of the 10 failed
    first); the answers are those of a run with memory to spare, in file order."""
    rows = [{"prompt": f"request {i} " + "x" * (i % 7)} for i in range(40)]
    f = _write(tmp_path / "r.jsonl", rows)
    common = ["-i", f, "--batch-size", "4", "--max-new-tokens", "3", "--no-progress"]
    assert serve.main(common + ["-o", str(tmp_path / "free.jsonl")]) == 0
    capsys.readouterr()
    tried = []  # rows of each model.generate call; more than 2 run out of memory
    _out_of_memory_when(monkeypatch, lambda lengths: tried.append(len(lengths)) or len(lengths) > 2)
    assert serve.main(common + ["-o", str(tmp_path / "tight.jsonl")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["prefix-attn generate: batch of 4 ran out of memory: retrying as 2 batches of 2"]
    assert tried == [4] + [2] * 20
    assert (tmp_path / "tight.jsonl").read_bytes() == (tmp_path / "free.jsonl").read_bytes()


def test_fitting_size_is_the_first_part_run_after_running_out_of_memory():
    import torch

    from prefix_attn.serve_batching import Fitting, in_halves_on_oom

    fitting, tried, limit = Fitting(), [], [3]

    def run(batch):
        tried.append(len(batch))
        if len(batch) > limit[0]:
            raise torch.OutOfMemoryError("injected")

    in_halves_on_oom(run, list(range(8)), torch.device("cpu"), lambda m: None, fitting)
    assert tried == [8, 4, 2, 2, 2, 2] and fitting.size == 2  # 4 -> 2 + 2, then the 2 that ran
    in_halves_on_oom(run, list(range(5)), torch.device("cpu"), lambda m: None, fitting)
    assert tried[6:] == [2, 2, 1] and fitting.size == 2  # cut before trying: nothing fails
    limit[0] = 1  # less memory now: lowered again, never raised
    in_halves_on_oom(run, list(range(2)), torch.device("cpu"), lambda m: None, fitting)
    assert tried[9:] == [2, 1, 1] and fitting.size == 1


def test_one_request_out_of_memory_stops_the_run_keeping_the_finished_answers(tmp_path, monkeypatch, capsys):
    """The second longest request runs out of memory even alone: the longest one's answer (its
    half of the split batch) is kept in OUTPUT.partial and the error stops the run."""

    prompts = ["hi", "too long for memory", "the very longest one of them all", "x"]
    f = _write(tmp_path / "r.jsonl", [{"prompt": p} for p in prompts])
    out = tmp_path / "o.jsonl"
    _out_of_memory_when(monkeypatch, lambda lengths: 20 in lengths)  # line 2, with the start token
    assert serve.main(["-i", f, "-o", str(out), "--batch-size", "2", "--max-new-tokens", "2",
                       "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "batch of 2 ran out of memory: retrying as 2 batches of 1" in err
    assert "1 of 4 requests were finished" in err
    assert err.index("were finished") < err.index(f"error: {f}:2: ran out of device memory even alone")
    assert not out.exists()
    assert [r["prompt"] for r in _results(str(out) + ".partial")] == ["the very longest one of them all"]


@pytest.mark.parametrize("device, frees", [("cpu", 0), ("cuda", 2)])
def test_in_halves_on_oom_frees_the_cuda_cache_before_each_retry(monkeypatch, device, frees):
    import torch

    from prefix_attn.serve_batching import in_halves_on_oom

    freed, ran, said = [], [], []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(1))

    def run(batch):
        if len(batch) > 1:
            raise torch.OutOfMemoryError("injected")
        ran.append(batch)

    in_halves_on_oom(run, [5, 6, 7], torch.device(device), said.append)
    assert ran == [[5], [6], [7]] and len(freed) == frees
    assert said == ["batch of 3 ran out of memory: retrying as 2 batches of 2 and 1",
                    "batch of 2 ran out of memory: retrying as 2 batches of 1"]


def test_out_of_memory_class_on_a_torch_without_torch_out_of_memory_error(monkeypatch):
    """torch 2.4 (the oldest supported) has only torch.cuda.OutOfMemoryError: naming
    torch.OutOfMemoryError in the except clause made any error of a batch an AttributeError."""
    import importlib

    import torch

    from prefix_attn import serve_batching

    monkeypatch.delattr(torch, "OutOfMemoryError", raising=False)
    try:
        module = importlib.reload(serve_batching)
        assert module.OutOfMemoryError is torch.cuda.OutOfMemoryError

        def run(batch):
            raise torch.cuda.OutOfMemoryError("injected")
        said = []
        with pytest.raises(torch.cuda.OutOfMemoryError):
            module.in_halves_on_oom(run, [0, 1], torch.device("cpu"), said.append)
        assert said == ["batch of 2 ran out of memory: retrying as 2 batches of 1"]
    finally:
        monkeypatch.undo()
        importlib.reload(serve_batching)


def test_a_stop_right_after_a_held_answer_is_written_keeps_it_once(tmp_path, monkeypatch, capsys):
    """SIGINT raises Interrupted wherever the main thread is: here just after the line of a
    request whose answer was held (line 3, finished in the batch of lines 1 and 3) was written,
    before _Output.put had dropped it from the held ones. OUTPUT.partial had it twice and the
    note counted 5 of 5 requests finished (line 5 never ran)."""
    import signal

    from prefix_attn.train_state import Interrupted

    f = _write(tmp_path / "r.jsonl", [{"prompt": p} for p in ["b", "long one", "c", "longer one", "d"]])
    out = tmp_path / "o.jsonl"
    write, written = serve._Output.write, []

    def write_then_stop(self, obj):
        write(self, obj)
        written.append(obj["id"])
        if written == [1, 2, 3]:  # once: the line of line 3, the last of its batch
            raise Interrupted(signal.SIGINT, "")

    monkeypatch.setattr(serve._Output, "write", write_then_stop)
    assert serve.main(["-i", f, "-o", str(out), "--batch-size", "2", "--max-new-tokens", "2",
                       "--no-progress"]) == 130
    assert "4 of 5 requests were finished" in capsys.readouterr().err
    assert [r["id"] for r in _results(str(out) + ".partial")] == [1, 2, 3, 4]


def test_the_first_request_alone_out_of_memory_is_an_error_naming_it(tmp_path, monkeypatch, capsys):
    """--batch-size 1, the first batch (the longest request, line 2) runs out of memory: a
    traceback of torch.OutOfMemoryError said neither which request nor what to lower."""
    f = _write(tmp_path / "r.jsonl", [{"prompt": "hi"}, {"prompt": "the longest one"}])
    out = tmp_path / "o.jsonl"
    _out_of_memory_when(monkeypatch, lambda lengths: True)
    assert serve.main(["-i", f, "-o", str(out), "--batch-size", "1", "--max-new-tokens", "7",
                       "--num-beams", "2", "--no-progress"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [f"prefix-attn generate: error: {f}:2: ran out of device memory even alone (16 prompt "
                   "tokens + 0 prefix tokens + 7 new tokens x 2 beams): CUDA out of memory (injected); "
                   "lower --max-new-tokens or --num-beams, shorten the prompt, use --dtype bfloat16 or "
                   "use a device with more memory"]
    assert not out.exists() and not (tmp_path / "o.jsonl.partial").exists()


# -- OUTPUT.partial when the held results cannot be saved (added by the mutation audit) ----------

class _ClosedPipe:
    """Standard output whose reader is gone; its file descriptor is ``fd``."""

    def __init__(self, fd):
        self.fd = fd

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        pass

    def fileno(self):
        return self.fd


def test_held_results_for_a_closed_standard_output_say_so(tmp_path, monkeypatch):
    """Request 1 finished, request 0 did not: saving request 1's result finds standard output
    closed: said as such (not an OutputClosed out of save_partial)."""
    import sys

    with open(tmp_path / "sink", "w") as sink:
        monkeypatch.setattr(sys, "stdout", _ClosedPipe(sink.fileno()))
        out = serve._Output("-")
        out.put(1, {"id": 2})
        assert out.finished == 1 and out.count == 0
        assert out.save_partial(3) == "1 of 3 requests were finished; standard output was closed"


def test_held_results_that_cannot_be_saved_say_so(tmp_path):
    """A full disk while writing the held results to the temporary file: save_partial says it
    (not a RequestError replacing the error that stopped the run); close leaves nothing."""
    import errno

    path = tmp_path / "o.jsonl"
    out = serve._Output(str(path))
    real = out.f

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    try:
        out.put(2, {"id": 3})
        out.put(1, {"id": 2})
        out.f = Full()
        assert out.save_partial(4) == (f"2 of 4 requests were finished; saving them failed: cannot write "
                                       f"output {str(path)!r}: No space left on device")
    finally:
        out.f = real
        out.close()
    assert list(tmp_path.iterdir()) == []


def test_the_progress_bar_counts_every_answered_request(tmp_path, capsys):
    """(Added by the mutation audit.) Batches by length, 2 then 1 requests: the bar ends at 3/3."""
    f = _write(tmp_path / "r.jsonl", [{"prompt": p} for p in ["a", "long prompt", "mid"]])
    assert serve.main(["-i", f, "-o", str(tmp_path / "o.jsonl"), "--batch-size", "2",
                       "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert "generate: 100%" in err and "3/3" in err
