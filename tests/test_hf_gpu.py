"""The Hugging Face layer on a CUDA GPU: tiny models on the device, the triton backend forced
(no silent fallback), against PEFT on the same device: forward with mixed prefixes and
padding, a training step's loss and prefix gradients, gradient checkpointing, bf16, autocast,
packed sequences, and generate() with mixed prefixes.

Skipped without CUDA (bench/gpu.sh runs it). PREFIX_ATTN_HF_TEST_DEVICE=cpu runs the same
tests on CPU with the cpu backend: a check of the tests themselves, not of the GPU path.
"""
import os
import warnings

import pytest
import torch

from prefix_attn.bank import PrefixBank
from prefix_attn.tiny import tiny_model
from prefix_attn.tuning import prefix_tuning
from conftest import count_attention_calls, prefix_step

peft = pytest.importorskip("peft")
DEVICE = os.environ.get("PREFIX_ATTN_HF_TEST_DEVICE", "cuda")
BACKEND = "triton" if DEVICE == "cuda" else "cpu"
pytestmark = [pytest.mark.gpu, pytest.mark.hf,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU")]
P = 5


@pytest.fixture(autouse=True)
def _forced_backend(monkeypatch):
    """Every attention call must reach the kernel backend on the device (counted)."""
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", BACKEND)
    if DEVICE == "cuda":
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    calls = count_attention_calls(monkeypatch)
    yield calls
    assert calls and set(calls) == {DEVICE}


def _batch(B=3, S=9, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :4] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(DEVICE), mask.to(DEVICE), labels.to(DEVICE)


def _peft_pair(family, P, seed=0, dtype=torch.float32):
    """(ours with the adapter in its bank as "task", the PEFT model), same weights, on DEVICE."""
    ours = tiny_model(family, seed=seed)
    base = tiny_model(family, seed=seed, attn_implementation="sdpa")
    base.load_state_dict(ours.state_dict())
    pm = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type=peft.TaskType.CAUSAL_LM,
                                                          num_virtual_tokens=P))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return ours, pm


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_forward_with_prefix_matches_peft(family, tmp_path):
    ours, pm = _peft_pair(family, P)
    pm.save_pretrained(tmp_path)
    PrefixBank.attach(ours).load_peft("task", str(tmp_path))
    ours, pm = ours.to(DEVICE).eval(), pm.to(DEVICE).eval()
    ids, mask, _ = _batch()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        a = ours(ids, attention_mask=mask, prefixes=["task"] * 3).logits
        b = pm(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep], rtol=1e-3, atol=1e-4)


def test_training_step_matches_peft_with_and_without_checkpointing():
    ours = tiny_model("llama")
    base = tiny_model("llama", attn_implementation="sdpa")
    base.load_state_dict(ours.state_dict())
    torch.manual_seed(1)
    pm = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type=peft.TaskType.CAUSAL_LM,
                                                          num_virtual_tokens=P))
    module = prefix_tuning(ours, num_virtual_tokens=P)
    module.load_state_dict(pm.prompt_encoder["default"].state_dict())
    ours, pm = ours.to(DEVICE).train(), pm.to(DEVICE).train()
    ids, mask, labels = _batch()

    loss, grads = prefix_step(ours, module, ids, mask, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loss_peft = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss_peft.backward()
    torch.testing.assert_close(loss, loss_peft.detach(), rtol=1e-4, atol=1e-5)
    for g, p in zip(grads, pm.prompt_encoder["default"].parameters()):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, p.grad, rtol=1e-3, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ours.gradient_checkpointing_enable()
    loss_ckpt, grads_ckpt = prefix_step(ours, module, ids, mask, labels)
    torch.testing.assert_close(loss_ckpt, loss)
    for a, b in zip(grads_ckpt, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_training_step_is_close_to_fp32():
    ids, mask, labels = _batch()
    results = {}
    weights = tiny_model("qwen2").state_dict()
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model("qwen2", dtype=dtype)
        # the same weights: some transformers releases draw a bf16 init differently
        model.load_state_dict({n: t.to(dtype) for n, t in weights.items()})
        module = prefix_tuning(model, num_virtual_tokens=P)
        with torch.no_grad():
            for p in module.parameters():   # the same prefix for both dtypes
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
        model.to(DEVICE).train()
        loss = model(ids, attention_mask=mask, labels=labels, prefixes=["default"] * 3).loss
        loss.backward()
        results[dtype] = (loss.float().item(), [p.grad.float().norm().item() for p in module.parameters()])
    (l32, g32), (l16, g16) = results[torch.float32], results[torch.bfloat16]
    assert abs(l16 - l32) <= 0.02 * abs(l32)
    for a, b in zip(g16, g32):
        assert abs(a - b) <= 0.1 * b and b > 0


def test_generate_with_mixed_prefixes_matches_one_row_at_a_time():
    ours = tiny_model("llama", vocab_size=64)
    bank = PrefixBank.attach(ours)
    g = torch.Generator().manual_seed(3)
    L, H, D = bank.num_layers, bank.num_kv_heads, bank.head_dim
    for name, n in (("a", 3), ("b", 6)):
        bank.add(name, *(3 * torch.randn(2, L, H, n, D, generator=g)))
    ours = ours.to(DEVICE).eval()
    ids, mask, _ = _batch(vocab=64)
    names = ["b", None, "a"]
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = ours.generate(ids, attention_mask=mask, prefixes=names, **kw)
        for b, name in enumerate(names):
            keep = mask[b].bool()
            alone = ours.generate(ids[b:b + 1, keep], prefixes=[name], **kw)
            assert batch[b, ids.shape[1]:].tolist() == alone[0, int(keep.sum()):].tolist(), f"row {b}"
        keep = mask[0].bool()
        plain = ours.generate(ids[0:1, keep], prefixes=[None], **kw)
    assert batch[0, ids.shape[1]:].tolist() != plain[0, int(keep.sum()):].tolist()  # prefix in play


def test_static_cache_generate_compiled_by_transformers_matches_eager():
    """A static cache makes generate compile the decode step itself (on CUDA: inductor with
    CUDA graphs, "reduce-overhead"): the prefix selection (index tensors, cached tiles) must be
    right inside the captured graphs and on replay for another request's prefixes."""
    from transformers import CompileConfig

    ours = tiny_model("llama", vocab_size=64)
    bank = PrefixBank.attach(ours)
    g = torch.Generator().manual_seed(5)
    L, H, D = bank.num_layers, bank.num_kv_heads, bank.head_dim
    for name, n in (("a", 3), ("b", 6), ("c", 1)):
        bank.add(name, *(3 * torch.randn(2, L, H, n, D, generator=g)))
    ours = ours.to(DEVICE).eval()
    ids, mask, _ = _batch(vocab=64)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
              cache_implementation="static", return_dict_in_generate=True, output_logits=True)
    config = CompileConfig()
    config._compile_all_devices = DEVICE == "cuda"  # on CPU (the tests' self-check): eager
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for names in (["b", None, "a"], ["c", "a", None], ["a", "a", "a"]):
            want = ours.generate(ids, attention_mask=mask, prefixes=names, disable_compile=True, **kw)
            got = ours.generate(ids, attention_mask=mask, prefixes=names, compile_config=config, **kw)
            assert got.sequences.tolist() == want.sequences.tolist(), names
            for x, y in zip(got.logits, want.logits):
                torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-3)


def test_autocast_training_step_is_close_to_fp32():
    """fp32 weights under torch.autocast (RoPE hands float32 q/k and a half v to the kernel):
    loss and prefix gradient (float32) within half-precision error of the fp32 step."""
    ids, mask, labels = _batch()
    half = torch.bfloat16 if DEVICE == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    results = []
    for autocast in (False, True):
        model = tiny_model("llama", seed=1).to(DEVICE).train()
        module = prefix_tuning(model, num_virtual_tokens=P)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
        with torch.autocast(DEVICE, dtype=half, enabled=autocast):
            loss = model(ids, attention_mask=mask, labels=labels, prefixes=["default"] * 3).loss
        loss.backward()
        results.append((loss.float().item(), module.embedding.weight.grad.clone()))
    (l32, g32), (l16, g16) = results
    assert g16.dtype == torch.float32 and abs(l16 - l32) <= 0.02 * abs(l32)
    assert (g16 - g32).norm() <= 0.1 * g32.norm()


def test_packed_rows_equal_each_sequence_alone():
    """A row packing three sequences (position_ids restart, no mask), with a prefix: regrouped
    one sequence per kernel row on the device; equals each sequence run alone."""
    model = tiny_model("llama").to(DEVICE)
    PrefixBank.attach(model).add("x", *torch.randn(2, 2, 2, 4, 8).to(DEVICE))
    lens = [5, 1, 7]
    ids = torch.randint(3, 100, (1, sum(lens)), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    pos = torch.cat([torch.arange(n) for n in lens])[None].to(DEVICE)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False, prefixes=["x"]).logits
        alone, o = [], 0
        for n in lens:
            alone.append(model(input_ids=ids[:, o:o + n], use_cache=False, prefixes=["x"]).logits)
            o += n
    torch.testing.assert_close(packed, torch.cat(alone, 1), rtol=1e-4, atol=1e-4)
