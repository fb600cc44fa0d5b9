"""Packed sequences (several sequences per row, found by transformers from restarting
position_ids): the kernel runs them regrouped one sequence per row, each sequence with its
row's prefix; results equal each sequence run alone, forward and backward."""
import warnings

import pytest
import torch

import prefix_attn
from prefix_attn import prefix_attention
from prefix_attn.hf import cache_kwarg
from prefix_attn.packed import packed_attention, packed_dense_mask, segments

# two rows: sequences of 5, 1, 7 tokens and of 9, 4 tokens (T = 13)
LAYOUT = [[5, 1, 7], [9, 4]]
T = 13


def _seq_ids():
    return torch.tensor([[i for i, n in enumerate(row) for _ in range(n)] for row in LAYOUT])


def test_segments():
    seq_ids = _seq_ids()
    index, valid, row, slots = segments(seq_ids)
    assert valid.sum(1).tolist() == [5, 1, 7, 9, 4] and row.tolist() == [0, 0, 0, 1, 1]
    assert index[valid].tolist() == list(range(2 * T))  # every token once, in packed order
    assert index[slots].tolist() == list(range(2 * T))
    assert segments(seq_ids)[0] is index  # once per seq_ids tensor (every layer shares it)
    seq_ids[1, -1] = 5  # changed in place: found again
    assert segments(seq_ids)[1].sum(1).tolist() == [5, 1, 7, 9, 3, 1]


@pytest.mark.parametrize("backend", ["torch", "cpu", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("extra", [{}, dict(window=3), dict(softcap=2.0), dict(causal=False)],
                         ids=["causal", "window", "softcap", "noncausal"])
def test_packed_equals_each_sequence_alone(backend, extra):
    if backend not in prefix_attn.available_backends():
        pytest.skip(f"{backend} backend not available")
    g = torch.Generator().manual_seed(0)
    Hq, Hkv, D, P = 4, 2, 16, 6

    def rnd(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    q, k, v = rnd(2, Hq, T, D), rnd(2, Hkv, T, D), rnd(2, Hkv, T, D)
    pk, pv = rnd(2, Hkv, P, D), rnd(2, Hkv, P, D)
    ids, lens = torch.tensor([1, 0]), torch.tensor([6, 2])
    out = packed_attention(q, k, v, _seq_ids(), pk, pv, prefix_ids=ids, prefix_lens=lens,
                           backend=backend, **extra)          # [B, T, Hq, D]
    w = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v, pk, pv))

    want = torch.zeros_like(out)
    for b, row in enumerate(LAYOUT):
        o = 0
        for n in row:
            s = slice(o, o + n)
            want[b, s] = prefix_attention(q[b:b + 1, :, s], k[b:b + 1, :, s], v[b:b + 1, :, s],
                                          pk, pv, prefix_ids=ids[b:b + 1], prefix_lens=lens,
                                          backend=backend, **extra)[0].transpose(0, 1)
            o += n
    want_grads = torch.autograd.grad((want * w).sum(), (q, k, v, pk, pv))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for name, a, b in zip("q k v pk pv".split(), grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_packed_dense_mask():
    m = packed_dense_mask(_seq_ids(), causal=True, window=2)[:, 0]
    assert m.shape == (2, T, T)
    assert m[0, 4, 3] and m[0, 4, 4] and not m[0, 4, 2]      # window 2 inside sequence 0
    assert not m[0, 5, 4] and m[0, 5, 5] and not m[0, 6, 5]  # sequence 1 is one token
    assert not m[1, 9, 8]                                     # rows' sequences are apart


# ---------------------------------------------------------------------------------------
# through transformers: DataCollatorWithFlattening-style rows (no attention mask, position_ids
# restarting at every sequence)
# ---------------------------------------------------------------------------------------
def _count_packed_calls(monkeypatch) -> list:
    """A list that grows by one at every regrouped (packed) attention call."""
    from prefix_attn.hf import attention as hf  # the module that calls it

    calls = []
    real = hf.packed_attention
    monkeypatch.setattr(hf, "packed_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def _model_with_prefix(family, P, seed):
    """A tiny model with one trainable prefix "x" drawn from `seed`: (model, prefix module)."""
    from prefix_attn.tiny import tiny_model
    from prefix_attn.tuning import prefix_tuning

    model = tiny_model(family)
    module = prefix_tuning(model, num_virtual_tokens=P, name="x")
    with torch.no_grad():
        module.embedding.weight.normal_(generator=torch.Generator().manual_seed(seed))
    return model, module


@pytest.mark.hf
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "qwen3", "gpt2"])
def test_hf_packed_rows_equal_each_sequence_alone(family, monkeypatch):
    """Forward with and without prefixes on the fused path (no fallback warning, the packed
    path is taken), and the prefix gradient of a packed step equals that of the sequences
    run one by one (mistral and gemma2's window 4 is shorter than the sequences)."""
    calls = _count_packed_calls(monkeypatch)
    model, module = _model_with_prefix(family, P=4, seed=1)
    lens = LAYOUT[0]
    ids = torch.randint(3, 100, (1, sum(lens)), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(n) for n in lens])[None]

    def pieces():
        o = 0
        for n in lens:
            yield ids[:, o:o + n]
            o += n

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback would warn
        for prefixes in (None, ["x"]):
            with torch.no_grad():
                packed = model(input_ids=ids, position_ids=pos, use_cache=False, prefixes=prefixes).logits
                alone = torch.cat([model(input_ids=x, use_cache=False, prefixes=prefixes).logits
                                   for x in pieces()], 1)
            torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
        assert calls  # the regrouped kernel path ran

        model.train()
        loss = model(input_ids=ids, position_ids=pos, use_cache=False, prefixes=["x"]).logits.logsumexp(-1).sum()
        g_packed = torch.autograd.grad(loss, module.embedding.weight)[0]
        loss = sum(model(input_ids=x, use_cache=False, prefixes=["x"]).logits.logsumexp(-1).sum()
                   for x in pieces())
        g_alone = torch.autograd.grad(loss, module.embedding.weight)[0]
    torch.testing.assert_close(g_packed, g_alone, rtol=1e-4, atol=1e-6)


