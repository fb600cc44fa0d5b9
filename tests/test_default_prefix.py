"""``bank.default_prefix``: the prefix of calls made without ``prefixes=`` (code that cannot
pass it: a trainer's own sampling and forwards, a pipeline, an evaluation harness)."""
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

import prefix_attn  # noqa: E402
from prefix_attn.bank import PrefixBank  # noqa: E402
from prefix_attn.tiny import tiny_model  # noqa: E402

IDS = torch.tensor([[5, 9, 11, 3, 7], [0, 0, 4, 8, 6]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])


def _model():
    model = tiny_model("llama", seed=0)
    bank = PrefixBank.attach(model)
    g = torch.Generator().manual_seed(1)
    for name, P in (("a", 3), ("b", 5)):
        bank.add(name, *torch.randn(2, bank.num_layers, bank.num_kv_heads, P, bank.head_dim, generator=g))
    return model.eval(), bank


def test_forward_without_prefixes_applies_the_default_and_prefixes_given_win():
    model, bank = _model()
    with torch.no_grad():
        plain = model(IDS, attention_mask=MASK).logits
        with_a = model(IDS, attention_mask=MASK, prefixes="a").logits
        mixed = model(IDS, attention_mask=MASK, prefixes=["b", None]).logits
        bank.default_prefix = "a"
        torch.testing.assert_close(model(IDS, attention_mask=MASK).logits, with_a, rtol=0, atol=0)
        torch.testing.assert_close(model(IDS, attention_mask=MASK, prefixes=["b", None]).logits,
                                   mixed, rtol=0, atol=0)
        torch.testing.assert_close(model(IDS, attention_mask=MASK, prefixes=None).logits, plain,
                                   rtol=0, atol=0)
        bank.default_prefix = None
        torch.testing.assert_close(model(IDS, attention_mask=MASK).logits, plain, rtol=0, atol=0)


@pytest.mark.parametrize("settings", [dict(), dict(num_beams=2, num_return_sequences=2),
                                      dict(do_sample=True, top_k=5)])
def test_generate_without_prefixes_applies_the_default(settings):
    model, bank = _model()
    kw = dict(attention_mask=MASK, max_new_tokens=4, pad_token_id=0, **settings)

    def tokens(**more):
        torch.manual_seed(0)
        return model.generate(IDS, **kw, **more)
    want, plain = tokens(prefixes="b"), tokens()
    bank.default_prefix = "b"
    assert torch.equal(tokens(), want)
    assert torch.equal(tokens(prefixes=None), plain)
    bank.default_prefix = "a"
    assert torch.equal(tokens(), tokens(prefixes=["a", "a"]))


