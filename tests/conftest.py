"""Shared fixtures: random inputs for the contract, the flash-attention error rule, and the
Triton interpreter switch (set before anything imports triton)."""
import os

import torch

if not torch.cuda.is_available():
    # Triton kernels then run on CPU tensors through the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("PREFIX_ATTN_TRITON_ONE_CONFIG", "1")

import pytest  # noqa: E402



def make_inputs(B=2, Hq=4, Hkv=2, Sq=5, Skv=9, D=16, N=1, P=7, *, lens=None, ids=None,
                pad=None, dtype=torch.float32, device="cpu", requires_grad=False, seed=0,
                bank_3d=False):
    """Random inputs of the contract.

    lens: list of N prefix lengths (None = all P); ids: list of B entry ids (None = zeros when
    N == 1, else random); pad: None | "left" | "right" -> key_padding_mask with a few padded
    own keys per row (row b gets b+1 pads, capped). Returns (args tuple, kwargs dict).
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        t = torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype=dtype, device=device)
        return t.requires_grad_(requires_grad)

    q = rnd(B, Hq, Sq, D)
    k = rnd(B, Hkv, Skv, D)
    v = rnd(B, Hkv, Skv, D)
    kw = {}
    if P is None:
        pk = pv = None
    else:
        pk = rnd(N, Hkv, P, D) if not bank_3d else rnd(Hkv, P, D)
        pv = rnd(N, Hkv, P, D) if not bank_3d else rnd(Hkv, P, D)
        if lens is not None:
            kw["prefix_lens"] = torch.tensor(lens, dtype=torch.long, device=device)
        if ids is not None:
            kw["prefix_ids"] = torch.tensor(ids, dtype=torch.long, device=device)
        elif N > 1:
            kw["prefix_ids"] = torch.randint(0, N, (B,), generator=g).to(device)
    if pad is not None:
        m = torch.ones(B, Skv, dtype=torch.bool)
        for b in range(B):
            n = min(b + 1, max(Skv - 1, 0))
            if pad == "left":
                m[b, :n] = False
            else:
                m[b, Skv - n:] = False
        kw["key_padding_mask"] = m.to(device)
    return (q, k, v, pk, pv), kw


def peft_comparable(family: str) -> dict:
    """tiny_model overrides for comparisons with PEFT: PEFT puts the prefix in the KV cache,
    where a sliding window also hides it, while our prefixes are never windowed (DESIGN.md);
    so the windowed families get a window longer than prefix + tokens."""
    return {"sliding_window": 64} if family in ("mistral", "gemma2", "gemma3_text") else {}


def more_families(*extra):
    """pytest params of `tiny.MORE_CAUSAL_FAMILIES` (each with `extra` values after the family),
    marked `more_families`: bench/gpu.sh deselects them (make test and make test-compat run
    them; on the GPU machine they would only repeat those CPU checks in its device time)."""
    from prefix_attn.tiny import MORE_CAUSAL_FAMILIES

    return [pytest.param(f, *extra, marks=pytest.mark.more_families) for f in MORE_CAUSAL_FAMILIES]


def require_attention_interface(family: str) -> None:
    """Skip when the installed transformers' code for `family` does not dispatch attention
    through `ALL_ATTENTION_FUNCTIONS` (GPT-J and CodeGen before 5.2x): no attention
    implementation can be plugged into such a model (it raises, never ignores prefixes)."""
    import transformers
    from prefix_attn.hf import uses_attention_interface
    from prefix_attn.tiny import tiny_config

    cfg = tiny_config(family)
    auto = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
    cls = auto._model_mapping[type(cfg)]
    if not uses_attention_interface(cls):
        pytest.skip(f"{cls.__name__} has no attention interface in transformers "
                    f"{transformers.__version__}")


def count_attention_calls(monkeypatch) -> list:
    """The device type of every call of ``prefix_attn.api.prefix_attention`` from now on, appended
    to the list returned (the GPU tests check that every call reached the device)."""
    import prefix_attn.api

    calls = []
    real = prefix_attn.api.prefix_attention

    def counted(q, *a, **kw):
        calls.append(q.device.type)
        return real(q, *a, **kw)

    monkeypatch.setattr(prefix_attn.api, "prefix_attention", counted)
    return calls


def prefix_step(model, module, ids, mask, labels):
    """One training forward + backward of `model` with the prefix "default" on every row:
    (loss, the gradients of the prefix module's parameters), grads cleared first."""
    for p in module.parameters():
        p.grad = None
    loss = model(ids, attention_mask=mask, labels=labels, prefixes=["default"] * len(ids)).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in module.parameters()]


