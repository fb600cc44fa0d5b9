"""Saves of several files (a PEFT adapter: weights + config) and of a bank into a folder are
one change: a failure half-way (a full disk, a rename refused) leaves what was there before,
and makes no folder."""
import json
import os

import pytest
import torch

from prefix_attn import peft_format
from prefix_attn.bank import PrefixBank
from prefix_attn.tiny import tiny_model

pytestmark = pytest.mark.hf


def _bank():
    model = tiny_model("llama", vocab_size=64)
    bank = PrefixBank.attach(model)
    g = torch.Generator().manual_seed(0)
    for name, P in (("three", 3), ("four", 4)):
        bank.add(name, *torch.randn(2, bank.num_layers, bank.num_kv_heads, P, bank.head_dim, generator=g))
    return model, bank


def _failing_replace(monkeypatch, ending):
    real = os.replace

    def replace(src, dst, *a, **k):
        if str(dst).endswith(ending):
            raise OSError(28, "No space left on device")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)


def test_save_peft_over_an_adapter_fails_whole(tmp_path, monkeypatch):
    """The weights were replaced, then the config's write failed: the folder held the new
    weights (4 positions) beside the old config (3): neither adapter, and load_peft refused it."""
    model, bank = _bank()
    folder = str(tmp_path / "adapter")
    bank.save_peft("three", folder)
    before = {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}
    _failing_replace(monkeypatch, peft_format.CONFIG_NAME)
    with pytest.raises(OSError, match="No space"):
        bank.save_peft("four", folder)
    monkeypatch.undo()
    assert {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))} == before
    other = PrefixBank.attach(tiny_model("llama", vocab_size=64))
    other.load_peft("x", folder)
    assert torch.equal(other.entry_kv("x"), bank.entry_kv("three"))


@pytest.mark.parametrize("ending", [peft_format.WEIGHTS_NAME, peft_format.CONFIG_NAME])
def test_failed_save_peft_makes_no_folder(tmp_path, monkeypatch, ending):
    _, bank = _bank()
    folder = tmp_path / "new" / "adapter"
    _failing_replace(monkeypatch, ending)
    with pytest.raises(OSError):
        bank.save_peft("three", str(folder))
    assert not (tmp_path / "new").exists()


def test_failed_bank_save_makes_no_folder(tmp_path, monkeypatch):
    _, bank = _bank()
    _failing_replace(monkeypatch, ".safetensors")
    with pytest.raises(OSError):
        bank.save(str(tmp_path / "bank"))
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    bank.save(str(tmp_path / "bank"))
    assert json.loads(json.dumps(os.listdir(tmp_path / "bank"))) == ["prefix_bank.safetensors"]



def test_a_folder_made_meanwhile_by_another_save_is_used(tmp_path, monkeypatch):
    """Two saves into new sibling folders (out/a, out/b) both found out/ missing; the one that
    made it second got FileExistsError and failed (os.makedirs(exist_ok=True) took it before)."""
    from prefix_attn import atomic

    real = os.mkdir

    def mkdir(path, *a, **k):  # another process makes each folder just before this one does
        real(path, *a, **k)
        real(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)
    atomic.write_files(str(tmp_path / "out" / "a"), {"f": b"1"})
    monkeypatch.undo()
    assert (tmp_path / "out" / "a" / "f").read_bytes() == b"1"
    assert atomic.make_folders(str(tmp_path / "out" / "b")) == [str(tmp_path / "out" / "b")]


def test_a_folder_that_cannot_be_made_takes_back_the_ones_made_before_it(tmp_path, monkeypatch):
    from prefix_attn import atomic

    real = os.mkdir

    def mkdir(path, *a, **k):
        if str(path).endswith("deep"):
            raise PermissionError(13, "Permission denied")
        real(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.raises(PermissionError):
        atomic.write_files(str(tmp_path / "new" / "deep"), {"f": b"1"})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []
