"""Files written whole or not at all: a temporary file in the target's folder, then
``os.replace``. The temporary file gets the mode a plain ``open`` would give (0666 less the
umask), not ``mkstemp``'s 0600, so an adapter or an answers file written by one account is
readable by the service that reads it, as any other file of that user."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Replacement:
    """A temporary file ``tmp`` next to ``path``: ``commit()`` moves it onto ``path``,
    ``abort()`` removes it (``path`` is then unchanged)."""

    def __init__(self, path: str, suffix: str = ""):
        self.path = path
        folder = os.path.dirname(os.path.abspath(path))
        fd, self.tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
        try:
            os.fchmod(fd, 0o666 & ~_umask())
        finally:
            os.close(fd)

    def commit(self) -> None:
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


@contextlib.contextmanager
def replacing(path: str, suffix: str = ""):
    """Yield a temporary path next to ``path``; on a clean exit it replaces ``path``, on an
    error it is removed (``path`` is then unchanged)."""
    r = Replacement(path, suffix)
    try:
        yield r.tmp
        r.commit()
    finally:
        r.abort()


def make_folders(folder: str) -> list:
    """``os.makedirs(folder, exist_ok=True)``; returns the folders it made, outermost first (for
    :func:`remove_folders` to take back). A folder another thread or process makes meanwhile is
    used, not an error (two saves into new sibling folders), and is not in the list; on a
    failure the folders made so far are removed again."""
    missing = []
    folder = os.path.abspath(folder)
    while not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    missing.reverse()
    made = []
    try:
        for f in missing:
            try:
                os.mkdir(f)
            except FileExistsError:  # made meanwhile by another save (a thread, a process)
                if not os.path.isdir(f):
                    raise
                continue  # not ours: never removed by remove_folders
            made.append(f)
    except BaseException:
        remove_folders(made)
        raise
    return made


def remove_folders(made: list) -> None:
    """Remove the folders :func:`make_folders` made, innermost first, while they are empty."""
    for folder in reversed(made):
        try:
            os.rmdir(folder)
        except OSError:
            break


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _backup(path: str) -> str:
    """A hidden name in ``path``'s folder holding its current file: a hard link (no copy, no
    disk space: the old weights of a large bank are not read again), a copy where the file
    system has none. Nothing is left behind when it fails (a full disk, a folder at ``path``)."""
    fd, backup = tempfile.mkstemp(prefix=".old-", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        try:
            os.unlink(backup)
            os.link(path, backup)
        except OSError:
            shutil.copy2(path, backup)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(backup)
        raise
    return backup


@contextlib.contextmanager
def _locked(folder: str):
    """An exclusive ``flock`` on ``folder`` itself (no lock file): two saves into one folder,
    from threads or processes, move their files in one after the other, so the folder ends
    with one save's files, not the weights of one beside the config of the other. Yields the
    folder's descriptor (None where there is no flock), for an ``fsync`` of its entries."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield None
        return
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (some network mounts): save unlocked
            pass
        yield fd
    finally:
        os.close(fd)  # releases the lock


def write_files(folder: str, files: dict) -> None:
    """Write ``{name: bytes}`` into ``folder`` as one change: every file goes to a temporary
    file first, and only when all are written are they moved into place, in order; a move that
    fails puts back the files moved before it (their old contents, or none). On any failure the
    folder is left as it was, and folders made for it are removed again: a failed save never
    leaves an adapter of new weights with the old config, nor an empty folder. Saves into one
    folder at once (threads, processes) move their files in one at a time (a lock on the
    folder); a reader that does not lock may still see one file moved and not the next."""
    made = make_folders(folder)
    pending, backups, moved = [], {}, []
    try:
        for name, data in files.items():
            try:
                r = Replacement(os.path.join(folder, name))
            except FileNotFoundError:  # a save that made the folder failed and removed it
                made += make_folders(folder)  # before our first file was in it: make it again
                r = Replacement(os.path.join(folder, name))
            pending.append(r)
            _write_file(r.tmp, data)
        with _locked(folder) as fd:
            try:
                for r in pending:
                    if os.path.exists(r.path):  # kept until every file is in place
                        backups[r.path] = _backup(r.path)
                    r.commit()
                    moved.append(r)
            except BaseException:
                for r in reversed(moved):
                    try:
                        if r.path in backups:
                            os.replace(backups.pop(r.path), r.path)
                        else:
                            os.unlink(r.path)
                    except OSError:
                        pass
                raise
            finally:
                for backup in backups.values():
                    with contextlib.suppress(OSError):
                        os.unlink(backup)
            if fd is not None:  # the renames on disk too, before the save returns
                with contextlib.suppress(OSError):
                    os.fsync(fd)
    except BaseException:
        for r in pending:
            r.abort()
        remove_folders(made)  # empty again: every file moved in was taken out
        raise


def readable_by_others(folder: str) -> None:
    """Give the files directly in ``folder`` the mode a plain ``open`` would (0666 less the
    umask): transformers' ``save_pretrained`` writes weights 0600, which another account
    (a server reading the base model an adapter names) cannot read."""
    mode = 0o666 & ~_umask()
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and not os.path.islink(path):
            os.chmod(path, mode)


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (flushed to disk before the rename)."""
    with replacing(path) as tmp:
        _write_file(tmp, data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def save_torch(obj, path: str) -> None:
    """``torch.save(obj, path)`` atomically. Serialised in memory first: torch's zip writer
    turns a failed write (a full disk) into "[enforce fail at inline_container.cc] unexpected
    pos", where :func:`write_bytes` raises the OSError that says why."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())