# how a model folder is broken -> a word of the reason a command must give
BROKEN_MODEL_FOLDERS = {"no weights": "no file named model.safetensors",
                        "truncated weights": "SafetensorError",
                        "no model_type": "model_type",
                        # a review found these still ending in tracebacks
                        "heads not dividing the width": "cannot load a model from",
                        "unknown activation": "KeyError"}


def broken_model_folder(folder, how: str) -> str:
    """The built-in tiny model saved with its byte tokenizer in ``folder``, then broken ``how``
    (a key of BROKEN_MODEL_FOLDERS): its weights file removed or cut to 300 bytes, or its
    config.json without ``model_type``, with heads that do not divide the width, or with an
    unknown activation."""
    import json

    from prefix_attn import tiny

    tiny.default_model(hidden=32, layers=1).save_pretrained(str(folder))
    tiny.ByteTokenizer().save_pretrained(str(folder))
    weights, config = folder / "model.safetensors", folder / "config.json"
    if how == "no weights":
        weights.unlink()
    elif how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:300])
    else:
        fields = json.loads(config.read_text())
        if how == "no model_type":
            del fields["model_type"]
        elif how == "heads not dividing the width":
            fields.update(num_attention_heads=5, num_key_value_heads=5)
        else:
            fields["hidden_act"] = "no_such_activation"
        config.write_text(json.dumps(fields))
    return str(folder)


def errors(x, y):
    return (x.double() - y.double()).abs().max().item() if x.numel() else 0.0


def assert_close_fa(out, truth, baseline, atol=1e-5, name="out"):
    """The flash-attention rule: |out - truth| <= 2 * |baseline - truth| + atol."""
    err, base = errors(out, truth), errors(baseline, truth)
    assert err <= 2 * base + atol, f"{name}: error {err:.3g} > 2 x baseline {base:.3g} + {atol:g}"


@pytest.fixture
def inputs():
    return make_inputs


# The contract cases of the cpu, cuda and torch backends (forward, LSE and the five gradients);
# the triton tests keep a smaller list of their own (tests/test_triton.py CASES).
CONTRACT_SHAPES = {
    "P0": dict(P=0),
    "P1_Sq1": dict(P=1, Sq=1, Skv=13),
    "P17_gqa3": dict(P=17, Sq=7, Skv=23, D=24, Hq=6, Hkv=2),
    "mqa_leftpad": dict(Hq=4, Hkv=1, Sq=9, Skv=9, pad="left", B=3),
    "bank_rightpad": dict(B=5, N=3, P=9, lens=[9, 1, 4], ids=[2, 0, 2, 1, 0], pad="right"),
    "mha_noprefix": dict(Hq=3, Hkv=3, P=None),
    # Sq > Skv, row 0 without a prefix: its first queries see no key (out 0, lse -inf)
    "empty_rows": dict(B=2, N=2, P=4, lens=[0, 4], ids=[0, 1], Sq=9, Skv=4),
}
CONTRACT_EXTRA = {"plain": {}, "window": dict(window=4), "softcap": dict(softcap=2.0),
                  "noncausal": dict(causal=False)}