def test_training_with_a_default_prefix_trains_it_without_a_warning():
    model = tiny_model("llama", seed=0)
    prefix = prefix_attn.prefix_tuning(model, 3, name="task")
    model.prefix_bank.default_prefix = "task"
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "a training forward without prefixes="
        loss = model(IDS, attention_mask=MASK, labels=IDS).loss
    loss.backward()
    want = [p.grad.clone() for p in prefix.parameters()]
    model.zero_grad()
    model(IDS, attention_mask=MASK, labels=IDS, prefixes="task").loss.backward()
    for p, g in zip(prefix.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


def test_the_default_must_be_an_entry_and_goes_with_it():
    model, bank = _model()
    with pytest.raises(KeyError, match="'c'"):
        bank.default_prefix = "c"
    with pytest.raises(TypeError):
        bank.default_prefix = 3
    assert bank.default_prefix is None
    bank.default_prefix = "b"
    bank.add("b", *bank.get("a"))  # replaced: still the default
    assert bank.default_prefix == "b"
    bank.remove("b")
    assert bank.default_prefix is None
    with torch.no_grad():  # no prefix, no error
        model(IDS, attention_mask=MASK)
    bank.default_prefix = "a"
    bank.clear()
    assert bank.default_prefix is None


def test_add_prompt_computes_the_prompt_s_own_kv_whatever_the_default():
    """add_prompt's prefill went through the hook, which applied the default prefix to it: the
    stored KV was the prompt's after that prefix (0.66 off), silently."""
    model, bank = _model()
    prompt = torch.tensor([4, 5, 6, 7])
    bank.add_prompt("own", prompt)
    bank.default_prefix = "a"
    bank.add_prompt("with_default", prompt)
    torch.testing.assert_close(bank.entry_kv("with_default"), bank.entry_kv("own"), rtol=0, atol=0)


@pytest.mark.parametrize("where", ["model", "submodule"])
def test_a_generate_call_keeps_the_default_and_entries_it_started_with(where):
    """The default was read at every forward: a default switched (or its entry replaced) by
    another tenant during a generate call changed the prefix mid-answer; and a bank on a
    submodule (a vision-language model's language model) was not pinned at all."""
    from transformers import LogitsProcessor, LogitsProcessorList

    model = tiny_model("llama", seed=0).eval()
    bank = PrefixBank.attach(model if where == "model" else model.model)
    g = torch.Generator().manual_seed(1)
    kv = {n: torch.randn(2, bank.num_layers, bank.num_kv_heads, P, bank.head_dim, generator=g)
          for n, P in (("a", 3), ("b", 5), ("a2", 4))}
    for name in ("a", "b"):
        bank.add(name, *kv[name])

    class SwitchAtStep2(LogitsProcessor):
        def __init__(self):
            self.calls = 0

        def __call__(self, input_ids, scores):
            self.calls += 1
            if self.calls == 2:
                bank.add("a", *kv["a2"])
                bank.default_prefix = "b"
            return scores
    kw = dict(attention_mask=MASK, max_new_tokens=5, pad_token_id=0, do_sample=False)
    want = model.generate(IDS, prefixes="a", **kw)
    bank.default_prefix = "a"
    got = model.generate(IDS, logits_processor=LogitsProcessorList([SwitchAtStep2()]), **kw)
    assert torch.equal(got, want)
    bank.add("a", *kv["a"])
    bank.default_prefix = "a"
    with torch.no_grad(), bank.pinned():  # a forward in a pinned block: the block's default
        before = model(IDS, attention_mask=MASK).logits
        bank.default_prefix = "b"
        torch.testing.assert_close(model(IDS, attention_mask=MASK).logits, before, rtol=0, atol=0)


def test_a_generation_mixin_that_is_no_module_generates():
    """optimum's ONNX Runtime / OpenVINO models are GenerationMixin without nn.Module: the
    wrapped generate looked for a default prefix with model.modules() and failed
    (AttributeError) on every call once prefix_attn was imported."""
    from prefix_attn.hf.generate import _wrap_generate

    class NoModule:
        pass
    generate = _wrap_generate(lambda self, *args, **kwargs: ("ran", args, kwargs))
    assert generate(NoModule(), IDS, max_new_tokens=2) == ("ran", (IDS,), {"max_new_tokens": 2})


def test_setting_the_default_and_removing_its_entry_at_once_stay_consistent(monkeypatch):
    """The setter did not hold the bank's lock: a remove() between its check and its write
    left a default naming no entry, and every later call without prefixes= failed."""
    import threading

    model, bank = _model()
    lookup = bank._lookup
    remover = threading.Thread(target=bank.remove, args=("b",))

    def lookup_then_remove(entries, name):
        found = lookup(entries, name)
        remover.start()
        remover.join(timeout=0.5)  # blocked while the setter holds the lock
        return found
    monkeypatch.setattr(bank, "_lookup", lookup_then_remove)
    bank.default_prefix = "b"
    monkeypatch.undo()
    remover.join()
    assert bank.names() == ["a"] and bank.default_prefix is None


def test_a_compiled_model_follows_the_default():
    """torch.compile(model, fullgraph=True): the default is read outside the graph (a context
    variable's read inside it failed the compile), and a changed default is not served stale."""
    model, bank = _model()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        want = {n: model(IDS, attention_mask=MASK, prefixes=n).logits for n in ("a", "b")}
        for name in ("a", "b", "a"):
            bank.default_prefix = name
            torch.testing.assert_close(compiled(IDS, attention_mask=MASK).logits, want[name])


def test_a_compiled_function_sees_a_default_set_after_its_first_call():
    """The check whether the bank ever had a default read the bank's __dict__, which dynamo does
    not guard: a function compiled before the default was set kept running without a prefix,
    silently (evaluation loops, training steps written as compiled functions)."""
    model, bank = _model()
    step = torch.compile(lambda ids, mask: model(ids, attention_mask=mask).logits, backend="eager")
    with torch.no_grad():
        plain = step(IDS, MASK)
        torch.testing.assert_close(plain, model(IDS, attention_mask=MASK, prefixes=None).logits)
        for name in ("a", "b"):
            bank.default_prefix = name
            torch.testing.assert_close(step(IDS, MASK),
                                       model(IDS, attention_mask=MASK, prefixes=name).logits)


def test_save_keeps_the_default_and_load_sets_it_again(tmp_path):
    """bank.save dropped default_prefix: a bank loaded for a trainer or a pipeline ran every call
    without its prefix, silently."""
    model, bank = _model()
    bank.default_prefix = "b"
    bank.save(str(tmp_path / "with"))
    with torch.no_grad():
        want = model(IDS, attention_mask=MASK).logits
    bank.default_prefix = None
    bank.save(str(tmp_path / "without"))

    fresh = tiny_model("llama", seed=0).eval()
    loaded = PrefixBank.load(str(tmp_path / "with"), fresh)
    assert loaded.default_prefix == "b"
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS, attention_mask=MASK).logits, want, rtol=0, atol=0)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file without a default leaves the bank's as it was
        PrefixBank.load(str(tmp_path / "without"), fresh)
    assert loaded.default_prefix == "b"
    loaded.default_prefix = "a"
    with pytest.warns(UserWarning, match="default_prefix 'a' replaced by the saved 'b'"):
        PrefixBank.load(str(tmp_path / "with"), fresh)
    assert loaded.default_prefix == "b"


