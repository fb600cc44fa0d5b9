"""PrefixBank as a store: entries, selections, concurrency, moves, save/load, prompt prefixes."""
import copy
import re
import threading

import pytest
import torch
from torch import nn

from prefix_attn.bank import PrefixBank
from prefix_attn.reference import prefix_attention_ref

L, HKV, D = 3, 2, 8


def _kv(P, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(L, HKV, P, D, generator=g, dtype=dtype),
            torch.randn(L, HKV, P, D, generator=g, dtype=dtype))


def _bank(**entries):
    bank = PrefixBank(L, HKV, D)
    for i, (name, P) in enumerate(entries.items()):
        bank.add(name, *_kv(P, seed=i))
    return bank


class LearnedPrefix(nn.Module):
    """A trainable entry: forward() -> [L, 2, Hkv, P, D]."""

    def __init__(self, P, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.kv = nn.Parameter(torch.randn(L, 2, HKV, P, D, generator=g))

    def forward(self):
        return self.kv * 1.0


def test_add_get_copy_and_shapes():
    k, v = _kv(5)
    bank = PrefixBank(L, HKV, D, dtype=torch.float16)
    bank.add("a", k, v)
    k.add_(1.0)  # the bank owns a copy
    gk, gv = bank.get("a")
    assert gk.dtype == torch.float16 and gk.shape == (L, HKV, 5, D)
    torch.testing.assert_close(gk.float(), (k - 1.0).half().float())
    torch.testing.assert_close(gv.float(), v.half().float())
    assert bank.entry_len("a") == 5 and bank.names() == ["a"] and "a" in bank and len(bank) == 1


def test_errors_name_the_problem():
    bank = _bank(a=4, b=2)
    with pytest.raises(KeyError, match=r"'zz'.*\['a', 'b'\]"):
        bank.select(["zz"], 1)
    with pytest.raises(KeyError, match="known prefixes"):
        bank.remove("zz")
    with pytest.raises(ValueError, match=r"\[L=3, Hkv=2, P, D=8\]"):
        bank.add("c", torch.randn(L, HKV + 1, 4, D), torch.randn(L, HKV + 1, 4, D))
    with pytest.raises(ValueError, match="same shape"):
        bank.add("c", torch.randn(L, HKV, 4, D), torch.randn(L, HKV, 3, D))
    with pytest.raises(ValueError, match=r"ids \[2\] are not in this bank: ids 0\.\.1 \(a bank of 2 "
                                         r"entries\); -1 or None for no prefix"):
        bank.select(torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match=r"id 5 is not in this bank: ids 0\.\.1"):
        bank.select([5, None], 2)
    with pytest.raises(ValueError, match=r"the bank is empty; -1 or None"):
        _bank().select([0], 1)
    with pytest.raises(KeyError, match=r"unknown prefix 'A'; did you mean 'a'\?"):
        bank.select(["A"], 1)
    with pytest.raises(ValueError, match="3 prefixes for a batch of 2"):
        bank.select(["a", "b", "a"], 2)
    for shape in [(L, 2, HKV, 4, D + 1), (L, 1, HKV, 4, D)]:  # the k/v axis too
        with pytest.raises(ValueError, match=re.escape(f"[L=3, 2, Hkv=2, P, D=8], got {list(shape)}")):
            bank.add_trainable("t", _BadModule(shape))
    assert bank.names() == ["a", "b"]


class _BadModule(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.shape = shape

    def forward(self):
        return torch.zeros(self.shape)


def test_errors_of_a_large_bank_name_some_entries_and_a_count():
    """With thousands of tenants, an unknown name's KeyError listed them all (850 KB at 50,000,
    every tenant's name shown to the caller) after half a second of difflib."""
    bank = PrefixBank(L, HKV, D)
    kv = torch.zeros(L, HKV, 1, D)
    for i in range(3000):
        bank.add(f"tenant-{i}", kv, kv)
    with pytest.raises(KeyError) as info:
        bank.select(["tenant-x"], 1)
    msg = str(info.value)
    assert len(msg) < 600 and "'tenant-19'] and 2980 more" in msg
    with pytest.raises(KeyError, match="did you mean 'tenant-7'"):  # a case typo is still found
        bank.select(["Tenant-7"], 1)
    with pytest.raises(ValueError, match="and 2980 more"):
        bank.select([5000], 1)
    assert bank.ids(["tenant-2999", None, "tenant-0"]).tolist() == [2999, -1, 0]
    bank.remove("tenant-0")
    assert bank.id_of("tenant-2999") == 2998 and bank.ids(["tenant-1"]).tolist() == [0]


def test_ids_id_of_replace_remove():
    bank = _bank(a=4, b=2, c=3)
    assert bank.id_of("b") == 1
    assert bank.ids(["c", None, 0, "b"]).tolist() == [2, -1, 0, 1]
    assert bank.ids("b", batch_size=3).tolist() == [1, 1, 1]
    bank.add("a", *_kv(7, seed=9))  # replacing keeps the id
    assert bank.names() == ["a", "b", "c"] and bank.entry_len("a") == 7
    bank.remove("b")
    assert bank.names() == ["a", "c"] and bank.id_of("c") == 1


@pytest.mark.parametrize("rows", [["a", None, "b", "a", "c"], ["b"] * 3, [None, None], [1, -1]])
def test_selection_matches_per_row_reference(rows):
    """Attention through a selection equals, row by row, attention with that row's own prefix."""
    bank = _bank(a=4, b=1, c=6)
    B, Hq, Sq, Skv = len(rows), 4, 3, 5
    sel = bank.select(rows, B)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, Hq, Sq, D, generator=g)
    k = torch.randn(B, HKV, Skv, D, generator=g)
    v = torch.randn(B, HKV, Skv, D, generator=g)
    names = bank.names()
    for layer in range(L):
        pk, pv = sel.layer(layer)
        assert pk.shape == (len(sel.names), HKV, sel.max_len, D)
        out = prefix_attention_ref(q, k, v, pk, pv, prefix_ids=sel.prefix_ids, prefix_lens=sel.prefix_lens)
        for b, r in enumerate(rows):
            name = names[r] if isinstance(r, int) and r >= 0 else (r if isinstance(r, str) else None)
            if name is None:
                want = prefix_attention_ref(q[b:b + 1], k[b:b + 1], v[b:b + 1])
                assert sel.row_lens[b] == 0
            else:
                ek, ev = bank.get(name)
                want = prefix_attention_ref(q[b:b + 1], k[b:b + 1], v[b:b + 1], ek[layer], ev[layer])
                assert sel.row_lens[b] == bank.entry_len(name)
            torch.testing.assert_close(out[b:b + 1], want)


def test_selection_holds_only_unique_entries_and_single_entry_is_a_view():
    bank = _bank(a=4, b=2, c=9)
    sel = bank.select(["a", "b", "a", "b"] * 8, 32)
    assert sel.names == ["a", "b"] and sel.prefix_lens.tolist() == [4, 2] and sel.max_len == 4
    assert sel.nbytes == L * 2 * 2 * HKV * 4 * D * 4  # two entries padded to 4, not to 9, not per row
    one = bank.select("c", 64)
    assert one.is_view and one.names == ["c"]
    pk, _ = one.layer(0)
    assert pk.data_ptr() == bank.entry_kv("c").data_ptr()  # no copy


@pytest.mark.hf
def test_a_projected_trainable_entry_alone_is_a_copy_and_counts_in_the_cache():
    """A one-entry selection of a projected (MLP) trainable entry holds a computed tensor, yet
    is_view said True (its _base was that temporary) and cache_nbytes counted it as 0."""
    from prefix_attn.tuning import prefix_tuning

    model = _tiny_llama()
    prefix_tuning(model, num_virtual_tokens=5, name="mlp", projection_hidden_size=16)
    prefix_tuning(model, num_virtual_tokens=5, name="plain")
    bank = model.prefix_bank
    with torch.no_grad():
        mlp, plain = bank.select(["mlp"], 1), bank.select(["plain"], 1)
    assert not mlp.is_view and plain.is_view
    assert bank.cache_nbytes == mlp.nbytes > 0


def test_nbytes_are_per_entry_lengths():
    bank = _bank(a=4, b=100)
    assert bank.entry_nbytes("a") == L * 2 * HKV * 4 * D * 4
    assert bank.entry_nbytes("b") == L * 2 * HKV * 100 * D * 4
    assert bank.nbytes == bank.entry_nbytes("a") + bank.entry_nbytes("b")
    bank.add_trainable("t", LearnedPrefix(3))
    assert bank.entry_nbytes("t") == L * 2 * HKV * 3 * D * 4
    assert bank.nbytes == L * 2 * HKV * 107 * D * 4


def test_selection_cache_reused_and_invalidated():
    bank = _bank(a=4, b=2)
    s1 = bank.select(["a", "b"], 2)
    s2 = bank.select(["b", "a"], 2)  # same set of entries -> same stacked tensor
    assert s1.layer(0)[0].data_ptr() == s2.layer(0)[0].data_ptr()
    assert s2.prefix_ids.tolist() == [1, 0]
    assert bank.cache_nbytes == s1.nbytes
    bank.add("b", *_kv(2, seed=5))
    s3 = bank.select(["a", "b"], 2)
    assert s3.version > s1.version and bank.cache_nbytes == s3.nbytes
    torch.testing.assert_close(s3.layer(1)[0][1, :, :2], bank.get("b")[0][1])


@pytest.mark.parametrize("rows", [["a", "b"], ["a", "a"]])
def test_selection_made_under_inference_mode_is_not_reused_with_autograd(rows):
    """Serving under torch.inference_mode, then training something else (e.g. LoRA on q) with
    the same fixed prefixes: the inference-mode selection (inference tensors, which autograd
    cannot save) must not be handed to the training forward."""
    from prefix_attn import prefix_attention

    bank = _bank(a=4, b=2)
    with torch.inference_mode():
        inf = bank.select(rows, 2)
    sel = bank.select(rows, 2)
    assert not sel.prefix_lens.is_inference() and not sel.layer(0)[0].is_inference()
    assert bank.select(rows, 2).prefix_lens is sel.prefix_lens  # still cached per mode
    with torch.inference_mode():
        assert bank.select(rows, 2).prefix_lens is inf.prefix_lens
    q = torch.randn(2, 4, 3, D, requires_grad=True)
    k = v = torch.randn(2, HKV, 3, D)
    pk, pv = sel.layer(1)
    out = prefix_attention(q, k, v, pk, pv, prefix_ids=sel.prefix_ids, prefix_lens=sel.prefix_lens)
    out.sum().backward()
    assert q.grad is not None


def test_copy_on_write_keeps_old_selections_valid():
    bank = _bank(a=4, b=2)
    sel = bank.select(["a", "b"], 2)
    old_a = bank.get("a")[0].clone()
    bank.add("a", *_kv(4, seed=7))
    bank.remove("b")
    torch.testing.assert_close(sel.layer(2)[0][0], old_a[2])
    assert sel.names == ["a", "b"]


def test_concurrent_readers_never_see_half_written_entries():
    """A writer replaces 'x' with constant tensors (keys == values == c); readers check
    every selection they get is one whole entry."""
    bank = PrefixBank(L, HKV, D)
    bank.add("x", torch.zeros(L, HKV, 4, D), torch.zeros(L, HKV, 4, D))
    bank.add("y", torch.ones(L, HKV, 2, D), torch.ones(L, HKV, 2, D))
    stop = threading.Event()
    errors = []

    def writer():
        for c in range(1, 200):
            t = torch.full((L, HKV, 4, D), float(c))
            bank.add("x", t, t)
        stop.set()

    def reader():
        while not stop.is_set():
            sel = bank.select(["x", "y"], 2)
            for layer in range(L):
                pk, pv = sel.layer(layer)
                vals = torch.unique(torch.cat([pk[0].flatten(), pv[0].flatten()]))
                if vals.numel() != 1 or not torch.all(pk[1, :, :2] == 1):
                    errors.append(vals.tolist())

    threads = [threading.Thread(target=reader) for _ in range(2)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert bank.get("x")[0].max().item() == 199


def test_trainable_entries_get_gradients_and_are_not_cached():
    bank = _bank(a=3)
    mod = LearnedPrefix(5, seed=3)
    bank.add_trainable("t", mod)
    assert any(p is mod.kv for p in bank.parameters())
    B, Hq, Sq = 3, 4, 2
    q = torch.randn(B, Hq, Sq, D)
    k = torch.randn(B, HKV, Sq, D)
    sel = bank.select(["t", "a", None], B)
    loss = 0
    for layer in range(L):
        pk, pv = sel.layer(layer)
        out = prefix_attention_ref(q, k, k, pk, pv, prefix_ids=sel.prefix_ids, prefix_lens=sel.prefix_lens)
        loss = loss + out.square().sum()
    (g_batch,) = torch.autograd.grad(loss, mod.kv)
    assert g_batch.abs().sum() > 0
    assert bank.cache_nbytes == 0  # selections with trainable entries are rebuilt every time
    # only row 0 uses "t": its gradient is the gradient of row 0 alone (the other rows add nothing)
    sel1 = bank.select(["t"], 1)
    loss1 = sum(prefix_attention_ref(q[:1], k[:1], k[:1], *sel1.layer(layer)).square().sum() for layer in range(L))
    (g_row,) = torch.autograd.grad(loss1, mod.kv)
    torch.testing.assert_close(g_batch, g_row)
    # removing a trainable entry drops its parameters from the model (fixed values do not
    # replace it: test_fixed_values_never_replace_a_trainable_entry)
    bank.remove("t")
    bank.add("t", *_kv(2))
    assert not bank.is_trainable("t") and not any(p is mod.kv for p in bank.parameters())
    bank.add_trainable("t2", LearnedPrefix(1))
    bank.remove("t2")
    assert list(bank.parameters()) == [] and bank.names() == ["a", "t"]


class _UnreadPrefix(LearnedPrefix):
    """A trainable entry whose parameters must not be walked (counts the walks)."""
    walks = 0

    def parameters(self, recurse=True):
        type(self).walks += 1
        return super().parameters(recurse)


def test_selecting_trainable_entries_reads_only_the_entries_the_batch_uses():
    """A training forward looks at the parameters of the entries its rows select, not at every
    entry's (a thousand trainable prefixes cost a scan of all of them at every forward); a batch
    that selects no trainable entry still finds one to anchor its graph on."""
    bank = PrefixBank(L, HKV, D)
    bank.add_trainable("used", LearnedPrefix(2))
    for i in range(3):
        bank.add_trainable(f"other{i}", _UnreadPrefix(2, seed=i))
    bank.train()
    _UnreadPrefix.walks = 0
    sel = bank.select(["used", "used"])
    assert _UnreadPrefix.walks == 0
    assert sel.layer(0)[0].requires_grad and sel.names == ["used"]
    no_prefix = bank.select([None, None])  # no trainable entry selected: the zero anchor
    assert no_prefix._anchor.requires_grad and no_prefix.names == [None]


def test_a_training_forward_over_fixed_entries_looks_at_the_module_entries_only(monkeypatch):
    """Whether some entry trains is asked of the trainable (module) entries only: a bank of
    thousands of fixed tenants was walked entry by entry at every forward with grad on."""
    import prefix_attn.bank_select as bank_module

    bank = _bank(**{f"f{i}": 2 for i in range(40)})
    bank.add_trainable("t", LearnedPrefix(2))
    bank.train()
    asked = []
    real = bank_module._trains
    monkeypatch.setattr(bank_module, "_trains", lambda e: asked.append(e.name) or real(e))
    sel = bank.select(["f3", "f5"])  # no trainable entry: the zero anchor, found on "t"
    assert sel._anchor.requires_grad
    assert sorted(asked) == ["f3", "f5", "t"]
    asked.clear()
    assert bank._trains_any() and bank._trained_names() == ["t"]
    assert asked == ["t", "t"]


@pytest.mark.hf
def test_attach_puts_the_bank_in_the_models_mode():
    model = _tiny_llama().eval()
    assert not PrefixBank.attach(model).training
    model.train()
    assert model.prefix_bank.training


def test_dtype_and_device_moves():
    bank = _bank(a=4)
    sel_before = bank.select(["a", None], 2)
    bank.to(torch.float64)
    assert bank.dtype == torch.float64 and bank.get("a")[0].dtype == torch.float64
    sel = bank.select(["a", None], 2)
    assert sel.layer(0)[0].dtype == torch.float64 and sel.version > sel_before.version
    bank.half()
    assert bank.entry_nbytes("a") == L * 2 * HKV * 4 * D * 2


def test_save_load_roundtrip_and_mismatch(tmp_path):
    bank = _bank(a=4, b=1)
    bank.add_trainable("t", LearnedPrefix(2, seed=4))
    bank.save(str(tmp_path / "bank"))
    assert not [p for p in (tmp_path / "bank").iterdir() if p.name.startswith(".tmp")]

    class Host(nn.Module):
        def __init__(self, layers, kv_heads):
            super().__init__()
            from types import SimpleNamespace
            self.config = SimpleNamespace(num_hidden_layers=layers, num_attention_heads=4,
                                          num_key_value_heads=kv_heads, hidden_size=4 * D)
            self.w = nn.Linear(2, 2)

    host = Host(L, HKV)
    loaded = PrefixBank.load(str(tmp_path / "bank"), host)
    assert host.prefix_bank is loaded and loaded.names() == ["a", "b", "t"]
    for name in ["a", "b", "t"]:
        torch.testing.assert_close(loaded.entry_kv(name), bank.entry_kv(name).detach())
    assert not loaded.is_trainable("t")  # folded on save

    other = Host(L + 1, HKV)
    other_bank = PrefixBank.attach(other)
    other_bank.add("keep", torch.zeros(L + 1, HKV, 1, D), torch.zeros(L + 1, HKV, 1, D))
    with pytest.raises(ValueError, match=r"\(L, Hkv, D\)=\(3, 2, 8\).*\(4, 2, 8\)"):
        PrefixBank.load(str(tmp_path / "bank"), other)
    assert other_bank.names() == ["keep"]

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "prefix_bank.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(ValueError, match="prefix_bank.safetensors"):
        PrefixBank.load(str(tmp_path / "bad"), Host(L, HKV))
    with pytest.raises(FileNotFoundError):
        PrefixBank.load(str(tmp_path / "missing"), Host(L, HKV))


# -- HF models -----------------------------------------------------------------------------

def _tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.hf
@pytest.mark.parametrize("ids, error, words", [
    ("hello", TypeError, "got a str: tokenize the text first"),
    ({"input_ids": [[5, 6]]}, TypeError, "got a dict: tokenize the text first"),
    (torch.tensor([5.0, 6.0]), TypeError, "integer token ids, got torch.float32"),
    ([5, 600], ValueError, r"token id 600 is outside the vocabulary of LlamaForCausalLM \(\d+ ids"),
    ([], ValueError, "input_ids is empty"),
    (torch.ones(2, 3, dtype=torch.long), ValueError, r"\[P\] or \[1, P\], got \[2, 3\]"),
])
def test_add_prompt_says_what_its_ids_must_be(ids, error, words):
    """A tokenizer's whole output, float ids and ids past the vocabulary gave torch's errors
    from inside the model (IndexError, a dtype RuntimeError, 'Encoding' cannot be interpreted)."""
    model = _tiny_llama()  # the bank holds it weakly
    bank = PrefixBank.attach(model)
    with pytest.raises(error, match=words):
        bank.add_prompt("p", ids)
    assert "p" not in bank


def test_folder_mixups_name_what_the_folder_holds(tmp_path):
    bank = _bank(a=4)
    bank.save(str(tmp_path / "bank"))
    bank.save_peft("a", str(tmp_path / "adapter"))
    with pytest.raises(FileNotFoundError, match="this folder holds a PEFT adapter"):
        PrefixBank.load(str(tmp_path / "adapter"), _tiny_llama())
    with pytest.raises(FileNotFoundError, match="this folder holds a saved prefix bank"):
        bank.load_peft("x", str(tmp_path / "bank"))
    (tmp_path / "afile").write_text("")
    with pytest.raises(NotADirectoryError, match="'.*afile' is a file; give a folder"):
        bank.save(str(tmp_path / "afile"))
    assert (tmp_path / "afile").read_text() == ""


def test_attach_infers_dims_and_moves_with_model():
    transformers = pytest.importorskip("transformers")
    model = _tiny_llama()
    bank = PrefixBank.attach(model)
    assert PrefixBank.attach(model) is bank and model.prefix_bank is bank
    assert (bank.num_layers, bank.num_kv_heads, bank.head_dim) == (2, 2, 8)
    bank.add("a", torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8))
    model.to(torch.float64)
    assert bank.dtype == torch.float64 and bank.get("a")[0].dtype == torch.float64
    gpt2 = transformers.AutoModelForCausalLM.from_config(
        transformers.GPT2Config(vocab_size=64, n_embd=24, n_layer=3, n_head=3, n_positions=64))
    gb = PrefixBank.attach(gpt2)
    assert (gb.num_layers, gb.num_kv_heads, gb.head_dim) == (3, 3, 8)


@pytest.mark.hf
def test_attach_binds_a_bank_set_by_hand_and_installs_its_hooks():
    """model.prefix_bank = PrefixBank(...) then attach(model): attach returned the bank as it
    was, unbound and without the model's hooks, so prefixes= failed saying to call attach."""
    from prefix_attn.model_info import model_dims
    from prefix_attn.tiny import tiny_model

    model, ref = tiny_model("llama"), tiny_model("llama")
    Lm, Hm, Dm = model_dims(model)
    model.prefix_bank = PrefixBank(Lm, Hm, Dm)
    bank = PrefixBank.attach(model)
    assert bank is model.prefix_bank and bank.model is model
    bank.add("a", torch.randn(Lm, Hm, 3, Dm), torch.randn(Lm, Hm, 3, Dm))
    PrefixBank.attach(ref).add("a", *bank.get("a"))
    ids = torch.randint(3, 64, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, prefixes=["a"]).logits, ref(ids, prefixes=["a"]).logits)
    other = tiny_model("llama")
    other.prefix_bank = PrefixBank(Lm, Hm, 2 * Dm)
    with pytest.raises(ValueError, match=f"head dim {2 * Dm}; this LlamaForCausalLM has {Lm} layers"):
        PrefixBank.attach(other)


