"""model(..., prefixes=[...]) vs PEFT's forward with the same adapter (loaded by bank.load_peft)."""
import warnings

import pytest
import torch

from prefix_attn.bank import PrefixBank
from prefix_attn.tiny import CAUSAL_FAMILIES, tiny_model
from conftest import more_families, peft_comparable, require_attention_interface

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.hf



def _peft_adapter(base, path, P, seed):
    task = peft.TaskType.FEATURE_EXTRACTION if base.config.model_type == "bert" else peft.TaskType.CAUSAL_LM
    pm = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    pm.save_pretrained(path)
    return pm.eval()


def _out(o):
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _batch(pad, B=3, S=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    if pad == "left":
        mask[1, :2] = 0
        mask[2, :4] = 0
    elif pad == "right":
        mask[1, -2:] = 0
        mask[2, -4:] = 0
    return ids, mask


@pytest.mark.parametrize("family", list(CAUSAL_FAMILIES) + ["bert"] + more_families())
def test_forward_matches_peft(family, tmp_path):
    require_attention_interface(family)
    ov = peft_comparable(family)
    ours = tiny_model(family, **ov)
    base = tiny_model(family, attn_implementation="eager", **ov)
    base.load_state_dict(ours.state_dict())
    pm = _peft_adapter(base, tmp_path, P=5, seed=1)
    bank = PrefixBank.attach(ours)
    bank.load_peft("task", str(tmp_path))
    for pad in (None, "left", "right"):
        ids, mask = _batch(pad)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # PEFT passes past_key_values=
            a = _out(ours(ids, attention_mask=mask, prefixes=["task"] * 3))
            b = _out(pm(input_ids=ids, attention_mask=mask))
            plain = _out(ours(ids, attention_mask=mask))
        keep = mask.bool()
        torch.testing.assert_close(a[keep], b[keep], rtol=1e-4, atol=1e-5, msg=f"{family} pad={pad}")
        assert (a[keep] - plain[keep]).abs().max() > 1e-2  # the prefix is really in play


def test_mixed_batch_rows_match_their_own_adapter(tmp_path):
    """Three PEFT adapters of different lengths and a row without prefix in one left-padded batch:
    each row equals PEFT's forward for that row alone with its adapter (or the bare model)."""
    ours = tiny_model("qwen3")
    bank = PrefixBank.attach(ours)
    peft_models = {}
    for i, (name, P) in enumerate([("a", 3), ("b", 6), ("c", 4)]):
        base = tiny_model("qwen3", attn_implementation="sdpa")
        base.load_state_dict({k: v for k, v in ours.state_dict().items() if "prefix_bank" not in k})
        peft_models[name] = _peft_adapter(base, tmp_path / name, P=P, seed=10 + i)
        bank.load_peft(name, str(tmp_path / name))
    ids, mask = _batch("left", B=5)
    mask[3, :1] = 0
    rows = ["b", None, "a", "c", ""]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        mixed = ours(ids, attention_mask=mask, prefixes=rows).logits
        by_id = ours(ids, attention_mask=mask, prefixes=bank.ids([r or None for r in rows])).logits
        for b, name in enumerate(rows):
            keep = mask[b].bool()
            if name:
                alone = peft_models[name](input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits[0]
            else:
                alone = ours(ids[b:b + 1], attention_mask=mask[b:b + 1]).logits[0]
            torch.testing.assert_close(mixed[b][keep], alone[keep], rtol=1e-4, atol=1e-5, msg=f"row {b}")
    torch.testing.assert_close(by_id, mixed)


@pytest.mark.parametrize("family", list(CAUSAL_FAMILIES) + more_families())
@pytest.mark.parametrize("pad", ["left", "right"])
def test_mixed_lengths_in_one_batch_every_family(family, pad, tmp_path):
    """Adapters of lengths 6, 3 and 1 and a row without prefix in one padded batch, on every
    causal family (absolute positions in GPT-2, sliding window, softcap, fused qkv): each row
    equals PEFT's forward for that row alone (or the bare model)."""
    require_attention_interface(family)
    ov = peft_comparable(family)
    ours = tiny_model(family, **ov)
    bank = PrefixBank.attach(ours)
    peft_models = {}
    for i, (name, P) in enumerate([("a", 3), ("b", 6), ("c", 1)]):
        base = tiny_model(family, attn_implementation="eager", **ov)
        base.load_state_dict({k: v for k, v in ours.state_dict().items() if "prefix_bank" not in k})
        peft_models[name] = _peft_adapter(base, tmp_path / name, P=P, seed=10 + i)
        bank.load_peft(name, str(tmp_path / name))
    ids, mask = _batch(pad, B=4)
    rows = ["b", "a", None, "c"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        mixed = ours(ids, attention_mask=mask, prefixes=rows).logits
        for b, name in enumerate(rows):
            keep = mask[b].bool()
            model = peft_models[name] if name else None
            alone = (model(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]) if model
                     else ours(ids[b:b + 1], attention_mask=mask[b:b + 1])).logits[0]
            torch.testing.assert_close(mixed[b][keep], alone[keep], rtol=1e-4, atol=1e-5,
                                       msg=f"{family} pad={pad} row {b}")


def test_positions_are_numbered_from_the_prefix_length():
    """A prompt prefix of P tokens then x gives the logits of the full prompt + x (positions P..)."""
    ours = tiny_model("llama")
    bank = PrefixBank.attach(ours)
    prompt = torch.randint(3, 128, (1, 4))
    bank.add_prompt("sys", prompt)
    x = torch.randint(3, 128, (2, 5))
    with torch.no_grad():
        a = ours(x, prefixes=["sys", "sys"]).logits
        full = ours(torch.cat([prompt.expand(2, -1), x], dim=1)).logits[:, 4:]
    torch.testing.assert_close(a, full, rtol=1e-4, atol=1e-5)


def test_prefixes_need_the_prefix_attn_implementation():
    model = tiny_model("llama", attn_implementation="sdpa")
    bank = PrefixBank.attach(model)
    L, H, D = bank.num_layers, bank.num_kv_heads, bank.head_dim
    bank.add("p", torch.randn(L, H, 3, D), torch.randn(L, H, 3, D))
    with pytest.raises(ValueError, match="prefix_attn"):
        model(torch.randint(3, 128, (1, 4)), prefixes=["p"])


def test_unknown_prefix_and_wrong_row_count_raise():
    model = tiny_model("llama")
    bank = PrefixBank.attach(model)
    L, H, D = bank.num_layers, bank.num_kv_heads, bank.head_dim
    bank.add("p", torch.randn(L, H, 3, D), torch.randn(L, H, 3, D))
    ids = torch.randint(3, 128, (3, 4))
    with pytest.raises(KeyError, match="nope"):
        model(ids, prefixes=["p", "nope", "p"])
    with pytest.raises(ValueError, match="2 prefixes"):
        model(ids, prefixes=["p", "p"])


def test_model_that_drops_kwargs_raises_instead_of_ignoring_prefixes(monkeypatch):
    """If a model does not pass kwargs down to attention, the prefixes must not be silently lost."""
    import prefix_attn.hf as hf

    model = tiny_model("llama")
    bank = PrefixBank.attach(model)
    L, H, D = bank.num_layers, bank.num_kv_heads, bank.head_dim
    bank.add("p", torch.randn(L, H, 3, D), torch.randn(L, H, 3, D))
    real = hf.attention_forward

    def dropping(module, q, k, v, mask, **kw):
        kw.pop(hf.SELECTION_KWARG, None)
        return real(module, q, k, v, mask, **kw)

    import transformers

    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, "prefix_attn", dropping)
    with pytest.raises(RuntimeError, match="did not pass the prefix selection"):
        model(torch.randint(3, 128, (1, 4)), prefixes=["p"])
    # a compiled forward is not judged: inside a graph the attention cannot mark the read
    torch.compile(model, backend="eager")(torch.randint(3, 128, (1, 4)), prefixes=["p"])
    model.forward = torch.compile(model.forward, backend="eager")  # the hooks run eagerly
    model(torch.randint(3, 128, (1, 4)), prefixes=["p"])
    del model.forward
    with pytest.raises(RuntimeError, match="did not pass the prefix selection"):
        model(torch.randint(3, 128, (1, 4)), prefixes=["p"])


def test_bfloat16_model_with_prefix_is_close_to_float32():
    ours32 = tiny_model("qwen2")
    bank = PrefixBank.attach(ours32)
    L, H, D = bank.num_layers, bank.num_kv_heads, bank.head_dim
    g = torch.Generator().manual_seed(3)
    keys, values = torch.randn(2, L, H, 4, D, generator=g)
    bank.add("p", keys, values)
    ours16 = tiny_model("qwen2", dtype=torch.bfloat16)
    # the same weights, cast: a model built in bf16 draws its init differently in some
    # transformers releases (5.17 did, 2026-11-28)
    ours16.load_state_dict({n: t.to(torch.bfloat16) for n, t in ours32.state_dict().items()
                            if "prefix_bank" not in n}, strict=False)
    PrefixBank.attach(ours16).add("p", keys, values)
    assert ours16.prefix_bank.dtype == torch.bfloat16
    ids, mask = _batch("left")
    with torch.no_grad():
        a = ours16(ids, attention_mask=mask, prefixes=["p", None, "p"]).logits.float()
        b = ours32(ids, attention_mask=mask, prefixes=["p", None, "p"]).logits
    keep = mask.bool()
    assert (a[keep] - b[keep]).abs().max() < 0.05 * b[keep].abs().max()
