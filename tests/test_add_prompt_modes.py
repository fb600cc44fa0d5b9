"""add_prompt's prefill runs in eval mode; each module's own mode is put back after it."""
import pytest
import torch

from prefix_attn.bank import PrefixBank
from prefix_attn.tiny import tiny_model

pytestmark = pytest.mark.hf


def _bank():
    model = tiny_model("llama", vocab_size=64)
    return model, PrefixBank.attach(model)


@pytest.mark.parametrize("fails", [False, True])
def test_add_prompt_puts_back_each_module_mode(fails):
    """add_prompt on a training model ran model.train() after its prefill (also when the
    prefill raised), turning a submodule the user kept in eval back to training mode."""
    model, bank = _bank()
    model.train()
    model.model.layers[0].eval()
    before = {n: m.training for n, m in model.named_modules()}
    if fails:
        layer = model.model.layers[1]
        layer.forward = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            bank.add_prompt("p", torch.arange(3, 8))
        del layer.forward
        assert "p" not in bank
    else:
        bank.add_prompt("p", torch.arange(3, 8))
    assert {n: m.training for n, m in model.named_modules()} == before