@pytest.mark.hf
def test_add_prompt_kv_continues_like_the_full_prompt(tmp_path):
    """The prompt entry, fed back as a KV cache, gives the logits of prompt + x for x's tokens."""
    from transformers import DynamicCache

    from prefix_attn.hf import cache_kwarg

    model = _tiny_llama()
    bank = PrefixBank.attach(model)
    prompt = torch.tensor([5, 9, 11, 3, 7, 60, 2])
    x = torch.tensor([[4, 8, 15, 16]])
    bank.add_prompt("sys", prompt)
    assert bank.entry_len("sys") == 7
    keys, values = bank.get("sys")
    cache = DynamicCache()
    for layer in range(bank.num_layers):
        cache.update(keys[layer][None].clone(), values[layer][None].clone(), layer)
    P = prompt.numel()
    with torch.no_grad():
        full = model(torch.cat([prompt[None], x], dim=1)).logits[:, P:]
        cont = model(x, **{cache_kwarg(model): cache}, position_ids=torch.arange(P, P + x.shape[1])[None]).logits
    torch.testing.assert_close(cont, full, rtol=1e-4, atol=1e-5)
    assert bank.kind("sys") == "prompt"
    bank.add("learned", *[torch.randn(2, 2, 3, 8)] * 2)
    bank.save(str(tmp_path))
    other = PrefixBank.load(str(tmp_path), _tiny_llama())
    assert [other.kind(n) for n in other.names()] == ["prompt", "fixed"]
    torch.testing.assert_close(other.entry_kv("sys"), bank.entry_kv("sys"))
    with pytest.raises(ValueError, match=r"\[P\] or \[1, P\]"):
        bank.add_prompt("bad", torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.hf
def test_prompt_prefix_through_prefixes_kwarg_forward_and_generate():
    """With the HF integration: a batch mixing two prompt prefixes and none gives, row by row,
    the plain model's logits for prompt + x, and generate gives the plain model's tokens."""
    pytest.importorskip("prefix_attn.hf")
    model = _tiny_llama(seed=1)
    bank = PrefixBank.attach(model)
    model.set_attn_implementation("prefix_attn")
    prompts = {"sys": torch.tensor([5, 9, 11, 3, 7, 60, 2]), "short": torch.tensor([42, 17])}
    for name, ids in prompts.items():
        bank.add_prompt(name, ids[None])
    x = torch.tensor([[4, 8, 15, 16], [23, 42, 1, 2], [9, 9, 8, 7]])
    rows = ["sys", None, "short"]
    with torch.no_grad():
        got = model(x, prefixes=rows).logits
        for b, name in enumerate(rows):
            full_ids = x[b:b + 1] if name is None else torch.cat([prompts[name][None], x[b:b + 1]], dim=1)
            want = model(full_ids).logits[:, -x.shape[1]:]
            torch.testing.assert_close(got[b:b + 1], want, rtol=1e-4, atol=1e-5)
        gen = model.generate(x[:1], prefixes=["sys"], max_new_tokens=6, do_sample=False)
        full = torch.cat([prompts["sys"][None], x[:1]], dim=1)
        plain = model.generate(full, max_new_tokens=6, do_sample=False)
    assert gen.shape[1] > x.shape[1]
    assert gen[0, x.shape[1]:].tolist() == plain[0, full.shape[1]:].tolist()


# -- gaps found by a mutation audit -------------------------------------------------------------

def test_pinned_snapshot_never_gets_a_newer_versions_cached_selection():
    """Inside pinned(), another thread replaces entry "a" and selects it (caching the new
    version's selection): the pinned reader must still get the old contents."""
    bank = _bank(a=4, b=2)
    old = bank.get("a")[0].clone()
    with bank.pinned():
        bank.select(["a"], 1)

        def other_tenant():
            bank.add("a", *_kv(4, seed=9))
            bank.select(["a"], 1)

        t = threading.Thread(target=other_tenant)
        t.start()
        t.join()
        pk, _ = bank.select(["a"], 1).layer(0)
        torch.testing.assert_close(pk[0], old[0])
    pk, _ = bank.select(["a"], 1).layer(0)
    torch.testing.assert_close(pk[0], bank.get("a")[0][0])
    assert not torch.equal(pk[0], old[0])


def test_nested_pins_keep_the_outer_snapshot():
    bank = _bank(a=4, b=2, c=3)
    with bank.pinned():
        ids = bank.ids(["b"], 1)
        bank.remove("a")
        with bank.pinned():
            assert bank.select(ids).names == ["b"]
    assert bank.select(["b"]).names == ["b"] and bank.id_of("b") == 0


def test_cached_prefix_ids_changed_in_place_are_not_reused():
    bank = _bank(a=4, b=2)
    s = bank.select(["a", "b"], 2)
    s.prefix_ids.fill_(0)  # a caller's in-place write to the tensor it was handed
    assert bank.select(["a", "b"], 2).prefix_ids.tolist() == [0, 1]


@pytest.mark.hf
def test_add_prompt_runs_without_dropout_and_restores_training_mode():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128,
                                   attention_dropout=0.5, attn_implementation="sdpa")
    model = transformers.AutoModelForCausalLM.from_config(cfg).train()
    bank = PrefixBank.attach(model)
    prompt = torch.tensor([5, 9, 11, 3, 7])
    bank.add_prompt("one", prompt)
    bank.add_prompt("two", prompt)
    assert model.training
    torch.testing.assert_close(bank.entry_kv("one"), bank.entry_kv("two"), rtol=0, atol=0)


