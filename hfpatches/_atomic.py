"""Atomic file replacement, and the clean-up of what a killed writer left behind: one helper for
the run records (``_manifest``) and ``hfpatches.flair.atomic_save`` (a leaf module: ``os`` only at
import; ``fcntl``, ``hashlib``, ``logging`` and ``time`` are imported when they are needed, so the
``HFPATCHES_AUTO`` start-up write imports nothing new).

A write goes to a private hidden folder beside the target (same file system)
``.<name>.<host>.<pid>.<random>.hfpatches-tmp/``, under the target's own file name (torch names a
zip's root folder after the file it writes: saves stay byte-reproducible), then ``os.replace``
puts it in place in one step: a reader sees the old file or the new one, never half of one. On
any failure the temporary is removed. A writer killed outright (SIGKILL, the OOM killer) cannot
clean up; :func:`remove_stale_temporaries` removes such leftovers later, and only provably stale
ones (this host's, that pid not running here, older than 10 s, nobody holding the folder's
``flock``).
"""
from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable

TMP_SUFFIX = ".hfpatches-tmp"
#: a temporary younger than this is never removed (it may be between its creation and its lock)
MIN_STALE_AGE_S = 10.0
#: a temporary written by hfpatches 0.1.0 (a plain file, no host, no lock) must be this old
MIN_STALE_AGE_LEGACY_S = 3600.0
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
_HEX = frozenset("0123456789abcdef")


def host_name() -> str:
    """This host's name (``os.uname``: no ``socket`` import)."""
    try:
        return os.uname().nodename or "localhost"
    except AttributeError:  # pragma: no cover - Windows: no os.uname
        import socket

        return socket.gethostname() or "localhost"


def host_tag() -> str:
    """The host as it appears in a temporary's name: ``[A-Za-z0-9-]``, at most 24 characters
    (a longer or changed name is shortened and given a digest, which keeps hosts apart)."""
    host = host_name()
    tag = "".join(c if c in _HOST_CHARS else "-" for c in host)
    if len(tag) > 24 or tag != host:
        import hashlib

        tag = f"{tag[:16]}-{hashlib.sha1(host.encode()).hexdigest()[:7]}"
    return tag


def temp_name(base: str) -> str:
    short = base.encode()[:96].decode(errors="ignore")  # the folder name stays well under NAME_MAX
    return f".{short}.{host_tag()}.{os.getpid()}.{os.urandom(4).hex()}{TMP_SUFFIX}"


def _parse(name: str) -> tuple[str | None, int] | None:
    """``(host or None for a 0.1.0 plain-file name, pid)`` of one of our temporaries' names,
    None for any other name."""
    if not (name.startswith(".") and name.endswith(TMP_SUFFIX)):
        return None
    parts = name[: -len(TMP_SUFFIX)].rsplit(".", 3)
    if len(parts) == 4 and parts[0].startswith(".") and parts[1] and set(parts[1]) <= _HOST_CHARS:
        host, pid, rand = parts[1], parts[2], parts[3]
    else:
        return None
    if not (pid.isascii() and pid.isdigit() and len(rand) == 8 and set(rand) <= _HEX):
        return None
    return host, int(pid)


def _parse_legacy(name: str) -> int | None:
    if not (name.startswith(".") and name.endswith(TMP_SUFFIX)):
        return None
    parts = name[: -len(TMP_SUFFIX)].rsplit(".", 2)
    if len(parts) != 3 or not parts[0].startswith("."):
        return None
    pid, rand = parts[1], parts[2]
    if not (pid.isascii() and pid.isdigit() and len(rand) == 8 and set(rand) <= _HEX):
        return None
    return int(pid)