# One unit in the last place at magnitude 1 for the half types, scaled by the gradient's
# largest magnitude (check_contract): on tiny shapes the same-dtype baseline is sometimes exact
# by luck, while a kernel rounds its output before Delta, or meets a rounding tie from the
# other side (tests/test_random_cases.py found dV = the sum of 4 fp16 values at 4.85, exactly
# halfway between two fp16 numbers: one ulp there is 0.0039).
GRAD_ATOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def check_contract(backend, shape_kw, extra_kw, dtype, device="cpu"):
    """`backend` against the reference on one case: out and lse, then dq, dk, dv, dprefix_k,
    dprefix_v for a seeded output gradient, by the flash-attention rule."""
    from prefix_attn import prefix_attention, prefix_attention_ref
    args, kw = make_inputs(dtype=dtype, device=device, requires_grad=True, **shape_kw)
    kw.update(extra_kw)
    tensors = [t for t in args if t is not None]
    out, lse = prefix_attention(*args, **kw, backend=backend, return_lse=True)
    truth, tlse = prefix_attention_ref(*args, **kw, return_lse=True)
    base, blse = prefix_attention_ref(*args, **kw, upcast=False, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32 and not out.isnan().any()
    assert_close_fa(out, truth, base)
    finite = torch.isfinite(tlse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert (lse[~finite] == float("-inf")).all()
    # the LSE by the same rule: at most 2x the error of the LSE computed in the input dtype
    assert_close_fa(lse[finite], tlse[finite], blse[finite],
                    atol=1e-5 if dtype == torch.float32 else 1e-4, name="lse")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    grads = lambda o: torch.autograd.grad(o, tensors, g, allow_unused=True)
    for name, a, t, b in zip("q k v pk pv".split(), grads(out), grads(truth), grads(base)):
        assert a.shape == t.shape and a.dtype == t.dtype
        scale = max(1.0, t.abs().max().item()) if t.numel() else 1.0
        assert_close_fa(a, t, b, atol=GRAD_ATOL[dtype] * scale, name=f"d{name}")


def check_deterministic_backward(backend, device="cpu"):
    """Two backward runs give bitwise-equal gradients (no float atomics), on a bank shared by
    several rows, tiles crossed, left padding."""
    from prefix_attn import prefix_attention
    args, kw = make_inputs(B=6, Hq=4, Hkv=2, Sq=40, Skv=70, N=2, P=70, lens=[70, 3],
                           ids=[0, 1, 0, 0, 1, 0], pad="left", device=device, requires_grad=True)
    runs = []
    for _ in range(2):
        out = prefix_attention(*args, **kw, backend=backend)
        runs.append(torch.autograd.grad(out.square().sum(), args))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def check_unused_entries_zero_grad(backend, device="cpu"):
    """Entries nobody selected and positions beyond prefix_lens get exact zeros."""
    from prefix_attn import prefix_attention
    args, kw = make_inputs(B=3, N=3, P=6, lens=[6, 2, 4], ids=[1, 1, 0], device=device,
                           requires_grad=True)
    out = prefix_attention(*args, **kw, backend=backend)
    for d in torch.autograd.grad(out.sum(), args[3:]):
        assert (d[2] == 0).all() and (d[1, :, 2:] == 0).all()
        assert (d[1, :, :2] != 0).any() and (d[0] != 0).any()


def run_compiler_script(script: str, cache_dir, skip_if: dict = None, timeout: int = 600) -> dict:
    """Runs `script` in a subprocess without TRITON_INTERPRET (real Triton compilation, here for
    an explicit sm_90 target: no GPU needed), with a private Triton cache, and returns the JSON
    it prints on a line starting with "RESULT ". Without that line the test is skipped when
    the stderr contains every string of one of the `skip_if` keys (value: the reason), and
    fails otherwise."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if lines:
        return json.loads(lines[-1][len("RESULT "):])
    for needles, reason in (skip_if or {}).items():
        if all(n in proc.stderr for n in needles):
            pytest.skip(reason)
    pytest.fail(f"subprocess failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
