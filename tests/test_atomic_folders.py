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


def test_a_relative_folder_is_made_and_taken_back(tmp_path, monkeypatch):
    """A relative path (save_peft("x", "out/adapter") from the working folder): make_folders
    walks up to an existing folder; without the absolute path it reached "" and never ended."""
    from prefix_attn import atomic

    monkeypatch.chdir(tmp_path)
    real, looked = os.path.exists, []

    def exists(path):  # fails the test instead of hanging it
        looked.append(path)
        assert len(looked) < 50, "make_folders does not end"
        return real(path)

    monkeypatch.setattr(os.path, "exists", exists)
    assert atomic.make_folders(os.path.join("new", "deep")) == [str(tmp_path / "new"),
                                                                str(tmp_path / "new" / "deep")]
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    atomic.write_files(os.path.join("out", "ad"), {"f": b"1"})
    assert (tmp_path / "out" / "ad" / "f").read_bytes() == b"1"


def test_a_failed_save_keeps_a_folder_another_save_made(tmp_path, monkeypatch):
    """A folder another save made meanwhile is not this save's: a failure here must not remove
    it (empty until the other save moves its files in, which then fail)."""
    from prefix_attn import atomic

    real = os.mkdir

    def mkdir(path, *a, **k):  # another process makes each folder just before this one does
        real(path, *a, **k)
        real(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)
    _failing_replace(monkeypatch, "f")
    with pytest.raises(OSError, match="No space"):
        atomic.write_files(str(tmp_path / "out" / "a"), {"f": b"1"})
    monkeypatch.undo()
    assert (tmp_path / "out" / "a").is_dir() and os.listdir(tmp_path / "out" / "a") == []


def test_a_folder_another_save_made_and_took_back_is_made_again(tmp_path, monkeypatch):
    """The other side of the race above: this save found the folder another save had made; that
    save failed and removed it (still empty) before this one's first file was in it. This save
    failed with FileNotFoundError; now it makes the folder again (and takes it back on failure)."""
    from prefix_attn import atomic

    real = os.mkdir

    def mkdir(path, *a, **k):  # the other save makes the folder first...
        real(path, *a, **k)
        real(path, *a, **k)

    real_make, calls = atomic.make_folders, []

    def make_folders(folder):
        found = real_make(folder)
        calls.append(folder)
        if len(calls) == 1:  # ...and, failing, removes it again
            os.rmdir(folder)
        return found

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(atomic, "make_folders", make_folders)
    target = tmp_path / "out" / "a"
    atomic.write_files(str(target), {"f": b"1", "g": b"2"})
    assert (target / "f").read_bytes() == b"1" and (target / "g").read_bytes() == b"2"
    os.unlink(target / "f"), os.unlink(target / "g"), os.rmdir(target)
    calls.clear()
    monkeypatch.setattr(os, "mkdir", real)  # this time the first making is this save's own
    _failing_replace(monkeypatch, "g")
    with pytest.raises(OSError, match="No space"):
        atomic.write_files(str(target), {"f": b"1", "g": b"2"})
    assert not target.exists()  # the folder this save made again is taken back


def test_a_file_that_cannot_be_written_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A full disk while writing the second file's bytes: every temporary file is removed, the
    one being written too, and the folder made for the save."""
    from prefix_attn import atomic

    real, calls = atomic._write_file, []

    def write(path, data):
        calls.append(path)
        with open(path, "wb") as f:
            f.write(data[:1])
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(atomic, "_write_file", write)
    with pytest.raises(OSError, match="No space"):
        atomic.write_files(str(tmp_path / "new" / "ad"), {"w": b"12", "c": b"34"})
    assert os.listdir(tmp_path) == []


def _no_hard_links(monkeypatch):
    def link(*a, **k):  # a file system without hard links (FAT, some FUSE mounts)
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", link)


def test_without_hard_links_a_failed_save_still_puts_the_old_files_back(tmp_path, monkeypatch):
    from prefix_attn import atomic

    folder = str(tmp_path / "ad")
    atomic.write_files(folder, {"w": b"old w", "c": b"old c"})
    _no_hard_links(monkeypatch)
    _failing_replace(monkeypatch, os.sep + "c")
    with pytest.raises(OSError, match="No space"):
        atomic.write_files(folder, {"w": b"new w", "c": b"new c"})
    monkeypatch.undo()
    assert {n: open(os.path.join(folder, n), "rb").read() for n in os.listdir(folder)} == {
        "w": b"old w", "c": b"old c"}


def test_a_copy_of_the_old_file_that_fails_half_way_leaves_no_file(tmp_path, monkeypatch):
    """No hard links, and the copy that keeps the old file aside fills the disk half-way: the
    half-written .old-* file was left in the folder (the space the next save needs)."""
    import shutil

    from prefix_attn import atomic

    folder = str(tmp_path / "ad")
    atomic.write_files(folder, {"w": b"old" * 1000})
    _no_hard_links(monkeypatch)

    def copy2(src, dst, *a, **k):
        with open(dst, "wb") as f:
            f.write(b"o")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copy2", copy2)
    with pytest.raises(OSError, match="No space"):
        atomic.write_files(folder, {"w": b"new"})
    monkeypatch.undo()
    assert os.listdir(folder) == ["w"] and open(os.path.join(folder, "w"), "rb").read() == b"old" * 1000


def test_a_save_waits_for_the_lock_on_its_folder(tmp_path):
    """Deterministic form of the two-process test: while another holds the folder's flock, a
    save writes its temporary files but moves nothing in."""
    import fcntl
    import threading

    from prefix_attn import atomic

    folder = str(tmp_path / "ad")
    atomic.write_files(folder, {"w": b"old"})
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        t = threading.Thread(target=atomic.write_files, args=(folder, {"w": b"new"}))
        t.start()
        t.join(0.5)
        assert t.is_alive() and open(os.path.join(folder, "w"), "rb").read() == b"old"
    finally:
        os.close(fd)  # releases the lock
    t.join(10)
    assert open(os.path.join(folder, "w"), "rb").read() == b"new"


def test_a_folder_that_cannot_be_opened_is_still_written(tmp_path, monkeypatch):
    """A folder with write but no read permission (a drop box, mode 0o333): it cannot be opened
    to lock it; the save goes on unlocked."""
    from prefix_attn import atomic

    folder = str(tmp_path / "ad")
    os.mkdir(folder)
    real = os.open

    def no_read(path, flags, *a, **k):
        if os.fspath(path) == folder:
            raise PermissionError(13, "Permission denied")
        return real(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", no_read)
    atomic.write_files(folder, {"w": b"1"})
    monkeypatch.undo()
    assert open(os.path.join(folder, "w"), "rb").read() == b"1"


def test_save_peft_moves_the_weights_in_before_the_config(tmp_path, monkeypatch):
    """A reader that does not lock (PEFT's from_pretrained) and finds the new config finds the
    new weights too: the config is moved in last."""
    _, bank = _bank()
    real, moved = os.replace, []

    def replace(src, dst, *a, **k):
        moved.append(os.path.basename(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    bank.save_peft("three", str(tmp_path / "ad"))
    assert moved == [peft_format.CARD_NAME, peft_format.WEIGHTS_NAME, peft_format.CONFIG_NAME]


def test_a_folder_made_again_is_taken_back_with_the_one_this_save_made_above_it(tmp_path, monkeypatch):
    """(Added by the mutation audit.) This save made out/; another save made out/a/ just before
    this one could, then failed and removed it before this save's first file was in it; this
    save made it again. A failure now takes back both out/a/ and out/: the folders made before
    the making again are not forgotten."""
    from prefix_attn import atomic

    target = tmp_path / "out" / "a"
    real_mkdir, real_make, calls = os.mkdir, atomic.make_folders, []

    def mkdir(path, *a, **k):
        if str(path) == str(target) and not calls:  # the other save makes out/a/ first
            real_mkdir(path, *a, **k)
        real_mkdir(path, *a, **k)

    def make_folders(folder):
        made = real_make(folder)
        calls.append(list(made))
        if len(calls) == 1:  # ...and, failing, removes it again
            os.rmdir(folder)
        return made

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(atomic, "make_folders", make_folders)
    _failing_replace(monkeypatch, "g")
    with pytest.raises(OSError, match="No space"):
        atomic.write_files(str(target), {"f": b"1", "g": b"2"})
    assert calls == [[str(tmp_path / "out")], [str(target)]]
    assert list(tmp_path.iterdir()) == []
