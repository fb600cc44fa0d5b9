"""The public names, arguments and defaults that docs/DESIGN.md fixes, read from DESIGN.md
itself (so the contract and the code cannot drift apart unnoticed), and contract statements
no other test pins down on their own."""
import inspect
import os
import re

import pytest
import torch

import prefix_attn
from conftest import check_contract

DESIGN = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "DESIGN.md")


def _design() -> str:
    with open(DESIGN) as f:
        return f.read()


def _documented_signature(qualname: str) -> inspect.Signature:
    """The signature DESIGN.md writes for ``prefix_attn.<qualname>(...)`` in a python block."""
    text = _design()
    m = re.search(re.escape(f"prefix_attn.{qualname}(") + r"(.*?)\)\s*(->|#|\n)", text, re.S)
    assert m is not None, f"DESIGN.md has no call of prefix_attn.{qualname}"
    params = re.sub(r"#[^\n]*", "", m.group(1))
    namespace = {}
    exec(f"def f({params}):\n    pass", namespace)
    return inspect.signature(namespace["f"])


def _without_annotations(sig: inspect.Signature) -> inspect.Signature:
    return sig.replace(parameters=[p.replace(annotation=inspect.Parameter.empty)
                                   for p in sig.parameters.values()],
                       return_annotation=inspect.Signature.empty)


def test_prefix_attention_signature_is_the_documented_one():
    assert inspect.signature(prefix_attn.prefix_attention) == _documented_signature("prefix_attention")


def test_reference_has_the_same_signature_plus_upcast():
    """DESIGN.md: prefix_attention_ref "has the same signature"; README: "(+ upcast=True)"."""
    ref = inspect.signature(prefix_attn.prefix_attention_ref)
    params = list(ref.parameters.values())
    assert params[-1].name == "upcast" and params[-1].default is True \
        and params[-1].kind is inspect.Parameter.KEYWORD_ONLY
    assert ref.replace(parameters=params[:-1]) == _documented_signature("prefix_attention")


def test_prefix_tuning_signature_is_the_documented_one():
    assert _without_annotations(inspect.signature(prefix_attn.prefix_tuning)) \
        == _documented_signature("prefix_tuning")


def test_bank_api_names():
    bank = prefix_attn.PrefixBank
    for name in ("attach", "add", "load_peft", "save_peft", "add_prompt", "remove", "names"):
        assert callable(getattr(bank, name)), name
    assert isinstance(inspect.getattr_static(bank, "nbytes"), property)
    for name in ("prefix_attention", "prefix_attention_ref", "available_backends", "PrefixBank",
                 "prefix_tuning"):
        assert name in prefix_attn.__all__


@pytest.mark.hf
def test_prefix_tuning_defaults():
    """prefix_tuning(model): one trainable prefix "default" of 20 virtual tokens, base frozen."""
    from prefix_attn.tiny import tiny_model

    model = tiny_model("llama")
    prefix_attn.prefix_tuning(model)
    bank = model.prefix_bank
    assert bank.names() == ["default"] and bank.entry_len("default") == 20
    assert bank.is_trainable("default")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("prefix_bank.") for n in trainable)


# window without causal: "own key j visible only if (Skv - Sq + i) - j < window" alone (keys
# after the diagonal stay visible), prefix never windowed; Sq > Skv too (negative diagonals).
_WINDOW_CASES = {
    "noncausal": (dict(B=3, N=2, P=5, lens=[5, 2], ids=[1, 0, 1], Sq=6, Skv=11, pad="left"),
                  dict(window=2, causal=False)),
    "noncausal_Sq_gt_Skv": (dict(B=2, N=2, P=3, lens=[0, 3], ids=[0, 1], Sq=9, Skv=4),
                            dict(window=3, causal=False)),
}


@pytest.mark.parametrize("backend", [
    "torch", "cpu", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("case", list(_WINDOW_CASES))
def test_window_without_causal(backend, case):
    if backend not in prefix_attn.available_backends():
        pytest.skip(f"{backend} backend not available")
    if backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") \
            and not torch.cuda.is_available():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    shape, extra = _WINDOW_CASES[case]
    check_contract(backend, shape, extra, torch.float32, device=device)


def test_bench_holds_pytest_benchmark_microbenchmarks():
    """DESIGN.md's layout: `bench/` holds pytest-benchmark microbenchmarks (and the scripts that
    write bench/results/). Each runs once here (--benchmark-disable)."""
    pytest.importorskip("pytest_benchmark")
    import glob
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(__file__), os.pardir)
    files = [f for f in glob.glob(os.path.join(root, "bench", "test_*.py"))
             if re.search(r"def test_\w+\(benchmark\b", open(f).read())]
    assert files, "no pytest-benchmark module (a test taking the `benchmark` fixture) in bench/"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "--benchmark-disable", *files], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


@pytest.mark.parametrize("backend", ["torch", None])
def test_torch_backend_runs_anywhere(backend):
    """DESIGN.md's backend table: `torch` runs "anywhere" (a PyTorch composite), so on a device
    type no compiled backend takes (here `meta`, shapes only), it is also what backend=None
    picks. It accepted cpu and cuda tensors only: "no backend accepts meta tensors"."""
    q = torch.randn(2, 4, 3, 8, device="meta", requires_grad=True)
    k = torch.randn(2, 2, 5, 8, device="meta", requires_grad=True)
    pk = torch.randn(3, 2, 4, 8, device="meta", requires_grad=True)
    ids = torch.tensor([2, 0], device="meta")
    out, lse = prefix_attn.prefix_attention(q, k, k, pk, pk, prefix_ids=ids, return_lse=True,
                                            backend=backend)
    assert out.shape == (2, 4, 3, 8) and out.device.type == "meta" and out.dtype == q.dtype
    assert lse.shape == (2, 4, 3) and lse.dtype == torch.float32
    dq, dpk = torch.autograd.grad(out.sum(), (q, pk))
    assert dq.shape == q.shape and dpk.shape == pk.shape