def _lock(folder: str) -> int | None:
    """An open descriptor holding an exclusive ``flock`` on ``folder`` (None without fcntl)."""
    try:
        import fcntl
    except ImportError:
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_bytes(path: str, data: bytes, mode: int = 0o644) -> None:
    """Create ``path`` (it must not exist) holding ``data``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def replace_atomic(path: str, write: Callable[[str], object], *, durable: bool = False, lock: bool = True,
                   exclusive: bool = False, clean: bool = False) -> None:
    """``write(tmp_path)`` writes the file; it then replaces ``path`` in one step.

    ``path`` is resolved first (a symlink is replaced at its destination, as a direct write
    would); a target that exists and is not a regular file (a device, a FIFO) is written
    directly, never replaced by a regular file. The temporary gets what ``write`` gives it, or
    the mode of the file it replaces. ``lock``: hold the folder's ``flock`` while writing (so a
    clean-up elsewhere never takes a live write for a stale one; imports ``fcntl``).
    ``exclusive``: create ``path`` only if it does not exist (a hard link, atomic also on NFS;
    where links are not supported, a rename after checking), never replace anything.
    ``clean``: first remove stale temporaries in the folder (never fails the write).
    ``durable``: flush the data (``fdatasync``) and the directory entry (``fsync``) too."""
    import stat

    dest = os.path.realpath(os.fspath(path))
    directory, base = os.path.split(dest)
    try:
        st: os.stat_result | None = os.stat(dest)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        write(dest)  # a device or FIFO: what the caller asked for, exactly as a direct write
        return
    if clean:
        try:  # never fail a write because of someone else's leftovers
            remove_stale_temporaries(directory)
        except OSError:
            pass
    folder = os.path.join(directory, temp_name(base))
    os.mkdir(folder, 0o700)
    fd = _lock(folder) if lock else None
    tmp = os.path.join(folder, base)
    try:
        write(tmp)
        if durable:
            _sync(tmp, data_only=True)
        if st is not None:
            os.chmod(tmp, stat.S_IMODE(st.st_mode))
        if not exclusive:
            os.replace(tmp, dest)
        else:
            try:
                os.link(tmp, dest)
            except FileExistsError:
                pass
            except OSError:   # no hard links on this file system
                if not os.path.lexists(dest):
                    os.replace(tmp, dest)
            if os.path.lexists(tmp):
                os.unlink(tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        try:
            os.rmdir(folder)
        except OSError:
            pass
        if fd is not None:
            os.close(fd)
    if durable:
        try:  # some file systems cannot fsync a directory
            _sync(directory)
        except OSError:
            pass


def pid_running(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process id (os.kill would address a process group): never "dead"
    try:
        os.kill(pid, 0)  # signal 0: existence check only (POSIX)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists (another user's process)
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[str]:
    """Remove what writes killed midway left in ``directory``; return the names removed.

    Only hfpatches' own temporaries (``.<name>.<host>.<pid>.<random>.hfpatches-tmp`` folders),
    and only when every sign says their writer is dead: written on this host (a process id means
    nothing across the hosts of a shared file system), that process id not running here, older
    than 10 s, and nobody holding the folder's ``flock`` (a live locked write holds it for its
    whole run; the kernel drops it when the process dies, whatever pid namespace it ran in). Only
    the files directly inside are removed, then the folder; anything else there is left alone.
    Plain ``.<name>.<pid>.<random>.hfpatches-tmp`` files written by hfpatches 0.1.0 (no host, no
    lock) are removed when their process id is not running here and they were last written more
    than an hour ago. POSIX only (elsewhere nothing is removed)."""
    if os.name != "posix":
        return []
    directory = os.fspath(directory) or "."
    with os.scandir(directory) as it:
        entries = [e for e in it if e.name.endswith(TMP_SUFFIX) and e.name.startswith(".")]
    if not entries:
        return []
    import fcntl
    import time

    host = host_tag()
    now = time.time()
    removed = []
    for e in entries:
        try:
            if e.is_dir(follow_symlinks=False):
                m = _parse(e.name)
                if (m is None or m[0] != host or pid_running(m[1])
                        or now - e.stat(follow_symlinks=False).st_mtime < MIN_STALE_AGE_S):
                    continue
                fd = os.open(e.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_DIRECTORY", 0))
                try:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError:
                        continue  # locked: a live write (another pid namespace, a reused pid)
                    with os.scandir(e.path) as inner:
                        for f in inner:
                            if f.is_file(follow_symlinks=False):
                                os.unlink(f.path)
                    os.rmdir(e.path)  # fails (kept) if anything else is in there
                finally:
                    os.close(fd)
            elif e.is_file(follow_symlinks=False):
                pid = _parse_legacy(e.name)
                if (pid is None or pid_running(pid)
                        or now - e.stat(follow_symlinks=False).st_mtime < MIN_STALE_AGE_LEGACY_S):
                    continue
                os.unlink(e.path)
            else:
                continue
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours to touch
        removed.append(e.name)
        import logging

        logging.getLogger("hfpatches").info("removed %s, left in %s by a save that was killed mid-write",
                                            e.name, directory)
    return removed


def _sync(path: str, data_only: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        (getattr(os, "fdatasync", os.fsync) if data_only else os.fsync)(fd)
    finally:
        os.close(fd)
