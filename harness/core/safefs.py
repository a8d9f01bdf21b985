"""Writing into directories that may come from anyone, without following a symlink they hold.

A run directory, a history checkout or a results root can be handed over (a colleague's results,
a CI artifact, a ``bench-results`` branch) holding symlinks: ``run.json.tmp → ~/.bashrc``,
``results.parquet → a file of yours``, ``logs → /etc``. Every writer of ``bench`` (the store, the
reports, trend, the site, baseline, merge, the worker logs) writes through this module, which
never follows one:

* :func:`check` — no component of the path below the directory the user named (``root``) is a
  symlink (the final one included, when it exists): :class:`UnsafePath` otherwise, one line; the
  writers below take the same ``root`` for the directories they write into (without one, only the
  file itself is guarded: a path the user gave, whose directories are the user's own);
* :func:`write_text`, :func:`write_bytes`, :func:`atomic` — a new file, created with ``O_EXCL`` and
  ``O_NOFOLLOW`` beside the target and renamed over it (a symlink at the target is replaced, never
  written through; a reader never sees half a file);
* :func:`append` — opens with ``O_APPEND | O_NOFOLLOW`` (a symlink there is an error);
* :func:`open_new` — a file truncated and written in place, ``O_NOFOLLOW`` (the worker logs);
* :func:`copy_file` — the source opened with ``O_NOFOLLOW`` and checked to be a regular file (a
  symlink or a FIFO is an error, never its target's content), written as :func:`atomic` does;
* :func:`makedirs` — creates missing directories, refuses a symlink among them;
* :func:`remove` — a file, a symlink (the link itself) or a directory tree, never what a link points at.

The directory the user names (``root``, e.g. ``-o DIR`` or ``--root R``) may itself be a symlink:
that is the user's own choice. Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from harness.core.errors import UserError

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class UnsafePath(UserError, OSError):
    """A path ``bench`` was to write (or copy from) holds a symlink or is not a regular file (one line)."""

    def __str__(self) -> str:  # OSError's str would add the errno
        return self.args[0] if self.args else "unsafe path"


def _components(path: Path, root: Path | None) -> list[Path]:
    """The paths from just below ``root`` down to ``path`` (only ``path`` when ``root`` is None
    or ``path`` is not lexically under it)."""
    path = Path(os.path.abspath(path))
    if root is None:
        return [path]
    root = Path(os.path.abspath(root))
    try:
        rel = path.relative_to(root)
    except ValueError:
        return [path]
    out, cur = [], root
    for part in rel.parts:
        cur = cur / part
        out.append(cur)
    return out


def check(path: str | Path, root: str | Path | None = None) -> Path:
    """``path`` when no component of it below ``root`` (by default: the last one only) is a symlink;
    :class:`UnsafePath` naming the first one that is."""
    for p in _components(Path(path), Path(root) if root is not None else None):
        if p.is_symlink():
            raise UnsafePath(f"{p}: is a symlink; bench writes no file through a symlink "
                             "(a directory from elsewhere may hold one): remove it or choose another directory")
    return Path(path)


def makedirs(path: str | Path, root: str | Path | None = None) -> Path:
    """``path`` and its missing parents as directories, none a symlink below ``root`` (by default:
    ``path`` itself is not one; see :func:`check`)."""
    path = Path(path)
    check(path, root)
    path.mkdir(parents=True, exist_ok=True)
    check(path, root)  # nothing swapped in meanwhile
    return path


@contextlib.contextmanager
def atomic(path: str | Path, mode: str = "w", root: str | Path | None = None,
           perm: int = 0o666) -> Iterator[IO]:
    """A file object for the new content of ``path`` (``mode`` ``"w"``: text, UTF-8; ``"wb"``: bytes):
    a temporary file beside it (``O_EXCL | O_NOFOLLOW``), renamed over ``path`` when the block ends
    without an exception (removed otherwise). The directory's components below ``root`` must not be
    symlinks; a symlink at ``path`` is replaced, not followed."""
    path = Path(path)
    if root is not None:
        check(path.parent, root)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW | CLOEXEC, perm)  # the umask applies
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str, root: str | Path | None = None) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, never through a symlink (:func:`atomic`)."""
    with atomic(path, "w", root) as f:
        f.write(text)
    return Path(path)


def write_bytes(path: str | Path, data: bytes, root: str | Path | None = None) -> Path:
    """Write ``data`` to ``path`` atomically, never through a symlink (:func:`atomic`)."""
    with atomic(path, "wb", root) as f:
        f.write(data)
    return Path(path)


def _open(path: Path, flags: int, what: str) -> int:
    try:
        return os.open(path, flags | NOFOLLOW | CLOEXEC, 0o666)
    except OSError:
        if Path(path).is_symlink():
            raise UnsafePath(f"{path}: is a symlink; bench {what} no file through a symlink "
                             "(a directory from elsewhere may hold one)") from None
        raise


def append(path: str | Path, data: str | bytes, root: str | Path | None = None, *, sync: bool = True) -> None:
    """Append ``data`` to ``path`` (created if missing), flushed and fsync'ed unless not ``sync``;
    never through a symlink (the file, or a directory below ``root``)."""
    path = Path(path)
    if root is not None:
        check(path.parent, root)
    fd = _open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "appends to")
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePath(f"{path}: not a regular file; bench appends only to regular files")
        raw = data.encode("utf-8") if isinstance(data, str) else data
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def open_new(path: str | Path, root: str | Path | None = None) -> IO[bytes]:
    """``path`` opened for writing bytes, created or truncated in place, never through a symlink."""
    path = Path(path)
    if root is not None:
        check(path.parent, root)
    fd = _open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "writes")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePath(f"{path}: not a regular file; bench writes only regular files")
    return os.fdopen(fd, "wb")


def open_regular(path: str | Path) -> IO[bytes]:
    """``path`` opened for reading bytes when it is a regular file and not a symlink; :class:`UnsafePath` otherwise."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | NOFOLLOW | CLOEXEC | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        if path.is_symlink():
            raise UnsafePath(f"{path}: is a symlink; bench copies no symlink (it could point at any "
                             "file of yours)") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePath(f"{path}: not a regular file; bench copies only regular files")
    return os.fdopen(fd, "rb")


def copy_file(src: str | Path, dest: str | Path, root: str | Path | None = None) -> Path:
    """Copy the regular file ``src`` (not a symlink: :class:`UnsafePath`) to ``dest`` atomically, never
    through a symlink at ``dest`` or below ``root``; the modification time is kept."""
    with open_regular(src) as f_in, atomic(dest, "wb", root) as f_out:
        shutil.copyfileobj(f_in, f_out, 1 << 20)
        st = os.fstat(f_in.fileno())
    with contextlib.suppress(OSError):
        os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    return Path(dest)


def remove(path: str | Path) -> None:
    """Remove ``path``: a symlink itself, a file, or a directory tree (whose symlinks are removed as
    links, never followed); nothing when it does not exist."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
