"""``prefix-attn serve``'s "prompt" as OpenAI's API takes it: a string, an array of strings, an
array of token ids or an array of arrays of token ids (what lm-evaluation-harness's
``local-completions`` sends: token ids by default, several prompts with batch_size > 1). Each
prompt's choices are those of the prompt sent alone; token ids run as given after the prefix,
checked against a forward of exactly those ids."""
import pytest
import torch
from test_serve_logprobs import chosen
from test_server import SYSTEM, call, started
from test_server_stream import streamed

from prefix_attn import tiny

pytestmark = pytest.mark.hf

BYTES = tiny.ByteTokenizer()


@pytest.fixture(scope="module")
def server():
    with started("--prompt-prefix", f"sys={SYSTEM}", "--max-new-tokens", "5", "--batch-wait-ms", "0") as s:
        yield s


def ids_of(text):
    """The byte tokenizer's ids of ``text``, without the start token."""
    return BYTES.encode(text, add_special_tokens=False)


def forward(server, ids, prefix):
    """log_softmax [tokens, vocab] of a forward of exactly ``ids`` after bank entry ``prefix``."""
    with torch.no_grad():
        return torch.log_softmax(server.served.model(torch.tensor([ids]), prefixes=[prefix]).logits.float(), -1)[0]


def completions(server, body):
    status, got = call(server, "/v1/completions", body)
    assert status == 200, got
    return got


