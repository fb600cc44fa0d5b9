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
