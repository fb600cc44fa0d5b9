"""Files written whole or not at all: a temporary file in the target's folder, then
``os.replace``. The temporary file gets the mode a plain ``open`` would give (0666 less the
umask), not ``mkstemp``'s 0600, so an adapter or an answers file written by one account is
readable by the service that reads it, as any other file of that user."""
from __future__ import annotations

import contextlib
import os
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
    """``torch.save(obj, path)`` atomically."""
    import torch

    with replacing(path, suffix=".pt") as tmp:
        torch.save(obj, tmp)