def test_a_file_whose_default_names_no_entry_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, bank = _model()
    bank.default_prefix = "a"
    bank.save(str(tmp_path))
    path = str(tmp_path / "prefix_bank.safetensors")
    with safe_open(path, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, path, metadata={**meta, "default_prefix": '"gone"'})
    fresh = tiny_model("llama", seed=0)
    with pytest.raises(ValueError, match="default_prefix 'gone' is not one of the entries"):
        PrefixBank.load(str(tmp_path), fresh)


def test_a_training_forward_after_the_default_is_unset_warns():
    """A bank that had a default, set back to None: a training forward without prefixes=
    applies none and says so, as a bank that never had one (the hook's own path skipped the
    warning). From a mutation audit."""
    model = tiny_model("llama", seed=0)
    prefix_attn.prefix_tuning(model, 3, name="task")
    model.prefix_bank.default_prefix = "task"
    model.prefix_bank.default_prefix = None
    model.train()
    with pytest.warns(UserWarning, match="a training forward without prefixes="):
        model(IDS, attention_mask=MASK, labels=IDS)


def test_using_default_sets_it_for_a_block_and_puts_the_one_before_back():
    """``with bank.using_default(None):`` is PEFT's ``disable_adapter()``: the base model inside,
    the default before after it, also when the block raises; an entry removed inside is not
    put back."""
    model, bank = _model()
    bank.default_prefix = "a"
    with torch.no_grad():
        plain = model(IDS, attention_mask=MASK, prefixes=None).logits
        with_a = model(IDS, attention_mask=MASK, prefixes="a").logits
        with_b = model(IDS, attention_mask=MASK, prefixes="b").logits
        with bank.using_default(None) as same:
            assert same is bank and bank.default_prefix is None
            torch.testing.assert_close(model(IDS, attention_mask=MASK).logits, plain, rtol=0, atol=0)
        assert bank.default_prefix == "a"
        torch.testing.assert_close(model(IDS, attention_mask=MASK).logits, with_a, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="inside"):
            with bank.using_default("b"):
                torch.testing.assert_close(model(IDS, attention_mask=MASK).logits, with_b,
                                           rtol=0, atol=0)
                raise RuntimeError("inside")
        assert bank.default_prefix == "a"
        with pytest.raises(KeyError, match="nope"):
            with bank.using_default("nope"):
                pass
        assert bank.default_prefix == "a"
        with bank.using_default("b"):
            bank.remove("a")
        assert bank.default_prefix is None