@pytest.mark.hf
def test_hf_packed_rows_on_the_fallback_path_too():
    """output_attentions forces the PyTorch fallback: it gets the packed rows' block mask."""
    from prefix_attn.tiny import tiny_model

    model = tiny_model("llama")
    lens = [3, 4]
    ids = torch.randint(3, 100, (1, 7), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        fallback = model(input_ids=ids, position_ids=pos, use_cache=False, output_attentions=True)
    torch.testing.assert_close(fallback.logits, fused, rtol=1e-5, atol=1e-5)
    assert fallback.attentions[0][0, :, 3:, :3].abs().max() == 0  # sequences apart


@pytest.mark.hf
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_hf_flattening_collator_with_cache_left_on(family, monkeypatch):
    """DataCollatorWithFlattening's batch in a training forward with use_cache left at its
    default: transformers' mask then ignores the packing (a cache exists; sdpa mixes the
    sequences), so the attention function finds it from the restarting position_ids, as the
    flash-attention path does: the sequences stay apart, each with the row's prefix."""
    from transformers import DataCollatorWithFlattening

    calls = _count_packed_calls(monkeypatch)
    model, _ = _model_with_prefix(family, P=3, seed=2)
    model.train()
    rows = [{"input_ids": list(range(3 + 7 * i, 3 + 7 * i + n))} for i, n in enumerate((5, 3, 6))]
    batch = DataCollatorWithFlattening()(rows)
    assert batch["input_ids"].shape == (1, 14) and "attention_mask" not in batch
    packed = model(**batch, prefixes=["x"]).logits
    assert calls
    alone = torch.cat([model(input_ids=torch.tensor([r["input_ids"]]), prefixes=["x"]).logits
                       for r in rows], 1)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.hf
@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("lens", [[1, 3], [2, 1, 3]])
def test_hf_packed_row_with_a_one_token_sequence(family, lens):
    """A one-token sequence before a restart steps its positions by 0, not down (0, 0, 1, ..):
    such rows were not found packed with a cache (use_cache left on) and the sequences
    attended to each other (OPT, which builds its own all-ones mask, even without a cache)."""
    model, _ = _model_with_prefix(family, P=3, seed=3)
    ids = torch.randint(3, 100, (1, sum(lens)), generator=torch.Generator().manual_seed(1))
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    starts = [sum(lens[:i]) for i in range(len(lens))]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback would warn
        for prefixes in (None, ["x"]):
            alone = torch.cat([model(input_ids=ids[:, o:o + n], prefixes=prefixes).logits
                               for o, n in zip(starts, lens)], 1)
            for use_cache in (False, True):
                packed = model(input_ids=ids, position_ids=pos, use_cache=use_cache,
                               prefixes=prefixes).logits
                torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.hf
def test_hf_packed_row_with_a_prefix_on_the_fallback_path():
    """One packed row with prefixes= on the PyTorch fallback (output_attentions here; attention
    sinks, dropout in training): the hook made it one prefix per sequence, which the fallback
    refused with NotImplementedError (DataCollatorWithFlattening on BioGPT / GPT-BigCode, whose
    attention dropout is on in training). Now each sequence equals its run alone."""
    from prefix_attn.tiny import tiny_model

    model, _ = _model_with_prefix("llama", P=3, seed=4)
    lens = [3, 4]
    ids = torch.randint(3, 100, (1, sum(lens)), generator=torch.Generator().manual_seed(3))
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for prefixes in (["x"], [None]):
            out = model(ids, position_ids=pos, use_cache=False, prefixes=prefixes, output_attentions=True)
            alone = torch.cat([model(ids[:, :3], prefixes=prefixes).logits,
                               model(ids[:, 3:], prefixes=prefixes).logits], 1)
            torch.testing.assert_close(out.logits, alone, rtol=1e-5, atol=1e-5)
            assert out.attentions[0].shape[-1] == sum(lens) + (3 if prefixes[0] else 0)
    biogpt = tiny_model("biogpt", attention_probs_dropout_prob=0.1)
    prefix_attn.prefix_tuning(biogpt, num_virtual_tokens=3, name="x")
    biogpt.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = biogpt(ids, position_ids=pos, use_cache=False, labels=ids, prefixes=["x"]).loss
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.hf
@pytest.mark.parametrize("positions", [[0, 1, 5, 6], [0, 1, 1, 2]])
def test_hf_gaps_in_positions_are_one_sequence_with_a_cache(positions):
    """Positions that jump or repeat without restarting are one sequence for sdpa with a cache
    (and for flash-attention, which splits where the first position comes again): the
    search for packed rows with a cache split them at every step other than +1."""
    from prefix_attn.tiny import tiny_model

    ours = tiny_model("llama")
    ref = tiny_model("llama", attn_implementation="sdpa")
    ref.load_state_dict(ours.state_dict())
    ids = torch.randint(3, 100, (1, 4), generator=torch.Generator().manual_seed(2))
    pos = torch.tensor([positions])
    with torch.no_grad():
        for use_cache in (False, True):
            torch.testing.assert_close(ours(ids, position_ids=pos, use_cache=use_cache).logits,
                                       ref(ids, position_ids=pos, use_cache=use_cache).logits,
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.hf
@pytest.mark.parametrize("use_cache", [False, True])
def test_hf_one_prefix_per_packed_sequence(use_cache):
    """Multi-task padding-free training: prefixes=[...] with one entry per packed sequence.
    The first sequence has no prefix and 3 tokens, the second a 3-token prefix: shifted, their
    positions run on (0, 1, 2 | 3, 4, ...), so only the pre-hook's own sequence ids keep
    them apart. Logits and both prefixes' gradients equal each sequence run alone."""
    from prefix_attn.tuning import prefix_tuning

    model, a = _model_with_prefix("llama", P=3, seed=3)
    b = prefix_tuning(model, num_virtual_tokens=6, name="y")
    with torch.no_grad():
        b.embedding.weight.normal_(generator=torch.Generator().manual_seed(4))
    model.train()
    lens, names = [3, 4, 5, 2], [None, "x", "y", "x"]
    ids = torch.randint(3, 100, (1, sum(lens)), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    packed = model(input_ids=ids, position_ids=pos, prefixes=names, use_cache=use_cache).logits
    grads = torch.autograd.grad(packed.logsumexp(-1).sum(), (a.embedding.weight, b.embedding.weight))
    alone, o = [], 0
    for n, name in zip(lens, names):
        alone.append(model(input_ids=ids[:, o:o + n], prefixes=[name], use_cache=use_cache).logits)
        o += n
    alone = torch.cat(alone, 1)
    want = torch.autograd.grad(alone.logsumexp(-1).sum(), (a.embedding.weight, b.embedding.weight))
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.hf
def test_hf_per_sequence_prefixes_errors():
    model, _ = _model_with_prefix("llama", P=3, seed=3)
    ids = torch.randint(3, 100, (1, 7))
    with pytest.raises(ValueError, match="no such position_ids"):
        model(input_ids=ids, prefixes=["x", "x"])
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    with pytest.raises(ValueError, match="restart into 2 sequences"):
        model(input_ids=ids, position_ids=pos, prefixes=["x", "x", None])
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(input_ids=ids, position_ids=pos, prefixes=["x", None], use_cache=False,
              output_attentions=True)
    # one prefix per packed sequence reads positions from 0: not on top of a cache
    with torch.no_grad():
        past = model(input_ids=ids[:, :4], use_cache=True).past_key_values
        with pytest.raises(ValueError, match="no KV cache from an earlier call"):
            model(input_ids=ids, position_ids=pos, prefixes=["x", None],
                  **{cache_kwarg(model): past})


@pytest.mark.hf
def test_hf_position_ids_edited_in_place_are_read_again():
    """The sequences found from position_ids are cached per tensor (one host read a forward):
    the same tensor edited in place (one sequence, then two) must be read again."""
    from prefix_attn.tiny import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(8)[None].clone()
    with torch.no_grad():
        model(ids, position_ids=pos)
        pos[0, 4:] = torch.arange(4)
        torch.testing.assert_close(model(ids, position_ids=pos).logits,
                                   model(ids, position_ids=pos.clone()).logits, rtol=0, atol=0)


@pytest.mark.hf
def test_hf_compiled_packed_row_of_a_sliding_window_model():
    """Inside torch.compile the sliding-window mask function cannot be read, so the mask
    interface's keywords decide: a packed row (position_ids restarting, no cache) is not the
    plain sliding mask, and its sequences must stay apart as in eager attention."""
    from prefix_attn.tiny import tiny_model

    ours = tiny_model("mistral")
    ref = tiny_model("mistral", attn_implementation="eager")
    ref.load_state_dict(ours.state_dict())
    ids = torch.randint(3, 100, (1, 7), generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    with torch.no_grad():
        got = torch.compile(ours, backend="eager")(ids, position_ids=pos, use_cache=False).logits
        want = ref(ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
