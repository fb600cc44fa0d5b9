"""The PEFT-path baseline every benchmark and the demo measure against: right numbers, and
the same SDPA calls as transformers' own `sdpa_attention_forward` (the function PEFT's prefix
tuning runs through), so that a speed ratio is against what users really get."""
import pytest
import torch
import torch.nn.functional as F

from prefix_attn import prefix_attention_ref
from prefix_attn.baselines import peft_path_attention, repeat_kv
from conftest import make_inputs

CASES = {
    "gqa_prefill": dict(B=2, Hq=8, Hkv=2, Sq=5, Skv=9, P=7),
    "mqa_prefill": dict(B=2, Hq=4, Hkv=1, Sq=6, Skv=6, P=3),
    "mha_prefill": dict(B=2, Hq=3, Hkv=3, Sq=4, Skv=7, P=1),
    "gqa_decode": dict(B=3, Hq=8, Hkv=2, Sq=1, Skv=9, P=5),
    "gqa_decode_padded": dict(B=3, Hq=8, Hkv=2, Sq=1, Skv=9, P=5, pad="left"),
    "gqa_no_prefix": dict(B=2, Hq=8, Hkv=2, Sq=6, Skv=6, P=None),
    "mqa_decode": dict(B=2, Hq=4, Hkv=1, Sq=1, Skv=4, P=2),
    "bank_padding": dict(B=3, Hq=4, Hkv=2, Sq=3, Skv=8, N=2, P=6, lens=[6, 2], pad="left"),
    "empty_rows": dict(B=2, Hq=4, Hkv=2, Sq=6, Skv=3, N=1, P=2, lens=[0]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_baseline_matches_the_reference(name):
    args, kw = make_inputs(**CASES[name])
    out = peft_path_attention(*args, **kw)
    ref = prefix_attention_ref(*args, **kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if name == "empty_rows":                      # the first Sq - Skv queries see no key
        assert (ref[:, :, :3] == 0).all() and (out[:, :, :3] == 0).all()


def test_repeat_kv_puts_each_kv_head_before_its_query_heads():
    x = torch.arange(2 * 3 * 1 * 1, dtype=torch.float32).reshape(2, 3, 1, 1)
    y = repeat_kv(x, 2)
    assert y.shape == (2, 6, 1, 1)
    assert y[:, :, 0, 0].tolist() == [[0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5]]


class _Spy:
    """Records the shapes and GQA flag of every SDPA call, then calls the real one."""

    def __init__(self):
        self.calls, self.real = [], F.scaled_dot_product_attention

    def __call__(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False):
        self.calls.append((tuple(q.shape), tuple(k.shape), attn_mask is not None,
                           bool(is_causal), bool(enable_gqa)))
        return self.real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa)


@pytest.mark.hf
@pytest.mark.parametrize("name", sorted(set(CASES) - {"empty_rows"}))
def test_baseline_makes_the_same_sdpa_call_as_transformers(name, monkeypatch):
    """The mask transformers' masking_utils would drop, then its sdpa_attention_forward, on
    the same concatenated K/V: the same SDPA call (shapes, mask, is_causal, enable_gqa) and
    the same bits as ours."""
    sdpa_mod = pytest.importorskip("transformers.integrations.sdpa_attention")
    from transformers.masking_utils import _ignore_causal_mask_sdpa
    from prefix_attn.reference import visible_mask
    from prefix_attn.validation import normalize

    args, kw = make_inputs(**CASES[name])
    a = normalize(*args, **kw)
    keys = torch.cat([a.prefix_k[a.prefix_ids], a.k], dim=2)
    vals = torch.cat([a.prefix_v[a.prefix_ids], a.v], dim=2)
    mask = visible_mask(a)
    B, Sq, L = a.q.shape[0], a.q.shape[2], keys.shape[2]
    # the 2-D attention mask a PEFT model sees: the prefix columns, then the own keys
    P = a.prefix_k.shape[2]
    prefix_cols = torch.arange(P)[None, :] < a.prefix_lens[a.prefix_ids][:, None]
    own_cols = (a.key_padding_mask if a.key_padding_mask is not None
                else torch.ones(B, a.k.shape[2], dtype=torch.bool))
    padding_mask = torch.cat([prefix_cols, own_cols], dim=1)
    dropped = _ignore_causal_mask_sdpa(padding_mask, Sq, L, L - Sq, 0)
    module = torch.nn.Module()
    module.num_key_value_groups = a.q.shape[1] // a.k.shape[1]
    module.is_causal = True

    spy = _Spy()
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    theirs, _ = sdpa_mod.sdpa_attention_forward(module, a.q, keys, vals,
                                                None if dropped else mask, scaling=a.scale)
    ours = peft_path_attention(*args, **kw)
    assert len(spy.calls) == 2
    assert spy.calls[0] == spy.calls[1], spy.calls
    # transformers returns [B, Sq, Hq, D]; the same call gives the same bits.
    assert torch.equal(theirs.transpose(1, 2), ours)


def test_baseline_drops_the_mask_where_transformers_does(monkeypatch):
    """Decode without padding: no mask, GQA in the kernel; prefill with a prefix: the mask,
    K/V repeated; decode with padding: the mask, query heads packed."""
    spy = _Spy()
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    for name in ("gqa_decode", "gqa_prefill", "gqa_decode_padded", "gqa_no_prefix"):
        args, kw = make_inputs(**CASES[name])
        peft_path_attention(*args, **kw)
    (q1, k1, m1, c1, g1), (q2, k2, m2, c2, g2), (q3, k3, m3, c3, g3), (q4, k4, m4, c4, g4) = spy.calls
    assert (m1, c1, g1, k1[1]) == (False, False, True, 2)
    assert (m2, c2, g2, k2[1]) == (True, False, False, 8)
    from prefix_attn.baselines import transformers_packs_gqa
    packed = (3, 2, 4, 16) if transformers_packs_gqa() else (3, 8, 1, 16)
    assert (m3, c3, g3, q3) == (True, False, False, packed)
    assert (m4, c4, g4) == (False, True, True)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_mask_made_once_per_forward_gives_the_same_layer(name, monkeypatch):
    """Benchmarks time one layer: the mask and its keep / drop decision are made once per
    forward (peft_path_forward, as transformers' masking_utils does for all layers), then each
    layer (peft_path_layer) builds no mask and gives the same bits as the one-call form."""
    import prefix_attn.baselines as base

    args, kw = make_inputs(**CASES[name])
    whole = peft_path_attention(*args, **kw)
    fwd = base.peft_path_forward(*args, **kw)

    def no_mask_per_layer(*a, **k):
        raise AssertionError("a layer built the mask")
    monkeypatch.setattr(base, "visible_mask", no_mask_per_layer)
    monkeypatch.setattr(base, "transformers_mask", no_mask_per_layer)
    q, k, v, pk, pv = args
    assert torch.equal(base.peft_path_layer(q, k, v, pk, pv, fwd), whole)
    if pk is not None and pk.shape[0] == 1:          # a one-entry bank given as [Hkv, P, D]
        assert torch.equal(base.peft_path_layer(q, k, v, pk[0], pv[0], fwd), whole)


def test_the_older_baseline_takes_its_mask_made_once():
    from prefix_attn.baselines import older_baseline_mask, peft_path_attention_enable_gqa

    args, kw = make_inputs(**CASES["gqa_prefill"])
    mask = older_baseline_mask(*args, **kw)
    assert mask.shape == (2, 1, 5, 7 + 9) and mask.dtype == torch.bool
    assert torch.equal(peft_path_attention_enable_gqa(*args, mask=mask, **kw),
                       peft_path_attention_enable_gqa(*args, **kw))
