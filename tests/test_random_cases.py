"""Seeded random cases of the whole contract, beyond the fixed list in conftest: every
combination of GQA ratio, lengths (Sq > Skv included), bank entries and lengths, padding,
window, softcap and causality can come up. Forward, LSE and all five gradients against the
reference (the flash-attention rule), for the C++ and the torch backends; a few small ones
through the Triton interpreter. A failing case prints its arguments: add it to
CONTRACT_SHAPES."""
import os
import random

import pytest
import torch

from prefix_attn.backends import available_backends
from conftest import check_contract


def random_case(seed: int, small: bool = False):
    """(shape kwargs for make_inputs, extra kwargs) drawn from `seed`."""
    r = random.Random(seed)
    Hkv = r.choice([1, 1, 2, 3])
    Hq = Hkv * r.choice([1, 2, 3, 4])
    top = 12 if small else 40
    Sq = r.choice([1, 1, r.randint(2, top)])
    Skv = r.choice([Sq, r.randint(1, top), r.randint(Sq, Sq + top)])
    shape = dict(B=r.randint(1, 3 if small else 4), Hq=Hq, Hkv=Hkv, Sq=Sq, Skv=Skv,
                 D=r.choice([8, 16, 24] if small else [8, 16, 24, 40, 64]), seed=seed)
    if r.random() < 0.15:
        shape["P"] = None                                    # no prefix at all
    else:
        N, P = r.randint(1, 3), r.choice([0, 1, r.randint(2, top)])
        shape.update(N=N, P=P)
        if r.random() < 0.5:
            shape["lens"] = [r.randint(0, P) for _ in range(N)]
        if N > 1:
            shape["ids"] = [r.randrange(N) for _ in range(shape["B"])]
    if r.random() < 0.4:
        shape["pad"] = r.choice(["left", "right"])
    extra = {}
    if r.random() < 0.3:
        extra["window"] = r.randint(1, 8)
    if r.random() < 0.25:
        extra["softcap"] = r.choice([1.0, 3.0, 30.0])
    if r.random() < 0.25:
        extra["causal"] = False
    if r.random() < 0.2:
        extra["scale"] = r.choice([0.05, 0.3, 1.0])
    return shape, extra


def check_case(backend, shape, extra, dtype, device="cpu"):
    """check_contract, with the drawn case in the failure message."""
    try:
        check_contract(backend, shape, extra, dtype, device=device)
    except AssertionError as e:
        raise AssertionError(f"{backend} {dtype} shape={shape} extra={extra}: {e}") from None


# The Triton cases run on CPU tensors: only under the interpreter (conftest sets it without a GPU).
interpreter_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                      reason="Triton on CPU tensors needs TRITON_INTERPRET=1")

# (dtype, seeds): fp32 widely; the half types on fewer cases (slower on CPU). 400 fp32 and 200
# fp16/bf16 cases per backend passed when this was written.
DTYPE_SEEDS = [(torch.float32, range(150)), (torch.float16, range(40)),
               (torch.bfloat16, range(40, 80))]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("dtype,seed", [(d, s) for d, seeds in DTYPE_SEEDS for s in seeds],
                         ids=lambda x: str(x).replace("torch.", ""))
def test_random_case(backend, dtype, seed):
    if backend not in available_backends():
        pytest.skip(f"backend {backend} not available")
    shape, extra = random_case(seed)
    check_case(backend, shape, extra, dtype)


@pytest.mark.interpreter
@interpreter_only
@pytest.mark.parametrize("seed", range(6))
def test_random_case_triton_interpreter(seed):
    pytest.importorskip("triton")
    shape, extra = random_case(1000 + seed, small=True)
    check_case("triton", shape, extra, torch.float32)


# Both decode paths forced on the random cases with few queries (the automatic rule would
# take only one of them): the cascade (one GEMM per bank entry, split-KV, LSE merge) and the
# per-row tiles.
PATHS = {"cpu": ("PREFIX_ATTN_CPU_PATH", ["cascade", "rows"]),
         "triton": ("PREFIX_ATTN_TRITON_CASCADE", ["1", "0"])}


def _few_query_seeds(start, count, small=False):
    seeds, s = [], start
    while len(seeds) < count:
        if random_case(s, small)[0]["Sq"] <= 16:
            seeds.append(s)
        s += 1
    return seeds


@pytest.mark.parametrize("path", PATHS["cpu"][1])
@pytest.mark.parametrize("seed", _few_query_seeds(0, 40))
def test_random_case_cpu_paths(path, seed, monkeypatch):
    if "cpu" not in available_backends():
        pytest.skip("backend cpu not available")
    monkeypatch.setenv(PATHS["cpu"][0], path)
    shape, extra = random_case(seed)
    check_case("cpu", shape, extra, torch.float32)


@pytest.mark.interpreter
@interpreter_only
@pytest.mark.parametrize("path", PATHS["triton"][1])
@pytest.mark.parametrize("seed", _few_query_seeds(5000, 3, small=True))
def test_random_case_triton_paths(path, seed, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv(PATHS["triton"][0], path)
    shape, extra = random_case(seed, small=True)
    check_case("triton", shape, extra, torch.float32)


# On a GPU (bench/gpu.sh, tests_rest): the CUDA extension's kernels on the same random cases.
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or "cuda" not in available_backends(),
                    reason="needs a CUDA GPU and the extension's CUDA part")
@pytest.mark.parametrize("dtype,seed", [(torch.float32, s) for s in range(60)]
                         + [(torch.bfloat16, s) for s in range(60, 90)],
                         ids=lambda x: str(x).replace("torch.", ""))
def test_random_case_cuda(dtype, seed):
    shape, extra = random_case(seed)
    check_case("cuda", shape, extra, dtype, device="cuda")


# Both backward paths of the C++ kernel forced (fused: dq with the own dk/dv per row; split:
# separate passes), fp32 and bf16, with tile sizes drawn from 8..32 (PREFIX_ATTN_CPU_TILES) so
# that the small random cases cross query and key tiles of both passes.
@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("dtype,seed", [(torch.float32, s) for s in range(200, 240)]
                         + [(torch.bfloat16, s) for s in range(240, 260)],
                         ids=lambda x: str(x).replace("torch.", ""))
def test_random_case_cpu_backward_paths(path, dtype, seed, monkeypatch):
    if "cpu" not in available_backends():
        pytest.skip("backend cpu not available")
    monkeypatch.setenv("PREFIX_ATTN_CPU_BWD", path)
    r = random.Random(seed)
    monkeypatch.setenv("PREFIX_ATTN_CPU_TILES", ",".join(str(8 * r.randint(1, 4)) for _ in range(4)))
    shape, extra = random_case(seed)
    check_case("cpu", shape, extra, dtype)