def test_an_array_of_strings_gives_n_choices_a_prompt_in_openai_s_order(server):
    prompts = ["ab", "cde", "f"]
    body = {"model": "sys", "max_tokens": 4, "logprobs": 1}
    alone = [completions(server, {**body, "prompt": p}) for p in prompts]
    got = completions(server, {**body, "prompt": prompts, "n": 2})
    assert [c["index"] for c in got["choices"]] == list(range(6))
    for i, one in enumerate(alone):  # choice prompt_index * n + j
        for j in range(2):
            assert {**got["choices"][2 * i + j], "index": 0} == one["choices"][0]
    assert got["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone) == 6
    assert got["usage"]["completion_tokens"] == 24


def test_token_ids_run_as_given_after_the_prefix(server):
    """After a prompt prefix, a text prompt runs without the start token: its ids given as they
    are get its answer; without a prefix, no start token is added to ids (the text's has one)."""
    text = completions(server, {"prompt": "why?", "model": "sys", "max_tokens": 4})["choices"][0]
    ids = completions(server, {"prompt": ids_of("why?"), "model": "sys", "max_tokens": 4})
    assert ids["choices"][0]["text"] == text["text"] and ids["usage"]["prompt_tokens"] == 4
    with_start = [BYTES.bos_token_id] + ids_of("why?")
    plain = completions(server, {"prompt": "why?", "max_tokens": 4})
    assert completions(server, {"prompt": with_start, "max_tokens": 4})["choices"] == plain["choices"]
    bare = completions(server, {"prompt": ids_of("why?"), "max_tokens": 1, "echo": True, "logprobs": 0})
    lp = forward(server, ids_of("why?"), None)
    torch.testing.assert_close(bare["choices"][0]["logprobs"]["token_logprobs"][1:4], chosen(lp, ids_of("why?"), 1),
                               rtol=0, atol=1e-5)


def test_lm_eval_s_loglikelihood_request_of_token_id_arrays(server):
    """As local-completions sends a batch of loglikelihood requests (tokenized_requests, the
    default): token id arrays, echo, logprobs 1, max_tokens 1, temperature 0 and a seed."""
    rows = [ids_of("2 + 2 = 4"), [BYTES.bos_token_id] + ids_of(" no"), ids_of("ab")]
    body = {"model": "sys", "prompt": rows, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0,
            "seed": 1234}
    got = completions(server, body)
    assert [c["index"] for c in got["choices"]] == [0, 1, 2]
    for ids, choice in zip(rows, got["choices"]):
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(ids) + 1 and logprobs["token_logprobs"][0] is None
        torch.testing.assert_close(logprobs["token_logprobs"][1:-1], chosen(forward(server, ids, "sys"), ids, 1),
                                   rtol=0, atol=1e-5)
        assert choice["text"].startswith(BYTES.decode(ids))  # the echo: the ids' text
    assert got["choices"][1]["logprobs"]["text_offset"][:3] == [0, 0, 1]  # the start token: no text
    assert got["usage"]["prompt_tokens"] == sum(map(len, rows))


def test_scoring_token_id_arrays_with_max_tokens_0_is_one_forward(server):
    rows = [ids_of("abc"), ids_of("de")]
    calls = []
    model = server.served.model
    hook = model.register_forward_hook(lambda m, args, out: calls.append(out.logits.shape[0]))
    try:
        got = completions(server, {"prompt": rows, "echo": True, "logprobs": 0, "max_tokens": 0})
    finally:
        hook.remove()
    assert calls == [2]
    assert [c["text"] for c in got["choices"]] == ["abc", "de"]
    assert [c["logprobs"]["text_offset"] for c in got["choices"]] == [[0, 1, 2], [0, 1]]
    for ids, choice in zip(rows, got["choices"]):
        torch.testing.assert_close(choice["logprobs"]["token_logprobs"][1:], chosen(forward(server, ids, None), ids, 1),
                                   rtol=0, atol=1e-5)


def test_lm_eval_s_generate_until_request_of_token_id_arrays(server):
    body = {"model": "sys", "max_tokens": 5, "temperature": 0, "stop": ["\n"], "seed": 1234}
    prompts = ["Q: 2 + 2?\nA:", "Q: up?\nA:"]
    alone = [completions(server, {**body, "prompt": p})["choices"][0] for p in prompts]
    got = completions(server, {**body, "prompt": [ids_of(p) for p in prompts]})
    assert [{**c, "index": 0} for c in got["choices"]] == alone


def test_streamed_prompts_each_choice_by_its_index(server):
    prompts = [ids_of("yo"), ids_of("hey there")]
    whole = completions(server, {"prompt": prompts, "n": 2, "max_tokens": 4})["choices"]
    chunks = streamed(server, {"prompt": prompts, "n": 2, "max_tokens": 4, "stream_options": {"include_usage": True}})
    texts = {i: "" for i in range(4)}
    for c in chunks[:-1]:
        [choice] = c["choices"]
        texts[choice["index"]] += choice["text"]
    assert texts == {c["index"]: c["text"] for c in whole}
    assert chunks[-1]["usage"]["prompt_tokens"] == 11 and chunks[-1]["usage"]["completion_tokens"] == 16


def test_more_prompts_than_the_batch_size_run_in_several_batches():
    prompts = ["a", "bb", "ccc", "dd", "e"]
    with started("--max-new-tokens", "3", "--batch-size", "2", "--batch-wait-ms", "0") as s:
        alone = [completions(s, {"prompt": p})["choices"][0]["text"] for p in prompts]
        rows, generate = [], s.served.model.generate
        s.served.model.generate = lambda ids, **k: rows.append(ids.shape[0]) or generate(ids, **k)
        try:
            got = completions(s, {"prompt": prompts})
        finally:
            s.served.model.generate = generate
    assert [c["text"] for c in got["choices"]] == alone
    assert sum(rows) == 5 and max(rows) == 2


@pytest.mark.parametrize("prompt, words", [
    ([], "'prompt' is an empty array: give at least one prompt"),
    ([[1, 2], []], "'prompt'[1] is an empty array of token ids"),
    ([5, "a"], "got an array holding a number and a string ('prompt'[1])"),
    (["a", 5], "got an array holding a string and a number ('prompt'[1])"),
    ([[5], 5], "got an array holding an array and a number ('prompt'[1])"),
    ([True], "got an array holding a boolean ('prompt'[0])"),
    ([None], "got an array holding null ('prompt'[0])"),
    ([5, 259], "'prompt'[1]: token id 259 is not in the model's vocabulary (ids 0 to 258)"),
    ([[5], [6, -1]], "'prompt'[1][1]: token id -1 is not in the model's vocabulary"),
    ([[5], [6, 7.5]], "'prompt'[1][1] must be a token id (an integer), got 7.5"),
    ([[5], [6, True]], "'prompt'[1][1] must be a token id (an integer), got true"),
    (["a"] * 1025, "1025 prompts x n 2 = 2050 choices, over the 2048 a request may ask"),
])
def test_bad_prompts_are_400_naming_the_place(server, prompt, words):
    status, got = call(server, "/v1/completions", {"prompt": prompt, "n": 2})
    assert status == 400 and words in got["error"]["message"], got
    assert got["error"]["param"] == "prompt"

