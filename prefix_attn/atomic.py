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


def write_files(folder: str, files: dict) -> None:
    """Write ``{name: bytes}`` into ``folder`` as one change: every file goes to a temporary
    file first, and only when all are written are they moved into place, in order; a move that
    fails puts back the files moved before it (their old contents, or none). On any failure the
    folder is left as it was, and folders made for it are removed again: a failed save never
    leaves an adapter of new weights with the old config, nor an empty folder."""
    made = make_folders(folder)
    pending, backups, moved = [], {}, []
    try:
        for name, data in files.items():
            r = Replacement(os.path.join(folder, name))
            pending.append(r)
            _write_file(r.tmp, data)
        for r in pending:
            if os.path.exists(r.path):  # kept until every file is in place
                fd, backup = tempfile.mkstemp(prefix=".old-", dir=os.path.dirname(os.path.abspath(r.path)))
                os.close(fd)
                shutil.copy2(r.path, backup)
                backups[r.path] = backup
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
        for r in pending:
            r.abort()
        for backup in backups.values():
            os.unlink(backup)
        remove_folders(made)  # empty again: every file moved in was taken out
        raise
    for backup in backups.values():
        os.unlink(backup)


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
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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