@pytest.mark.hf
def test_prompt_entries_loaded_onto_another_model_warn(tmp_path):
    """A prompt entry's KV fits only the model that computed it: loading the bank onto other
    weights warns naming the entry; the same weights (in another dtype too) do not."""
    import warnings

    model = _tiny_llama(seed=0)
    bank = PrefixBank.attach(model)
    bank.add_prompt("sys", torch.tensor([5, 9, 11, 3]))
    bank.add("fixed", torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8))
    bank.save(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PrefixBank.load(str(tmp_path), _tiny_llama(seed=0))
        PrefixBank.load(str(tmp_path), _tiny_llama(seed=0).to(torch.bfloat16))
    with pytest.warns(UserWarning, match=r"prompt entries \['sys'\] were computed by another model"):
        other = PrefixBank.load(str(tmp_path), _tiny_llama(seed=3))
    assert other.names() == ["sys", "fixed"]  # loaded all the same


@pytest.mark.hf
def test_prompt_entries_loaded_onto_the_same_base_with_other_prefixes_do_not_warn(tmp_path):
    """The model signature covers the base weights only: the bank's own trainable prefixes
    (trained since, or absent in the loading model) do not make a prompt entry look foreign."""
    import warnings

    from prefix_attn.tuning import prefix_tuning

    model = _tiny_llama(seed=0)
    prefix_tuning(model, num_virtual_tokens=3, name="task")
    model.prefix_bank.add_prompt("sys", torch.tensor([5, 9, 11, 3]))
    with torch.no_grad():
        for p in model.prefix_bank.trainable.parameters():
            p.add_(1.0)  # a training step on the prefix
    model.prefix_bank.save(str(tmp_path))
    other = _tiny_llama(seed=0)  # the same base, with a trained prefix of its own
    prefix_tuning(other, num_virtual_tokens=3, name="other")
    with torch.no_grad():
        for p in other.prefix_bank.trainable.parameters():
            p.add_(2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PrefixBank.load(str(tmp_path), _tiny_llama(seed=0))
        PrefixBank.load(str(tmp_path), other)


def test_cache_size_bounds_the_stacked_copies_kept():
    bank = _bank(a=4, b=2, c=3, d=1)
    mixes = [["a", "b"], ["a", "c"], ["b", "c"], ["c", "d"]]
    for rows in mixes:
        bank.select(rows, 2)
    full = bank.cache_nbytes
    assert full > 0
    bank.cache_size = 1  # trims at once, keeps the most recent
    assert 0 < bank.cache_nbytes < full
    bank.select(["a", "b"], 2)
    assert bank.cache_nbytes == bank.select(["a", "b"], 2).nbytes
    bank.cache_size = 0
    assert bank.cache_nbytes == 0
    s1, s2 = bank.select(["a", "d"], 2), bank.select(["a", "d"], 2)
    assert bank.cache_nbytes == 0 and s1.layer(0)[0].data_ptr() != s2.layer(0)[0].data_ptr()
    with pytest.raises(ValueError, match="cache_size must be an int >= 0"):
        bank.cache_size = -1


def test_trainable_entries_are_cached_without_autograd_until_their_parameters_change():
    """generate / evaluation (no_grad, inference_mode) reused nothing for a trainable entry: a
    projected prefix ran its MLP at every decode step. Without autograd the selection is now
    cached, keyed on the parameters' versions; with autograd it is rebuilt every call."""
    calls = []

    class Counting(LearnedPrefix):
        def forward(self):
            calls.append(1)
            return super().forward()

    bank = _bank(a=3)
    mod = Counting(5, seed=3)
    bank.add_trainable("t", mod)
    for mode in (torch.no_grad, torch.inference_mode):
        calls.clear()
        with mode():
            first = bank.select(["t", "a"], 2)
            again = bank.select(["t", "a"], 2)
        assert len(calls) == 1 and again.layer(0)[0].data_ptr() == first.layer(0)[0].data_ptr()
    with torch.no_grad():
        mod.kv.add_(1.0)  # an optimizer step: in place, a new version
        calls.clear()
        moved = bank.select(["t", "a"], 2)
    assert len(calls) == 1
    torch.testing.assert_close(moved.layer(0)[0][1, :, :5] - first.layer(0)[0][1, :, :5],
                               torch.ones(HKV, 5, D))
    calls.clear()
    for _ in range(2):
        assert bank.select(["t", "a"], 2).layer(0)[0].requires_grad  # autograd: rebuilt
    assert len(calls) == 2
    mod.kv.data = mod.kv.data + 2.0  # new storage, same version (weight loaders, sharding)
    with torch.no_grad():
        replaced = bank.select(["t", "a"], 2)
    torch.testing.assert_close(replaced.layer(0)[0][1, :, :5] - moved.layer(0)[0][1, :, :5],
                               torch.full((HKV, 5, D), 2.0))


@pytest.mark.parametrize("fused", [True, False])
def test_a_fused_optimizer_step_is_seen_by_the_cached_selection(fused):
    """Fused optimizers (AdamW(fused=True), HF Trainer's default) write parameters without
    bumping their versions: evaluation and generate kept using the stacked prefixes of before
    the step (a Trainer's eval_loss did not move). Every optimizer step now counts."""
    bank = _bank(a=3)
    mod = LearnedPrefix(5, seed=3)
    bank.add_trainable("t", mod)
    opt = torch.optim.AdamW(mod.parameters(), lr=0.5, fused=fused, foreach=False if not fused else None)
    with torch.no_grad():
        before = bank.select(["t", "a"], 2).layer(0)[0].clone()
    bank.select(["t", "a"], 2).layer(0)[0].sum().backward()
    opt.step()
    with torch.no_grad():
        after = bank.select(["t", "a"], 2).layer(0)[0]
    want = mod.forward()[0, 0].detach()  # layer 0's keys, as the parameters now are
    torch.testing.assert_close(after[1, :, :5], want)  # slot 1: "t" (bank order a, t)
    assert not torch.equal(after, before)


def test_trainable_entries_are_ordered_by_name_whatever_order_they_were_added_in():
    """DistributedDataParallel pairs parameters across processes by their order: two ranks that
    added the same prefixes in different orders (a loop over a set) averaged each prefix's
    gradient with another's. The modules are kept sorted by name."""
    orders = []
    for names in (["b", "a", "c"], ["c", "a", "b"]):
        bank = _bank()
        for name in names:
            bank.add_trainable(name, LearnedPrefix(3, seed=ord(name)))
        orders.append([n for n, _ in bank.named_parameters()])
    assert orders[0] == orders[1] == ["trainable.a.kv", "trainable.b.kv", "trainable.c.kv"]


def test_copies_and_pickles_do_not_carry_the_selection_cache():
    """copy.deepcopy and pickling copied the cached stacks (several times the entries' size in
    a warm serving bank) and brought them back alive on load."""
    import copy
    import io

    bank = _bank(a=5, b=7, c=3)
    cold = io.BytesIO()
    torch.save(bank, cold)
    for rows in (["a", "b"], ["b", "c"], ["a", "c"]):
        bank.select(rows, 2)
    assert bank.cache_nbytes > 0
    warm = io.BytesIO()
    torch.save(bank, warm)
    assert len(warm.getvalue()) == len(cold.getvalue())
    for other in (copy.deepcopy(bank), torch.load(io.BytesIO(warm.getvalue()), weights_only=False)):
        assert other.cache_nbytes == 0
        torch.testing.assert_close(other.select(["a", "b"], 2).layer(0)[0],
                                   bank.select(["a", "b"], 2).layer(0)[0])


def test_selections_of_a_trainable_entry_at_older_parameter_values_leave_the_cache():
    """Evaluation after every training step cached one selection per parameter version, never
    asked for again, pushing useful stacks out of the cache: the newest one replaces them."""
    bank = _bank(a=3)
    mod = LearnedPrefix(4, seed=1)
    bank.add_trainable("t", mod)
    bank.select(["a", "a"], 2)  # a fixed one-entry view, cached too
    for _ in range(5):
        with torch.no_grad():
            mod.kv.add_(0.1)  # an optimizer step
            bank.select(["t", "a"], 2)
    assert len(bank._cache) == 2
    with torch.no_grad():
        torch.testing.assert_close(bank.select(["t", "a"], 2).layer(0)[0][1, :, :4], mod.kv[0, 0])


def test_a_fixed_entry_edited_in_place_is_seen_by_a_mixed_batch():
    """A batch mixing entries reads a cached stacked copy; an in-place edit of one entry (its
    stored tensor, e.g. ``bank.entry_kv("b").mul_(2)``) kept the stack of before until
    bank.clear_cache(). The stack is keyed on the entries' versions; the stale one leaves."""
    bank = _bank(a=4, b=2)
    before = bank.select(["a", "b"], 2)
    bank.entry_kv("b").mul_(2)
    after = bank.select(["b", "a"], 2)
    assert after.layer(0)[0].data_ptr() != before.layer(0)[0].data_ptr()
    torch.testing.assert_close(after.layer(1)[0][1, :, :2], bank.get("b")[0][1])
    assert len(bank._cache) == 1
    assert bank.select(["a", "b"], 2).layer(0)[0].data_ptr() == after.layer(0)[0].data_ptr()


def test_a_loaded_bank_does_not_keep_its_file_mapped(tmp_path):
    """Entries read from the file were views of its memory map: the file rewritten in place
    (cp of another bank over it) changed the loaded entries."""
    from types import SimpleNamespace

    bank = _bank(a=4)
    bank.save(str(tmp_path))
    host = nn.Module()
    host.config = SimpleNamespace(num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=HKV,
                                  hidden_size=4 * D)
    loaded = PrefixBank.load(str(tmp_path), host)
    before = loaded.get("a")[0].clone()
    path = tmp_path / "prefix_bank.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as f:  # the entry's bytes end the file: zero them in place
        f.seek(size - before.numel() * 2 * 4)
        f.write(bytes(before.numel() * 2 * 4))
    assert torch.equal(loaded.get("a")[0], before)


@pytest.mark.parametrize("field, value, words", [
    ("prefix_attn_bank", "2", r"format '2', this version of prefix_attn reads format '1'"),
    ("prefix_attn_bank", None, r"format None"),
    ("names", '["a", "a"]', r"bad entry names \['a', 'a'\] \(strings, each once\)"),
    ("kinds", '["fixed", "bogus"]', r"bad entry kinds \['fixed', 'bogus'\]"),
    ("kinds", '["fixed"]', r"bad entry kinds \['fixed'\]"),
    ("model_signatures_2", '[null]', r"bad model signatures \[None\]"),
])
def test_a_bank_file_of_another_format_or_with_a_name_twice_is_refused(tmp_path, field, value, words):
    """The file's format field was written but never read (a later layout would be misread),
    and a name given twice silently kept the second entry only."""
    from types import SimpleNamespace

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    _bank(a=4, b=1).save(str(tmp_path))
    path = str(tmp_path / "prefix_bank.safetensors")
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata())
    if value is None:
        del meta[field]
    else:
        meta[field] = value
    save_file(load_file(path), path, metadata=meta)
    host = nn.Module()
    host.config = SimpleNamespace(num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=HKV,
                                  hidden_size=4 * D)
    with pytest.raises(ValueError, match=words):
        PrefixBank.load(str(tmp_path), host)


def test_an_empty_batch_and_bad_batch_sizes():
    """select([]) / select("a", 0) failed in max() of no lengths; a negative or float
    batch_size was taken (ids("a", -1) -> []) or failed without naming it."""
    bank = _bank(a=4)
    for sel in (bank.select([]), bank.select("a", 0)):
        assert sel.prefix_ids.numel() == 0 and sel.layer(0)[0].shape[2] == 0
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="batch_size must be an int >= 0"):
            bank.ids("a", bad)


@pytest.mark.parametrize("args, error, words", [
    ((2.7, 2, 8), ValueError, "num_layers must be a positive int"),
    ((2, 0, 8), ValueError, "num_kv_heads must be a positive int"),
    ((2, 2, -8), ValueError, "head_dim must be a positive int"),
    ((2, 2, 8, torch.int64), TypeError, "dtype must be one of torch.float16, "),
    ((2, 2, 8, "float16"), TypeError, "dtype must be one of"),
    ((2, 2, 8, torch.float8_e4m3fn), TypeError, "got torch.float8_e4m3fn"),
])
def test_the_constructor_checks_its_arguments(args, error, words):
    """PrefixBank(2.7, ...) made 2 layers; an int64 bank truncated every entry (0.7 -> 0); a
    float8 bank rounded every entry to a few bits (0.25 off at values of 3 to 9)."""
    with pytest.raises(error, match=words):
        PrefixBank(*args)


def test_a_refused_file_leaves_the_model_without_a_bank(tmp_path):
    """load attached the bank (and its hooks) before finding the file's dims wrong."""
    from types import SimpleNamespace

    _bank(a=4).save(str(tmp_path))
    host = nn.Module()
    host.config = SimpleNamespace(num_hidden_layers=L + 1, num_attention_heads=4,
                                  num_key_value_heads=HKV, hidden_size=4 * D)
    with pytest.raises(ValueError, match="saved for"):
        PrefixBank.load(str(tmp_path), host)
    assert not hasattr(host, "prefix_bank")


