"""attn_implementation="prefix_attn" with no prefix in play equals sdpa (eager for softcap) on
every family, left and right padding; registration; loading paths; fallbacks."""
import subprocess
import sys
import warnings

import pytest
import torch

import prefix_attn.hf as hf
from prefix_attn.tiny import FAMILIES, tiny_model
from conftest import more_families, require_attention_interface

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf


def _baseline(family):
    return "eager" if family == "gemma2" else "sdpa"  # sdpa refuses softcap


def _out(o):
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _padded(pad, B=3, S=9, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    if pad == "left":
        mask[1, :3] = 0
        mask[2, :5] = 0
    elif pad == "right":
        mask[1, -3:] = 0
        mask[2, -5:] = 0
    return ids, mask


def test_import_prefix_attn_registers():
    code = ("import prefix_attn\n"
            "from transformers import AttentionInterface\n"
            "from transformers.masking_utils import AttentionMaskInterface\n"
            "assert 'prefix_attn' in AttentionInterface._global_mapping\n"
            "assert 'prefix_attn' in AttentionMaskInterface._global_mapping\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("pad", ["left", "right"])
@pytest.mark.parametrize("family", list(FAMILIES) + more_families())
def test_no_prefix_equals_baseline(family, pad, recwarn):
    """Mistral and Gemma 2 use a sliding window (4) shorter than the sequence (9)."""
    require_attention_interface(family)
    ours = tiny_model(family)
    ref = tiny_model(family, attn_implementation=_baseline(family))
    ref.load_state_dict(ours.state_dict())
    ids, mask = _padded(pad)
    with torch.no_grad():
        a, b = _out(ours(ids, attention_mask=mask)), _out(ref(ids, attention_mask=mask))
    keep = mask.bool()  # padded queries are undefined in HF; ours output zeros there
    torch.testing.assert_close(a[keep], b[keep], rtol=1e-5, atol=1e-5)
    assert not [w for w in recwarn if "prefix_attn" in str(w.message)]  # no fallback taken


def test_mask_reaches_kernel_as_padding_not_dense(monkeypatch):
    ours = tiny_model("mistral")
    seen = []
    real = hf.attention_forward

    def spy(module, q, k, v, mask, **kw):
        seen.append(None if mask is None else tuple(mask.shape))
        return real(module, q, k, v, mask, **kw)

    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, "prefix_attn", spy)
    ids, mask = _padded("left")
    with torch.no_grad():
        ours(ids, attention_mask=mask)
        ours(ids)
    assert seen == [(3, 9)] * 2 + [None] * 2


def test_from_pretrained_and_set_attn_implementation(tmp_path):
    sdpa = tiny_model("llama", attn_implementation="sdpa")
    sdpa.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="prefix_attn")
    assert loaded.config._attn_implementation == "prefix_attn"
    switched = tiny_model("llama", attn_implementation="sdpa")
    switched.set_attn_implementation("prefix_attn")
    assert switched.config._attn_implementation == "prefix_attn"
    ids, mask = _padded("left")
    with torch.no_grad():
        ref = sdpa(ids, attention_mask=mask).logits
        for m in (loaded.eval(), switched):
            torch.testing.assert_close(m(ids, attention_mask=mask).logits[mask.bool()], ref[mask.bool()],
                                       rtol=1e-5, atol=1e-5)


def test_output_attentions_falls_back_with_eager_weights():
    ours = tiny_model("llama")
    ref = tiny_model("llama", attn_implementation="eager")
    ref.load_state_dict(ours.state_dict())
    ids, mask = _padded("right")
    hf.attention._warned.clear()
    with torch.no_grad(), pytest.warns(UserWarning, match="output_attentions"):
        a = ours(ids, attention_mask=mask, output_attentions=True)
    with torch.no_grad():
        b = ref(ids, attention_mask=mask, output_attentions=True)
    keep = mask.bool()
    torch.testing.assert_close(a.logits[keep], b.logits[keep], rtol=1e-5, atol=1e-5)
    for wa, wb in zip(a.attentions, b.attentions):
        assert wa.shape == wb.shape == (3, 4, 9, 9)
        torch.testing.assert_close(wa.transpose(1, 2)[keep], wb.transpose(1, 2)[keep], rtol=1e-5, atol=1e-6)


def test_the_fallback_trains_under_anomaly_detection():
    """The fallback hid the NaN of a query that sees no key (a left-padded row's padding, no
    prefix) behind nan_to_num; SoftmaxBackward gave it back and torch.autograd.detect_anomaly
    stopped a correct training step ("returned nan values"). Same loss and gradients as
    without anomaly mode."""
    from prefix_attn.tuning import prefix_tuning

    ids, mask = _padded("left")
    losses, grads = [], []
    for anomaly in (False, True):
        model = tiny_model("llama", seed=0)
        prefix_tuning(model, 2, name="p")
        model.train()
        hf.attention._warned.clear()
        with warnings.catch_warnings(), torch.autograd.set_detect_anomaly(anomaly):
            warnings.simplefilter("ignore")
            out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100),
                        output_attentions=True, prefixes=["p", None, None])  # the fallback
            out.loss.backward()
        losses.append(out.loss.detach())
        grads.append([p.grad for p in model.prefix_bank.trainable.parameters()])
        assert all(torch.isfinite(g).all() for g in grads[-1])
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_custom_4d_mask_falls_back_and_is_applied(kind):
    """A 4-D mask of the user's own (block-diagonal here: tokens 3.. do not see 0..2) takes
    the PyTorch fallback, as a boolean mask or as an additive one (0 / dtype min). (sdpa is
    the reference: transformers' eager attention adds a boolean mask as if it were float.)"""
    ours = tiny_model("llama")
    ref = tiny_model("llama", attn_implementation="sdpa")
    ref.load_state_dict(ours.state_dict())
    T = 6
    ids = torch.randint(3, 100, (1, T), generator=torch.Generator().manual_seed(0))
    vis = torch.tril(torch.ones(T, T, dtype=torch.bool))
    vis[3:, :3] = False
    mask = vis[None, None] if kind == "bool" else \
        torch.zeros(1, 1, T, T).masked_fill(~vis, torch.finfo(torch.float32).min)
    hf.attention._warned.clear()
    with torch.no_grad(), pytest.warns(UserWarning, match="dense"):
        got = ours(ids, attention_mask=mask).logits
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        alone = ref(ids[:, 3:]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:, 3:], alone, rtol=1e-5, atol=1e-5)  # the mask did act


