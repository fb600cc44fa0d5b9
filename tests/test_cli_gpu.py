"""The command line on a CUDA GPU: ``prefix-attn train``, ``eval``, ``generate`` and ``serve``
with ``--device cuda`` on the built-in tiny model, each against the same command on the CPU
(cpu backend, float32): the host code of the CLI (batching, caches, streaming, logprobs,
checkpoints) with device tensors and the triton backend.

Skipped without CUDA (bench/gpu.sh runs it). PREFIX_ATTN_HF_TEST_DEVICE=cpu runs the same tests
with the CPU on both sides: a check of the tests themselves, not of the GPU path.
"""
import json
import os

import pytest
import torch

from prefix_attn import cli

from conftest import count_attention_calls
from test_server import call, save_adapter, started
from test_train_cli import write_data

DEVICE = os.environ.get("PREFIX_ATTN_HF_TEST_DEVICE", "cuda")
BACKEND = "triton" if DEVICE == "cuda" else "cpu"
pytestmark = [pytest.mark.gpu, pytest.mark.hf,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU")]
TRAIN = ["--num-virtual-tokens", "4", "--batch-size", "4", "--max-steps", "4", "--eval-every", "2",
         "--save-every", "2", "--no-progress", "--lr", "0.05"]


@pytest.fixture
def on(monkeypatch):
    """``on(device)``: the backend of that device forced for what runs next (the CPU side: the
    cpu backend); the calls that reach prefix_attention are counted by device type."""
    calls = count_attention_calls(monkeypatch)
    if DEVICE == "cuda":
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)

    def switch(device):
        monkeypatch.setenv("PREFIX_ATTN_BACKEND", BACKEND if device == DEVICE else "cpu")
        calls.clear()
        return calls

    return switch


def _log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))["prompt_embeddings"]


def test_train_and_eval_on_the_device_follow_the_cpu(tmp_path, on):
    data = write_data(tmp_path)
    runs = {}
    for side, device in (("cpu", "cpu"), ("dev", DEVICE)):
        out = str(tmp_path / f"run_{side}")
        calls = on(device)
        assert cli.main(["train", data, "-o", out, "--device", device, "--eval-data", data, *TRAIN]) == 0
        assert calls and set(calls) == {device}
        scores = tmp_path / f"eval_{side}.json"
        assert cli.main(["eval", data, "--model", os.path.join(out, "base_model"), "--adapter",
                         f"a={os.path.join(out, 'adapter')}", "--device", device, "--no-progress",
                         "-o", str(scores)]) == 0
        runs[side] = (_log(out), _adapter(out), json.loads(scores.read_text()))
    (cpu_log, cpu_adapter, cpu_eval), (log, adapter, scores) = runs["cpu"], runs["dev"]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert log[0]["loss"] == pytest.approx(cpu_log[0]["loss"], rel=1e-4)  # before any update
    # four Adam steps at lr 0.05 (Adam's normalised updates amplify the last bits of a gradient)
    assert log[-1]["eval_loss"] == pytest.approx(cpu_log[-1]["eval_loss"], rel=2e-2)
    torch.testing.assert_close(adapter, cpu_adapter, rtol=0, atol=5e-2)
    assert adapter.device.type == "cpu" and adapter.dtype == torch.float32  # saved as PEFT does
    # eval on the device scores the device's adapter as train logged it
    assert scores["prefixes"]["a"]["loss"] == pytest.approx(log[-1]["eval_loss"], rel=1e-4)
    assert scores["prefixes"]["a"]["loss"] == pytest.approx(cpu_eval["prefixes"]["a"]["loss"], rel=2e-2)


def test_train_resumes_on_the_device(tmp_path, on):
    data = write_data(tmp_path)
    straight, split = str(tmp_path / "a"), str(tmp_path / "b")
    on(DEVICE)
    assert cli.main(["train", data, "-o", straight, "--device", DEVICE, *TRAIN]) == 0
    short = [a if a != "4" or TRAIN[i - 1] != "--max-steps" else "2" for i, a in enumerate(TRAIN)]
    assert cli.main(["train", data, "-o", split, "--device", DEVICE, *short]) == 0
    assert cli.main(["train", data, "-o", split, "--device", DEVICE, "--resume", *TRAIN]) == 0
    torch.testing.assert_close(_adapter(split), _adapter(straight), rtol=1e-5, atol=1e-6)


def _requests(path):
    lines = [{"id": i, "prompt": p, "prefix": name, "max_tokens": 12}
             for i, (p, name) in enumerate([("Hello", "t"), ("A longer prompt here", None),
                                            ("Hi", "sys"), ("Q:", "t"), ("", "sys")])]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return str(path)


def test_generate_on_the_device_gives_the_cpu_s_answers(tmp_path, on):
    adapter = save_adapter(tmp_path / "adapter")
    requests = _requests(tmp_path / "requests.jsonl")
    answers = {}
    for side, device in (("cpu", "cpu"), ("dev", DEVICE)):
        out = tmp_path / f"out_{side}.jsonl"
        calls = on(device)
        assert cli.main(["generate", "-i", requests, "-o", str(out), "--adapter", f"t={adapter}",
                         "--prompt-prefix", "sys=You are terse. ", "--device", device,
                         "--batch-size", "3", "--no-progress"]) == 0
        assert calls and set(calls) == {device}
        answers[side] = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["id"] for a in answers["dev"]] == list(range(5))
    assert [(a["completion"], a["num_tokens"], a["finish_reason"]) for a in answers["dev"]] == \
        [(a["completion"], a["num_tokens"], a["finish_reason"]) for a in answers["cpu"]]


def _stream(server, body):
    """The text and the tokens' logprobs of a streamed completion."""
    import urllib.request

    host, port = server.address
    req = urllib.request.Request(f"http://{host}:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    text = ""
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                choices = json.loads(line[6:])["choices"]
                text += "".join(c["text"] for c in choices)
    return text


def test_serve_on_the_device_answers_as_on_the_cpu(tmp_path, on):
    adapter = save_adapter(tmp_path / "adapter")
    body = {"model": "t", "prompt": "Hello there", "max_tokens": 10, "logprobs": 2}
    got = {}
    for side, device in (("cpu", "cpu"), ("dev", DEVICE)):
        calls = on(device)
        with started("--adapter", f"t={adapter}", "--device", device, "--batch-size", "4") as server:
            status, answer = call(server, "/v1/completions", body)
            assert status == 200, answer
            streamed = _stream(server, {**{k: v for k, v in body.items() if k != "logprobs"}, "stream": True})
            status, many = call(server, "/v1/completions", {"model": "t", "prompt": ["a", "bb", "ccc"],
                                                           "max_tokens": 6, "n": 2})
            assert status == 200, many
        assert calls and set(calls) == {device}
        got[side] = (answer, streamed, many)
    (answer, streamed, many), (cpu_answer, _, cpu_many) = got["dev"], got["cpu"]
    choice, cpu_choice = answer["choices"][0], cpu_answer["choices"][0]
    assert choice["text"] == cpu_choice["text"] == streamed
    assert choice["logprobs"]["tokens"] == cpu_choice["logprobs"]["tokens"]
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(cpu_choice["logprobs"]["token_logprobs"],
                                                                 rel=1e-4, abs=1e-4)
    assert [c["text"] for c in many["choices"]] == [c["text"] for c in cpu_many["choices"]]
    assert many["usage"] == cpu_many["usage"]