def test_share_memory_shares_the_fixed_entries_too():
    """model.share_memory() (before forking workers) shared the base weights and trainable
    entries but not the fixed entries, which moves only carried over for device and dtype:
    a forked worker did not see the parent's in-place edits of them."""
    bank = _bank(a=4, b=2)
    host = nn.Module()
    host.bank = bank
    host.share_memory()
    assert bank.get("a")[0].is_shared() and bank.entry_kv("b").is_shared()
    assert bank.select(["a", "b"], 2).layer(0)[0].shape[0] == 2


def test_a_memory_format_move_leaves_the_entries_as_they_are():
    """model.to(memory_format=torch.channels_last) (a VLM's conv tower) applied the conversion to
    the bank's 5-D entries: "required rank 4 tensor to use channels_last format"."""
    bank = _bank(a=4)
    before = bank.entry_kv("a").clone()
    bank.to(memory_format=torch.channels_last)
    torch.testing.assert_close(bank.entry_kv("a"), before)


class _Prefix(nn.Module):
    """A trainable entry whose output is ``kv * gain`` (``gain`` a plain attribute)."""

    def __init__(self, P=4):
        super().__init__()
        self.kv = nn.Parameter(torch.randn(L, 2, HKV, P, D, generator=torch.Generator().manual_seed(0)))
        self.gain = 1.0

    def forward(self):
        return self.kv * self.gain