def test_attention_dropout_in_training_falls_back():
    """Same seed, same dropout draw as eager: equal logits; and a one-time warning."""
    ours = tiny_model("llama", attention_dropout=0.3).train()
    ref = tiny_model("llama", attention_dropout=0.3, attn_implementation="eager").train()
    ref.load_state_dict(ours.state_dict())
    ids, _ = _padded(None)
    hf.attention._warned.clear()
    torch.manual_seed(5)
    with pytest.warns(UserWarning, match="dropout"):
        a = ours(ids).logits
    torch.manual_seed(5)
    b = ref(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        ours(ids)


def test_packed_sequences_run_fused_and_equal_sdpa(recwarn):
    """Two sequences packed in one row (position_ids restart, no attention_mask): the mask
    function hands the sequence ids to the kernel path (tests/test_packed.py), no dense mask,
    no fallback; the logits are sdpa's."""
    ours = tiny_model("qwen2")
    ref = tiny_model("qwen2", attn_implementation="sdpa")
    ref.load_state_dict(ours.state_dict())
    ids, _ = _padded(None, B=1)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])
    hf.attention._warned.clear()
    with torch.no_grad():
        a = ours(ids, position_ids=pos, use_cache=False).logits
    assert not [w for w in recwarn if "prefix_attn" in str(w.message)]
    with torch.no_grad():
        b = ref(ids, position_ids=pos, use_cache=False).logits
        unpacked = ref(ids, use_cache=False).logits
    assert (a - unpacked).abs().max() > 1e-3  # the packing changes the result
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_padding_mask_function_patterns():
    from transformers import masking_utils as mu

    am = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert hf.mask_pattern(mu.causal_mask_function) == "causal"
    assert hf.mask_pattern(mu.bidirectional_mask_function) == "full"
    assert hf.mask_pattern(mu.sliding_window_causal_mask_function(3)) == "sliding"
    assert hf.mask_pattern(mu.chunked_causal_mask_function(2, torch.zeros(2, dtype=torch.long))) is None
    out = hf.padding_mask(2, 4, 4, attention_mask=am, mask_function=mu.causal_mask_function)
    assert torch.equal(out, am)
    assert hf.padding_mask(2, 4, 4, attention_mask=torch.ones(2, 4, dtype=torch.bool)) is None
    # a sliding-window cache: the mask covers past + new tokens, kv starts at the offset
    am6 = torch.ones(2, 6, dtype=torch.bool)
    am6[0, 3] = False
    out = hf.padding_mask(2, 1, 3, q_offset=5, kv_offset=3, attention_mask=am6,
                          mask_function=mu.sliding_window_causal_mask_function(3))
    assert torch.equal(out, am6[:, 3:6])
    # a static cache in prefill (offsets not bottom-right aligned): the mask of the filled slots
    # only (the attention function cuts K/V to its length, where the diagonal aligns)
    filled = hf.padding_mask(2, 2, 6, q_offset=0, kv_offset=0, attention_mask=am)
    assert torch.equal(filled, am[:, :2])
    # a pattern the kernel cannot express stays dense
    dense = hf.padding_mask(2, 2, 6, q_offset=0, kv_offset=0, attention_mask=am,
                            mask_function=mu.chunked_causal_mask_function(2, torch.zeros(2, dtype=torch.long)))
    assert dense.shape == (2, 1, 2, 6)
    # static-cache decode: the unfilled slots after the query become padding
    out = hf.padding_mask(2, 1, 6, q_offset=4, kv_offset=0, attention_mask=torch.ones(2, 5, dtype=torch.bool))
    assert out.tolist() == [[True] * 5 + [False]] * 2
    # releases that pass cache_position instead of q_length / q_offset
    out = hf.padding_mask(2, kv_length=4, cache_position=torch.arange(4), attention_mask=am,
                          mask_function=mu.causal_mask_function)
    assert torch.equal(out, am)


def test_eager_composite_matches_reference():
    from prefix_attn.reference import prefix_attention_ref

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 5, 8, generator=g)
    k, v = torch.randn(2, 3, 2, 7, 8, generator=g)
    pk, pv = torch.randn(2, 2, 2, 6, 8, generator=g)
    ids, lens = torch.tensor([1, 0, 1]), torch.tensor([6, 2])
    kpm = torch.ones(3, 7, dtype=torch.bool)
    kpm[2, :3] = False
    for causal, window, softcap in [(True, None, None), (False, None, 3.0), (True, 3, None)]:
        ref = prefix_attention_ref(q, k, v, pk, pv, prefix_ids=ids, prefix_lens=lens,
                                   key_padding_mask=kpm, causal=causal, window=window, softcap=softcap)
        out, _ = hf.eager_prefix_attention(q, k, v, pk, pv, ids, lens, kpm, None, causal, None,
                                           window, softcap)
        torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-6)
