"""pytest-benchmark microbenchmarks of one attention call (docs/DESIGN.md's layout: `bench/`
holds pytest-benchmark microbenchmarks and the scripts of `bench/run_all.py`).

    python -m pytest bench/test_micro.py                      # time (`make bench-micro`)
    python -m pytest bench/test_micro.py --benchmark-disable  # run each once (a smoke test)

Each backend usable on this machine's tensors (CUDA tensors when there is a GPU, else CPU;
the Triton interpreter is never timed) against the HF + PEFT path of
`prefix_attn.baselines` (the prefix copied per row and concatenated, then SDPA), forward and
forward + backward, on a prefill and a decode shape. The tables of the README come from the
scripts of `bench/run_all.py`, not from these.
"""
import pytest
import torch

import prefix_attn
from prefix_attn.baselines import peft_path_forward, peft_path_layer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32

# B, Hq, Hkv, Sq, Skv, N, P, D
SHAPES = {
    "prefill": (4, 8, 2, 128, 128, 2, 32, 64),
    "decode": (16, 8, 2, 1, 512, 4, 64, 64),
}


def _backends():
    from prefix_attn.backends import get_backend

    return [name for name in prefix_attn.available_backends()
            if DEVICE in get_backend(name).devices and not (name == "triton" and DEVICE == "cpu")]


def _inputs(shape, requires_grad=False):
    B, Hq, Hkv, Sq, Skv, N, P, D = SHAPES[shape]
    g = torch.Generator().manual_seed(0)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(DEVICE, DTYPE).requires_grad_(requires_grad)

    args = (rnd(B, Hq, Sq, D), rnd(B, Hkv, Skv, D), rnd(B, Hkv, Skv, D),
            rnd(N, Hkv, P, D), rnd(N, Hkv, P, D))
    ids = (torch.arange(B) % N).to(DEVICE)
    return args, ids


def _timed(benchmark, fn):
    def call():
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    return benchmark(call)


def _run(impl, args, ids):
    if impl == "peft_path":
        fwd = peft_path_forward(*args, prefix_ids=ids)  # once per forward, for all layers
        return lambda: peft_path_layer(*args, fwd)
    return lambda: prefix_attn.prefix_attention(*args, prefix_ids=ids, backend=impl)


IMPLS = _backends() + ["peft_path"]


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", IMPLS)
def test_forward(benchmark, impl, shape):
    args, ids = _inputs(shape)
    benchmark.group = f"forward {shape}"
    with torch.no_grad():
        out = _timed(benchmark, _run(impl, args, ids))
    assert out.shape == args[0].shape


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_backward(benchmark, impl):
    args, ids = _inputs("prefill", requires_grad=True)
    benchmark.group = "forward + backward prefill"
    run = _run(impl, args, ids)

    def step():
        grads = torch.autograd.grad(run().square().sum(), args)
        return grads[3]

    dpk = _timed(benchmark, step)
    assert dpk.shape == args[3].shape