def test_a_bank_of_thousands_runs_no_difflib_for_an_unknown_name(monkeypatch):
    """Past 2,000 names an unknown name is looked up by case only (difflib over 50,000 tenants took
    half a second of a request). Kills: _FUZZY_NAMES_MAX raised (difflib run at any size)."""
    import prefix_attn.bank_names as bank_mod

    bank = PrefixBank(L, HKV, D)
    kv = torch.zeros(L, HKV, 1, D)
    for i in range(2001):
        bank.add(f"tenant-{i}", kv, kv)
    calls = []
    monkeypatch.setattr(bank_mod.difflib, "get_close_matches", lambda *a, **k: calls.append(1) or [])
    with pytest.raises(KeyError, match="unknown prefix 'tenant-1x'"):
        bank.select(["tenant-1x"], 1)
    with pytest.raises(KeyError, match="did you mean 'tenant-7'"):
        bank.select(["TENANT-7"], 1)
    assert calls == []
    bank.remove("tenant-0")  # 2,000 names: difflib again
    with pytest.raises(KeyError):
        bank.select(["tenant-1x"], 1)
    assert calls == [1]


def test_each_snapshot_builds_its_names_index_once():
    """The names and the name -> id index are built once per snapshot, not at every select (a bank
    of 50,000 tenants spent most of each forward rebuilding them): after an add, a remove, a
    dtype move and a clear. Kills: names_index not cached; _commit_many / _apply building a
    plain dict snapshot."""
    bank = _bank(a=4, b=2)
    for change in (lambda: bank.add("c", *_kv(3)), lambda: bank.remove("a"),
                   lambda: bank.to(torch.float64), lambda: None):
        change()
        entries = bank._state[1]
        first = entries.names_index()  # AttributeError on a plain dict snapshot
        assert entries.names_index() is first and first[0] == tuple(bank.names())
        assert bank.select(list(bank.names()), len(bank.names())).names == bank.names()


