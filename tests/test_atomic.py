"""prefix_attn.atomic: whole-or-nothing writes with the mode a plain open() gives."""
import os
import stat

import pytest

from prefix_attn import atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_follow_the_umask(tmp_path, umask_022):
    atomic.write_text(str(tmp_path / "a.json"), "{}")
    atomic.save_torch({"x": 1}, str(tmp_path / "c.pt"))
    with open(tmp_path / "plain", "w"):
        pass
    assert _mode(tmp_path / "a.json") == _mode(tmp_path / "c.pt") == _mode(tmp_path / "plain") == 0o644


def test_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "f.txt"
    atomic.write_text(str(path), "old")
    with pytest.raises(RuntimeError):
        with atomic.replacing(str(path)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]
    r = atomic.Replacement(str(path))
    r.abort()
    assert os.listdir(tmp_path) == ["f.txt"]


def test_adapter_and_bank_files_are_readable_by_others(tmp_path, umask_022):
    import torch

    from prefix_attn.bank import PrefixBank
    from prefix_attn.peft_format import write_peft_adapter

    write_peft_adapter(str(tmp_path / "ad"), torch.randn(2, 2, 1, 3, 4))
    bank = PrefixBank(2, 1, 4)
    bank.add("a", torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4))
    bank.save(str(tmp_path / "bank"))
    for folder in ("ad", "bank"):
        for name in os.listdir(tmp_path / folder):
            assert _mode(tmp_path / folder / name) == 0o644, (folder, name)


@pytest.mark.hf
def test_the_saved_base_model_is_readable_by_others(tmp_path, umask_022):
    """transformers' save_pretrained writes the weights 0600: a server under another account
    could not read the base model an adapter of prefix-attn train names."""
    from prefix_attn import tiny
    from prefix_attn.train import save_base_model

    save_base_model(tiny.tiny_model("llama"), tiny.ByteTokenizer(), str(tmp_path / "base"))
    names = os.listdir(tmp_path / "base")
    assert "model.safetensors" in names
    assert {name: _mode(tmp_path / "base" / name) for name in names} == {name: 0o644 for name in names}

