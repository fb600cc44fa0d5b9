"""Every bad input gets a ValueError/TypeError naming the argument and the shapes seen."""
import pytest
import torch

from prefix_attn import prefix_attention, prefix_attention_ref

B, Hq, Hkv, Sq, Skv, D, N, P = 2, 4, 2, 3, 5, 8, 3, 4


def good():
    return dict(
        q=torch.randn(B, Hq, Sq, D), k=torch.randn(B, Hkv, Skv, D), v=torch.randn(B, Hkv, Skv, D),
        prefix_k=torch.randn(N, Hkv, P, D), prefix_v=torch.randn(N, Hkv, P, D),
        prefix_ids=torch.tensor([0, 2]), prefix_lens=torch.tensor([4, 0, 2]),
        key_padding_mask=torch.ones(B, Skv, dtype=torch.bool))


def with_(**changes):
    def build():
        kw = good()
        for key, val in changes.items():
            kw[key] = val(kw) if callable(val) else val
        return kw
    return build


# (case, builder, exception, words that must appear in the message)
BAD = [
    ("q rank", with_(q=torch.randn(B, Hq, D)), ValueError, ["q", "4 dimensions", "[2, 4, 8]"]),
    ("k rank", with_(k=torch.randn(B, Skv, D)), ValueError, ["k", "[2, 5, 8]"]),
    ("q not tensor", with_(q=[[1.0]]), TypeError, ["q", "list"]),
    ("batch mismatch", with_(k=torch.randn(3, Hkv, Skv, D), v=torch.randn(3, Hkv, Skv, D)),
     ValueError, ["batch", "[3, 2, 5, 8]", "[2, 4, 3, 8]"]),
    ("head dim mismatch", with_(k=torch.randn(B, Hkv, Skv, 4), v=torch.randn(B, Hkv, Skv, 4)),
     ValueError, ["head dim", "[2, 2, 5, 4]"]),
    ("Hq not multiple", with_(k=torch.randn(B, 3, Skv, D), v=torch.randn(B, 3, Skv, D),
                              prefix_k=torch.randn(N, 3, P, D), prefix_v=torch.randn(N, 3, P, D)),
     ValueError, ["multiple", "4", "3"]),
    ("k v differ", with_(v=torch.randn(B, Hkv, Skv + 1, D)), ValueError, ["k and v", "[2, 2, 6, 8]"]),
    ("prefix k v differ", with_(prefix_v=torch.randn(N, Hkv, P + 1, D)), ValueError,
     ["prefix_k and prefix_v", "[3, 2, 5, 8]"]),
    ("prefix only k", with_(prefix_v=None), ValueError, ["prefix_k and prefix_v", "None"]),
    ("prefix heads", with_(prefix_k=torch.randn(N, 1, P, D), prefix_v=torch.randn(N, 1, P, D)),
     ValueError, ["prefix_k", "[3, 1, 4, 8]"]),
    ("prefix rank", with_(prefix_k=torch.randn(P, D), prefix_v=torch.randn(P, D)), ValueError,
     ["prefix_k", "[4, 8]"]),
    ("bank without ids", with_(prefix_ids=None), ValueError, ["prefix_ids", "N=3"]),
    ("ids out of range", with_(prefix_ids=torch.tensor([0, 3])), ValueError, ["prefix_ids", "[0, 3)", "3"]),
    ("ids negative", with_(prefix_ids=torch.tensor([-1, 0])), ValueError, ["prefix_ids", "-1"]),
    ("ids float", with_(prefix_ids=torch.tensor([0.0, 1.0])), TypeError, ["prefix_ids", "integer"]),
    ("ids bool", with_(prefix_ids=torch.tensor([True, False])), TypeError, ["prefix_ids", "integer"]),
    ("ids list", with_(prefix_ids=[0, 1]), TypeError, ["prefix_ids", "list"]),
    ("ids length", with_(prefix_ids=torch.tensor([0, 1, 2])), ValueError, ["prefix_ids", "[2]", "[3]"]),
    ("lens beyond P", with_(prefix_lens=torch.tensor([4, 5, 0])), ValueError, ["prefix_lens", "P=4", "5"]),
    ("lens negative", with_(prefix_lens=torch.tensor([4, -1, 0])), ValueError, ["prefix_lens", "-1"]),
    ("lens length", with_(prefix_lens=torch.tensor([4, 4])), ValueError, ["prefix_lens", "[3]", "[2]"]),
    ("mixed dtype", with_(k=lambda kw: kw["k"].double()), TypeError, ["k", "float64", "float32"]),
    ("prefix dtype", with_(prefix_k=lambda kw: kw["prefix_k"].half(), prefix_v=lambda kw: kw["prefix_v"].half()),
     TypeError, ["prefix_k", "float16"]),
    ("int dtype", with_(q=torch.ones(B, Hq, Sq, D, dtype=torch.int32)), TypeError, ["q", "int32"]),
    ("mixed device", with_(k=lambda kw: kw["k"].to("meta")), ValueError, ["k", "meta", "cpu"]),
    ("mask shape", with_(key_padding_mask=torch.ones(B, Skv + 1, dtype=torch.bool)), ValueError,
     ["key_padding_mask", "[2, 5]", "[2, 6]"]),
    ("mask dtype", with_(key_padding_mask=torch.ones(B, Skv)), TypeError, ["key_padding_mask", "bool"]),
    ("window zero", with_(window=0), ValueError, ["window", "0"]),
    ("window negative", with_(window=-2), ValueError, ["window", "-2"]),
    ("window float", with_(window=2.5), TypeError, ["window"]),
    ("softcap zero", with_(softcap=0.0), ValueError, ["softcap", "0"]),
    ("softcap negative", with_(softcap=-1.0), ValueError, ["softcap"]),
    ("head dim too big", with_(q=torch.randn(1, 1, 1, 300), k=torch.randn(1, 1, 1, 300),
                               v=torch.randn(1, 1, 1, 300), prefix_k=None, prefix_v=None,
                               prefix_ids=None, prefix_lens=None, key_padding_mask=None),
     ValueError, ["head dim", "300"]),
    ("unknown backend", with_(backend="fast"), ValueError, ["backend", "fast"]),
    ("causal not bool", with_(causal=1), TypeError, ["causal"]),
    ("window beyond int64", with_(window=2 ** 63), ValueError, ["window", "2**62"]),
    ("scale infinite", with_(scale=float("inf")), TypeError, ["scale", "inf"]),
    ("scale tensor", with_(scale=torch.tensor(0.5)), TypeError, ["scale"]),
    # from a kernel audit: a crash in two backends, values the kernels' float32 mangled (a
    # softcap rounding to 0 read as "no softcap", scale / softcap infinite: NaN gradients),
    # layouts failing deep inside with unrelated messages
    ("no query heads", with_(q=torch.randn(B, 0, Sq, D)), ValueError, ["q", "at least one head", "[2, 0, 3, 8]"]),
    ("softcap below float32", with_(softcap=1e-300), ValueError, ["softcap", "1e-300"]),
    ("softcap subnormal", with_(softcap=1e-40), ValueError, ["softcap", "float32"]),
    # rounds to 0 in float32 while scale / softcap stays finite (a tiny scale)
    ("softcap rounds to 0", with_(softcap=1e-46, scale=1e-9), ValueError, ["softcap", "normal float32"]),
    ("softcap beyond float32", with_(softcap=1e39), ValueError, ["softcap"]),
    ("scale beyond float32", with_(scale=1e39), ValueError, ["scale", "float32"]),
    ("scale / softcap overflows", with_(scale=1e30, softcap=1e-20), ValueError, ["scale / softcap"]),
    ("sparse q", with_(q=lambda kw: kw["q"].to_sparse()), TypeError, ["q", "dense", "sparse_coo"]),
    ("nested q", with_(q=lambda kw: torch.nested.nested_tensor([torch.randn(Hq, Sq, D)] * B,
                                                               layout=torch.jagged)),
     TypeError, ["q", "nested"]),
    ("sparse mask", with_(key_padding_mask=lambda kw: kw["key_padding_mask"].to_sparse()), TypeError,
     ["key_padding_mask", "dense"]),
    ("sparse prefix", with_(prefix_k=lambda kw: kw["prefix_k"].to_sparse()), TypeError, ["prefix_k", "dense"]),
    ("sparse ids", with_(prefix_ids=lambda kw: kw["prefix_ids"].to_sparse()), TypeError, ["prefix_ids", "dense"]),
]


# The reference ignores `backend`, so that case is checked on the API only.
PAIRS = [pytest.param(fn, *c, id=f"{tag}-{c[0]}")
         for tag, fn in (("api", prefix_attention), ("ref", prefix_attention_ref))
         for c in BAD if not (tag == "ref" and c[0] == "unknown backend")]


@pytest.mark.parametrize("fn,case,build,exc,words", PAIRS)
def test_bad_input_is_rejected_clearly(fn, case, build, exc, words):
    kw = build()
    args = [kw.pop(n) for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    with pytest.raises(exc) as info:
        fn(*args, **kw)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in message: {msg}"


def test_good_input_passes():
    kw = good()
    args = [kw.pop(n) for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    assert prefix_attention(*args, **kw).shape == (B, Hq, Sq, D)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_edges_of_valid_input_pass(backend):
    """The largest head dim (256), and an empty batch with prefix ids given (empty too)."""
    from prefix_attn.backends import available_backends

    if backend not in available_backends():
        pytest.skip(f"no {backend} backend")
    q = torch.randn(1, 1, 2, 256)
    assert prefix_attention(q, q, q, backend=backend).shape == (1, 1, 2, 256)
    q = torch.randn(0, 2, 3, 8)
    out = prefix_attention(q, q, q, torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8),
                           prefix_ids=torch.zeros(0, dtype=torch.long), backend=backend)
    assert out.shape == (0, 2, 3, 8)


def test_ids_changed_in_place_are_checked_again():
    # prefix_ids' range is read once per tensor version (one host read per forward, not per
    # layer); an in-place change must be seen.
    kw = good()
    args = [kw.pop(n) for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    prefix_attention(*args, **kw)
    prefix_attention(*args, **kw)
    kw["prefix_ids"][1] = 7
    with pytest.raises(ValueError, match=r"prefix_ids must lie in \[0, 3\)"):
        prefix_attention(*args, **kw)
    kw["prefix_lens"][0] = 9
    kw["prefix_ids"][1] = 0
    with pytest.raises(ValueError, match="prefix_lens"):
        prefix_attention(*args, **kw)


@pytest.mark.parametrize("name", ["prefix_ids", "prefix_lens"])
def test_known_range_is_read_again_after_an_in_place_change(name):
    """A tensor stamped by known_range (a bank selection's ids / lens) and then changed in
    place is read again by normalize itself (not only by a backend's own checks)."""
    from prefix_attn.validation import known_range, normalize

    kw = good()
    t = kw[name]
    known_range(t, int(t.min()), int(t.max()))
    args = [kw.pop(n) for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    normalize(*args, **kw)
    t[1] = 9
    with pytest.raises(ValueError, match=name):
        normalize(*args, **kw)


def test_prefix_lens_or_ids_without_a_prefix_are_refused_even_when_zero():
    """prefix_ids alone was checked against a bank of one empty entry the caller never gave
    ("must lie in [0, 1) for a bank of N=1 (prefix_k [1, 2, 0, 8])"), and zeros passed."""
    kw = good()
    q, k, v = kw["q"], kw["k"], kw["v"]
    with pytest.raises(ValueError, match="prefix_lens given without prefix_k"):
        prefix_attention(q, k, v, prefix_lens=torch.tensor([0]))
    with pytest.raises(ValueError, match="prefix_ids given without prefix_k"):
        prefix_attention(q, k, v, prefix_ids=torch.zeros(q.shape[0], dtype=torch.long))


@pytest.mark.parametrize("name,value,words", [
    ("PREFIX_ATTN_BACKEND", "bogus", ["PREFIX_ATTN_BACKEND='bogus'", "triton, cuda, cpu, torch"]),
    ("PREFIX_ATTN_TRITON_CASCADE", "yes", ["PREFIX_ATTN_TRITON_CASCADE='yes'", "auto, 0, 1"]),
    ("PREFIX_ATTN_CPU_PATH", "fast", ["PREFIX_ATTN_CPU_PATH='fast'", "cascade, rows"]),
    ("PREFIX_ATTN_CPU_BWD", "x", ["PREFIX_ATTN_CPU_BWD='x'", "fused, split"]),
    ("PREFIX_ATTN_CPU_TILES", "64,64", ["PREFIX_ATTN_CPU_TILES='64,64'", "multiples of 8"]),
])
def test_environment_switches_with_unknown_values_are_errors_naming_them(monkeypatch, name, value,
                                                                        words):
    """A mistyped switch used to be ignored silently (the default path ran). Each is checked
    where it is read (the cpu backend's in C++, PREFIX_ATTN_CPU_BWD in the backward; the
    triton one in its forward, see test_triton.py), and all of them by the commands."""
    from prefix_attn.backends import check_env_backend

    kw = good()
    args = [kw.pop(n).requires_grad_() for n in ("q", "k", "v", "prefix_k", "prefix_v")]

    def call():
        if name == "PREFIX_ATTN_TRITON_CASCADE":
            check_env_backend("cpu")
        else:
            prefix_attention(*args, **kw).sum().backward()

    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as info:
        call()
    for w in words:
        assert w.replace("'", "") in str(info.value).replace("'", "")
    with pytest.raises(ValueError, match=name):
        check_env_backend("cpu")  # what the commands run before any work
    monkeypatch.setenv(name, "")  # empty: unset
    call()


def test_index_tensors_mapped_by_vmap_are_refused_clearly():
    """torch.vmap over prefix_ids failed with "vmap: ... calling .item()" from the host range
    check; mapping over the float inputs works (PyTorch's per-sample fallback)."""
    kw = good()
    args = [kw.pop(n) for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    ids = torch.stack([kw.pop("prefix_ids"), torch.tensor([1, 1])])
    with pytest.raises(TypeError, match="prefix_ids cannot be mapped over by torch.vmap"):
        torch.vmap(lambda i: prefix_attention(*args, prefix_ids=i, **kw))(ids)
    qs = torch.stack([args[0], args[0] * 2])
    out = torch.vmap(lambda q: prefix_attention(q, *args[1:], prefix_ids=ids[0], **kw))(qs)
    torch.testing.assert_close(out[1], prefix_attention(qs[1], *args[1:], prefix_ids=ids[0], **kw))


def test_meta_tensors_reach_the_backend_choice():
    """All inputs on meta: the host range check of prefix_ids failed with "Tensor.item() cannot
    be called on meta tensors"; the call now reaches the backend choice, and the torch backend
    (DESIGN.md: "anywhere") gives the shapes."""
    kw = {k: v.to("meta") for k, v in good().items()}
    args = [kw.pop(n) for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    out = prefix_attention(*args, **kw)
    assert out.device.type == "meta" and out.shape == args[0].shape


def test_functionalize_reads_index_tensors():
    """torch.func.functionalize wraps tensors too: the vmap refusal took them for mapped ones
    (a review of that change; it ran and matched eager before)."""
    kw = good()
    args = [kw.pop(n) for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    ids, lens = kw.pop("prefix_ids"), kw.pop("prefix_lens")

    def f(ids, lens):
        return prefix_attention(*args, prefix_ids=ids, prefix_lens=lens, **kw)

    torch.testing.assert_close(torch.func.functionalize(f)(ids, lens), f(ids, lens))