def test_clear_is_a_new_version():
    """``version`` is documented as incremented by every change of the entries. Kills: clear()
    keeping the version."""
    bank = _bank(a=4)
    before = bank.version
    bank.clear()
    assert bank.version > before and bank.names() == []


@pytest.mark.parametrize("kind", ["forward_hook", "forward_pre_hook"])
def test_a_trainable_entry_with_hooks_is_called_in_every_no_grad_select(kind):
    """add_trainable: "a module with hooks ... inside is called every time" (its output is not a
    function of its parameters alone). Kills: _output_follows_parameters ignoring forward hooks /
    forward pre-hooks (a no-grad select then served the first output again)."""
    bank = PrefixBank(L, HKV, D)
    m = _Prefix()
    bank.add_trainable("t", m)
    state = {"factor": 1.0}
    if kind == "forward_hook":
        m.register_forward_hook(lambda mod, args, out: out * state["factor"])
    else:
        m.register_forward_pre_hook(lambda mod, args: setattr(mod, "gain", state["factor"]))
    with torch.no_grad():
        first = bank.select(["t"], 1).layer(0)[0].clone()
        state["factor"] = 2.0
        second = bank.select(["t"], 1).layer(0)[0]
    torch.testing.assert_close(second, 2 * first, rtol=0, atol=0)


def test_a_trainable_entry_with_an_accelerate_hook_is_called_in_every_no_grad_select():
    """accelerate's hooks wrap forward (no nn.Module hook registered; the module gets _hf_hook).
    Kills: _output_follows_parameters ignoring _hf_hook."""
    hooks = pytest.importorskip("accelerate.hooks")

    class Scale(hooks.ModelHook):
        factor = 1.0

        def post_forward(self, module, output):
            return output * self.factor

    bank = PrefixBank(L, HKV, D)
    m = _Prefix()
    bank.add_trainable("t", m)
    hook = Scale()
    hooks.add_hook_to_module(m, hook)
    assert not m._forward_hooks and hasattr(m, "_hf_hook")
    with torch.no_grad():
        first = bank.select(["t"], 1).layer(0)[0].clone()
        hook.factor = 3.0
        second = bank.select(["t"], 1).layer(0)[0]
    torch.testing.assert_close(second, 3 * first, rtol=0, atol=0)


@pytest.mark.hf
def test_attach_binds_a_bank_moved_from_another_model():
    """A bank set by hand on a model is bound to it by attach, also when it was another model's:
    add_prompt then runs this model (it ran the first one: another model's prefix, silently).
    Kills: attach keeping a bank's existing model reference."""
    from prefix_attn.tiny import tiny_model

    torch.manual_seed(0)
    first = tiny_model("llama")
    torch.manual_seed(1)
    second = tiny_model("llama")
    twin = copy.deepcopy(second)
    bank = PrefixBank.attach(first)
    second.prefix_bank = bank
    assert PrefixBank.attach(second) is bank and bank.model is second
    ids = torch.randint(3, 64, (6,), generator=torch.Generator().manual_seed(2))
    bank.add_prompt("p", ids)
    want = PrefixBank.attach(twin)
    want.add_prompt("p", ids)
    torch.testing.assert_close(bank.get("p"), want.get("p"))


@pytest.mark.parametrize("how", ["setattr", "setitem", "register_module"])
def test_a_module_set_in_the_trainable_dict_is_the_entry_s_in_the_bank_and_its_copies(how):
    """A module put in place of an entry's in bank.trainable (PEFT's modules_to_save wraps it
    there) was ignored: the bank computed with the one it was given, so what an optimizer
    stepped never reached the attention. Copies and pickles tell their own bank."""
    import pickle

    bank = PrefixBank(L, HKV, D)
    bank.add_trainable("a.b", LearnedPrefix(4, seed=0))
    bank.add("f", *_kv(2))
    key = bank._module_key("a.b")
    banks = [bank, copy.deepcopy(bank), pickle.loads(pickle.dumps(bank))]
    before = [b.entry_kv("a.b").detach().clone() for b in banks]
    for i, b in enumerate(banks):
        new = LearnedPrefix(4, seed=10 + i)
        if how == "setattr":
            setattr(b.trainable, key, new)
        elif how == "setitem":
            b.trainable[key] = new
        else:
            b.trainable.register_module(key, new)
        torch.testing.assert_close(b.entry_kv("a.b"), new(), rtol=0, atol=0)
        assert b.names() == ["a.b", "f"] and b.is_trainable("a.b")
        for other, was in zip(banks[i + 1:], before[i + 1:]):  # the others unchanged
            torch.testing.assert_close(other.entry_kv("a.b"), was, rtol=0, atol=0)
    b.trainable.x = LearnedPrefix(2)  # a key no entry has: nothing changes
    assert b.names() == ["a.b", "f"]


