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


def test_a_backup_that_fails_leaves_no_file(tmp_path):
    """The old file at a name is kept aside (.old-*) until every file is in place: when that
    failed (a full disk while copying it; here a folder at the name) the .old-* file stayed."""
    from prefix_attn import atomic

    (tmp_path / "ad" / "w").mkdir(parents=True)
    with pytest.raises(OSError):
        atomic.write_files(str(tmp_path / "ad"), {"c": b"1", "w": b"2"})
    assert os.listdir(tmp_path / "ad") == ["w"]


def test_the_old_files_are_kept_aside_without_a_copy(tmp_path, monkeypatch):
    """Saving over a bank or an adapter copied each old file first (twice the disk space of a
    large bank, on the full disk the backup is for): a hard link keeps it instead."""
    import shutil

    from prefix_attn import atomic

    folder = str(tmp_path / "bank")
    atomic.write_files(folder, {"w": b"old" * 1000, "c": b"old"})

    def no_copy(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copy2", no_copy)
    monkeypatch.setattr(shutil, "copyfile", no_copy)
    atomic.write_files(folder, {"w": b"new", "c": b"new"})
    assert sorted(os.listdir(folder)) == ["c", "w"] and open(os.path.join(folder, "w"), "rb").read() == b"new"


def _save_many(folder, i, start):
    from prefix_attn import atomic

    start.wait()
    for _ in range(15):
        atomic.write_files(folder, {"w": (b"%d" % i) * 1_000_000, "c": b"%d" % i})


def test_two_processes_saving_one_folder_leave_one_save(tmp_path):
    """Each save moved its weights, then its config, in: two processes saving one adapter
    folder at once ended with the weights of one beside the config of the other (half the runs)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    folder = str(tmp_path / "ad")
    for trial in range(6):
        start = ctx.Barrier(2)
        procs = [ctx.Process(target=_save_many, args=(folder, i, start)) for i in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        assert [p.exitcode for p in procs] == [0, 0]
        with open(os.path.join(folder, "w"), "rb") as f:
            assert f.read(1) == open(os.path.join(folder, "c"), "rb").read()
        assert sorted(os.listdir(folder)) == ["c", "w"]


def test_the_folder_is_synced_after_the_moves(tmp_path, monkeypatch):
    """The files were flushed before their rename, the folder never: after a power loss the
    renames (the new adapter) could be gone though the save had returned."""
    import stat

    from prefix_attn import atomic

    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic.write_files(str(tmp_path / "ad"), {"w": b"1", "c": b"2"})
    assert synced[-1] is True and synced.count(False) == 2


def test_a_folder_that_cannot_be_locked_is_still_written(tmp_path, monkeypatch):
    """A file system without flock (ENOLCK on some network mounts): the save goes on unlocked."""
    import errno
    import fcntl

    from prefix_attn import atomic

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    atomic.write_files(str(tmp_path / "a"), {"x.bin": b"1", "y.json": b"{}"})
    assert (tmp_path / "a" / "x.bin").read_bytes() == b"1"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.bin", "y.json"]
