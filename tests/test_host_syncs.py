"""Device-to-host reads (a sync each on a GPU: the launch queue stalls, CUDA graphs break) made
by prefix_attn's own code during a forward, counted on CPU by wrapping the tensor methods that
read values back. None may happen once per layer: a model of 4 layers makes as many as one of
2 (they were 4 per layer under torch.inference_mode: the range check of prefix_ids and
prefix_lens; 5 per layer in packed training)."""
import os
import sys

import pytest
import torch

import prefix_attn
from prefix_attn.bank import PrefixBank
from prefix_attn.tiny import tiny_model

pytestmark = pytest.mark.hf

_PKG = os.path.dirname(prefix_attn.__file__) + os.sep
_TORCH = os.path.dirname(torch.__file__) + os.sep
_READS = ["__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero", "cpu", "numpy"]


@pytest.fixture
def count_reads(monkeypatch):
    """Counts the value reads whose nearest caller outside torch is prefix_attn's code."""
    sites = []

    def wrap(orig):
        def read(*args, **kwargs):
            f = sys._getframe(1)
            while f is not None and f.f_code.co_filename.startswith(_TORCH):
                f = f.f_back
            if f is not None and f.f_code.co_filename.startswith(_PKG):
                sites.append(f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno}")
            return orig(*args, **kwargs)
        return read

    for name in _READS:
        monkeypatch.setattr(torch.Tensor, name, wrap(getattr(torch.Tensor, name)))
    for name in ("nonzero", "unique_consecutive"):
        monkeypatch.setattr(torch, name, wrap(getattr(torch, name)))
    return sites


def _served(layers, device="cpu"):
    model = tiny_model("llama", num_hidden_layers=layers, vocab_size=64).eval().to(device)
    bank = PrefixBank.attach(model)
    g = torch.Generator().manual_seed(0)
    for i, name in enumerate(["a", "b"]):
        bank.add(name, *torch.randn(2, layers, bank.num_kv_heads, 3 + i, bank.head_dim, generator=g))
    return model


def _decode_reads(layers, count_reads, inference, positions=False):
    model = _served(layers)
    ids = torch.randint(3, 64, (4, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    rows = ["a", "b", None, "a"]
    with (torch.inference_mode() if inference else torch.no_grad()):
        out = model(ids, attention_mask=mask, prefixes=rows, use_cache=True)
        step = dict(attention_mask=torch.cat([mask, torch.ones(4, 1, dtype=mask.dtype)], 1),
                    prefixes=rows, use_cache=True)
        step[prefix_attn.hf.cache_kwarg(model)] = out.past_key_values
        if positions:  # as generate passes them at every step
            step["position_ids"] = torch.full((4, 1), ids.shape[1])
        model(ids[:, -1:], **step)  # warm: selections and id tensors cached
        del count_reads[:]
        model(ids[:, -1:], **step)
    return list(count_reads)


@pytest.mark.parametrize("inference", [False, True], ids=["no_grad", "inference_mode"])
def test_decode_step_reads_do_not_grow_with_layers(count_reads, inference):
    two = _decode_reads(2, count_reads, inference)
    four = _decode_reads(4, count_reads, inference)
    assert len(four) == len(two), (two, four)
    assert len(two) <= 2, two  # the padding-mask check (as sdpa's), no per-step id copy back


def test_decode_step_with_position_ids_reads_no_more(count_reads):
    """generate passes position_ids at every step: a row of one position is one sequence
    without reading it back (the contiguity check of longer rows is a host read)."""
    given = _decode_reads(2, count_reads, False, positions=True)
    assert len(given) == len(_decode_reads(2, count_reads, False)), given


def _packed_training_reads(layers, count_reads):
    torch.manual_seed(0)
    model = tiny_model("llama", num_hidden_layers=layers, vocab_size=64)
    prefix_attn.prefix_tuning(model, num_virtual_tokens=3, name="a")
    prefix_attn.prefix_tuning(model, num_virtual_tokens=4, name="b")
    ids = torch.randint(3, 64, (1, 9), generator=torch.Generator().manual_seed(2))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]])  # three packed sequences
    del count_reads[:]
    model(ids, position_ids=pos, labels=ids, prefixes=["a", "b", "a"]).loss.backward()
    return list(count_reads)


def test_packed_training_reads_do_not_grow_with_layers(count_reads):
    two = _packed_training_reads(2, count_reads)
    four = _packed_training_reads(4, count_reads)
    assert len(four) == len(two), (two, four)


def _cuda_sync_sites(layers):
    """Python frames of prefix_attn that CUDA's sync debug mode flags in one decode step."""
    import warnings

    model = _served(layers, "cuda")
    ids = torch.randint(3, 64, (4, 6), generator=torch.Generator().manual_seed(1)).cuda()
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    rows = ["a", "b", None, "a"]
    with torch.inference_mode():
        out = model(ids, attention_mask=mask, prefixes=rows, use_cache=True)
        step = dict(attention_mask=torch.cat([mask, torch.ones_like(mask[:, :1])], 1),
                    prefixes=rows, use_cache=True)
        step[prefix_attn.hf.cache_kwarg(model)] = out.past_key_values
        if positions:  # as generate passes them at every step
            step["position_ids"] = torch.full((4, 1), ids.shape[1])
        model(ids[:, -1:], **step)  # warm
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                model(ids[:, -1:], **step)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    return [f"{os.path.basename(w.filename)}:{w.lineno}" for w in seen
            if "synchroniz" in str(w.message) and w.filename.startswith(_PKG)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_decode_step_syncs_do_not_grow_with_layers():
    """The same on a GPU, as CUDA itself reports them (set_sync_debug_mode): host-to-device
    copies included, which the CPU count cannot see."""
    two, four = _cuda_sync_sites(2), _cuda_sync_sites(4)
    assert len(four) == len(two), (two, four)