def test_a_module_of_another_length_set_in_the_trainable_dict_gives_the_entry_its_length():
    """The entry kept its old length (3) while the module set in its place returned 8
    positions: the kernel read 3 of them (logits 0.26 off), and a batch mixing entries failed
    in torch.stack; a module returning no prefix at all was taken and failed in the forward."""
    bank = PrefixBank(L, HKV, D)
    bank.add_trainable("a", LearnedPrefix(3))
    bank.add("f", *_kv(2))
    longer = LearnedPrefix(8, seed=1)
    bank.trainable["a"] = longer
    assert bank.entry_len("a") == 8
    sel = bank.select(["a", "f"])
    torch.testing.assert_close(sel.layer(0)[0][0, :, :8], longer()[0, 0], rtol=0, atol=0)
    assert sel.prefix_lens.tolist() == [8, 2]
    for bad, error in ((nn.Linear(2, 2), TypeError), (LearnedPrefix(3).kv.new_zeros(1), TypeError)):
        with pytest.raises(error):
            bank.trainable["a"] = bad
    with pytest.raises(ValueError, match=r"expected shape \[L=3, 2, Hkv=2, P, D=8\]"):
        bank.trainable["a"] = _BadModule((L, 2, HKV, 3, D + 1))
    assert bank.trainable["a"] is longer and bank.entry_len("a") == 8  # nothing changed


def test_a_bank_pickled_before_its_trainable_dict_reported_replacements_gets_one():
    """A bank pickled with a plain ModuleDict: unpickled, it did not see a module set in place
    of an entry's (PEFT's modules_to_save then trained nothing, silently)."""
    import pickle

    bank = PrefixBank(L, HKV, D)
    bank.add_trainable("a", LearnedPrefix(3))
    bank.trainable.__class__ = nn.ModuleDict  # as pickled before
    del bank.trainable.__dict__["_bank_ref"]
    old = pickle.loads(pickle.dumps(bank))
    new = LearnedPrefix(3, seed=5)
    old.trainable["a"] = new
    torch.testing.assert_close(old.entry_kv("a"), new(), rtol=0, atol=0)


def test_a_move_to_a_dtype_no_bank_holds_keeps_the_bank_s():
    """model.to(torch.float8_e4m3fn) made a float8 bank, which the constructor refuses."""
    bank = _bank(a=3)
    want = bank.entry_kv("a").clone()
    bank.to(torch.float8_e4m3fn)
    assert bank.dtype == torch.float32 and bank.entry_kv("a").dtype == torch.float32
    torch.testing.assert_close(bank.entry_kv("a"), want, rtol=0, atol=0)
    assert bank.to(torch.float16).entry_kv("a").dtype == torch.float16


def test_fixed_values_never_replace_a_trainable_entry(tmp_path):
    """add / load / load_peft under a trainable entry's name made it fixed without a word: its
    parameters were orphaned (an optimizer kept stepping them) and the next backward of a run
    training only it failed with "element 0 of tensors does not require grad"."""
    saved = _bank(t=2, other=1)
    saved.save(str(tmp_path / "bank"))
    bank = _bank(a=1)
    module = LearnedPrefix(2)
    bank.add_trainable("t", module)
    with pytest.raises(ValueError, match=r"add\('t'\): 't' is a trainable prefix.*remove\('t'\)"):
        bank.add("t", *_kv(2))

    class Host(nn.Module):
        def __init__(self):
            super().__init__()
            from types import SimpleNamespace
            self.config = SimpleNamespace(num_hidden_layers=L, num_attention_heads=4,
                                          num_key_value_heads=HKV, hidden_size=4 * D)
            self.prefix_bank = bank

    host = Host()
    bank._model_ref = __import__("weakref").ref(host)
    with pytest.raises(ValueError, match="prefix_bank.safetensors: 't' is a trainable prefix"):
        PrefixBank.load(str(tmp_path / "bank"), host)
    assert bank.names() == ["a", "t"] and bank.is_trainable("t") and bank.trainable["t"] is module
    bank.remove("t")
    bank.add("t", *_kv(2))  # removed first: replaced as asked
    assert bank.kind("t") == "fixed"


def test_module_name_is_the_path_of_a_trainable_entry_s_module():
    bank = _bank(f=1)
    for name in ["support", "train", "a.b", "50%", "keys"]:
        bank.add_trainable(name, LearnedPrefix(1))
        path = bank.module_name(name)
        assert path.startswith("prefix_bank.trainable.")
        assert bank.trainable[path[len("prefix_bank.trainable."):]] is not None
    assert [bank.module_name(n) for n in ["support", "train", "a.b", "50%"]] == [
        "prefix_bank.trainable.support", "prefix_bank.trainable.%train",
        "prefix_bank.trainable.a%2Eb", "prefix_bank.trainable.50%25"]
    with pytest.raises(ValueError, match="'f' is fixed, not trainable"):
        bank.module_name("f")
    with pytest.raises(KeyError, match="unknown prefix 'nope'"):
        bank.module_name("nope")


def test_one_module_under_two_names_saves(tmp_path):
    """Two entries computed by one module returning its parameter: safetensors refused the two
    tensors sharing memory (its advice, save_model, did not apply), leaving an empty folder."""
    class Param(nn.Module):
        def __init__(self):
            super().__init__()
            self.kv = nn.Parameter(torch.randn(L, 2, HKV, 2, D))

        def forward(self):
            return self.kv

    bank = PrefixBank(L, HKV, D)
    shared = Param()
    bank.add_trainable("s1", shared)
    bank.add_trainable("s2", shared)
    bank.save(str(tmp_path / "bank"))
    from prefix_attn import bank_file
    got = bank_file.read(str(tmp_path / "bank"))
    assert got.names == ["s1", "s2"]
    for t in got.tensors:
        torch.testing.assert_close(t, shared.kv.detach(), rtol=0, atol=0)


def test_a_save_that_fails_leaves_no_folder(tmp_path, monkeypatch):
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise RuntimeError("refused")

    monkeypatch.setattr(safetensors.torch, "save", refuse)
    with pytest.raises(RuntimeError, match="refused"):
        _bank(a=1).save(str(tmp_path / "bank"))
    assert not (tmp_path / "bank").exists()


def test_a_bank_file_whose_entry_does_not_fit_its_header_is_refused(tmp_path):
    """The header's dims fit the model but an entry's tensor is of another shape (a file
    edited or written by other code): refused naming the entry, the model left without a
    bank (the entry was added and failed at the first forward). From a mutation audit."""
    from types import SimpleNamespace

    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    _bank(a=4, b=1).save(str(tmp_path))
    path = str(tmp_path / "prefix_bank.safetensors")
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(path)
    tensors["entry_1"] = tensors["entry_1"][:, :, :, :, : D - 1].contiguous()
    save_file(tensors, path, metadata=meta)
    host = nn.Module()
    host.config = SimpleNamespace(num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=HKV,
                                  hidden_size=4 * D)
    with pytest.raises(ValueError, match="entry 'b': expected shape"):
        PrefixBank.load(str(tmp_path), host)
    assert not hasattr(host, "prefix_bank")
