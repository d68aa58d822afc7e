"""Run manifests, the writer: one record per interpreter under ``HFPATCHES_REPORT`` (read back by
``hfpatches report``: ``_manifest_report.py``).

A training run is many processes (``torchrun`` / ``accelerate launch`` ranks, DataLoader workers,
subprocesses, the launcher itself), all started with the same environment. Each interpreter
writes *its own* record file and only ever rewrites that file, so no process overwrites another's
record:

* ``HFPATCHES_REPORT=DIR/`` (an existing directory, or any value ending in ``/``): records are
  ``DIR/<host>-<pid>-<process start>-<record id>.json``.
* ``HFPATCHES_REPORT=FILE`` (anything else, e.g. ``/logs/hfpatches.json``): records go to the
  directory ``FILE.d/`` beside it, and ``FILE`` itself is a small index naming that directory
  and the command that reads it. The index has the same content whoever writes it, and is only
  written when it is absent: it is never a last-writer-wins summary.

Each write goes to a temporary folder beside the record, then ``os.replace`` (``_atomic``, the
helper ``hfpatches.flair.atomic_save`` uses too): a reader sees the old record or the new one,
never half of one. No locks and no appends, so this holds on a local disk and on a shared
(NFS-like) filesystem written from many hosts. The record id is 64 random bits drawn once per
interpreter: names do not collide across hosts, pid reuse, containers sharing a host name, or
the interpreters one process runs in turn (``os.exec*`` keeps the pid and the process start).
Files are not fsynced (a host crash may lose the last update of that host's records, never
corrupt another's; ``report`` names an unreadable record and skips it). What a writer killed
mid-write left (a temporary folder of a dead pid, older than 10 s) is removed at the next exit
of a process writing there.

The path is resolved (``os.path.realpath``) before anything is written: a symlink is followed,
never replaced; a target that exists but is neither a directory nor a regular file (a device
such as ``/dev/stdout``, a FIFO, a socket) is refused with one WARNING. Any failure to write
(read-only filesystem, a file where a directory should be, ...) is one WARNING naming the path;
training goes on.

When: a record is written when the process's outcomes are first known (``apply()``, also the
``HFPATCHES_AUTO`` start-up one), again only when one of them changes (a deferred patch
attaching on import, a revert, ``status()`` finding that somebody replaced a fix), and once at
exit (the last state, checked by identity, and ``ended``). A forked child that changes state
writes a record of its own; an ``exec``'d interpreter runs its own start-up and writes its own.
The start-up write imports nothing new: no ``json``, ``tempfile``, ``socket``, ``platform`` or
``fcntl`` (the record is serialised by ``_dumps`` below; the host name comes from ``os.uname``).

Record fields (format 2): ``hfpatches_record`` (2), ``id`` (this interpreter's record id),
``pid``, ``ppid`` (the parent at this interpreter's first write, for a fork the forking process:
a child that outlives its parent, e.g. multiprocessing's resource tracker, is re-parented before
its exit write and still names the process that started it), ``host``, ``started`` (process
start, UTC ISO 8601) and ``started_unix``,
``first_written`` (Unix time of this interpreter's first write), ``written``, ``argv0``,
``started_by`` (``"multiprocessing"`` for spawn/forkserver children and multiprocessing helpers,
``"fork"`` for a fork of a recorded process, else null), ``forked_from``, ``rank`` /
``local_rank`` / ``world_size`` and ``rank_source`` (the first launcher convention found,
``_env.RANK_SOURCES``), ``run`` (the launch id it belongs to: SLURM job step, torchelastic run
id, or master address), ``restart`` (torchelastic restart count), ``env`` (the launcher and
``HFPATCHES_*`` variables that were set), ``hfpatches``, ``python``, ``versions``, ``patches``
({id: outcome, reason, target_version, in_range, bug_present}), ``live`` (ids of the fixes live
now, or at exit), ``timeline`` (each change of what is live: ``{"t": seconds since the process
started, "at": UTC time, "live": [ids], "via": "startup" | "apply" | "import" | "revert" |
"check" | "exit"}``, the first entry at the first write; nothing of ours is live before it; at
most ``TIMELINE_KEEP`` entries: the first and the latest), ``timeline_dropped`` (entries left
out) and ``ended`` (``{"how": "exit", "at": ...}`` once the interpreter exited normally; null
while it runs, or when it was killed or ``exec``'d: ``report`` recognises the latter by the
later interpreter's record of the same process).
"""
from __future__ import annotations

import os
import sys

from ._declare import LIBRARIES as _VERSIONED  # (distribution, module): __version__ recorded when imported
from ._env import RANK_SOURCES, RUN_VARS  # the launcher variables, documented there
from ._report import LIVE_OUTCOMES as _LIVE  # the outcome sets, defined once

RECORD_FORMAT = 2


# ----------------------------------------------------------------------------- writing
class Refused(Exception):
    """``HFPATCHES_REPORT`` names something records must not be written to."""


def resolve(raw: str) -> tuple[str, str | None]:
    """``(records directory, index file or None)`` for an ``HFPATCHES_REPORT`` value, symlinks
    resolved. Raises :class:`Refused` for a target that is not a directory or a regular file."""
    import stat

    path = os.path.abspath(os.path.expanduser(raw))
    real = os.path.realpath(path)
    shown = raw if real == path else f"{raw} (resolves to {real})"
    st = _stat(real)
    if st is not None and stat.S_ISDIR(st.st_mode):
        return real, None
    if st is None and raw.endswith(("/", os.sep)):
        return real, None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise Refused(f"{shown} is {_kind(st.st_mode)}, not a directory or a regular file; records are "
                      "files, so nothing is written there. Name a directory (one record per process, "
                      "e.g. /logs/hfpatches/) or a file path (e.g. /logs/hfpatches.json: records in "
                      "/logs/hfpatches.json.d/)")
    records = os.path.realpath(real + ".d")
    rst = _stat(records)
    if rst is not None and not stat.S_ISDIR(rst.st_mode):
        raise Refused(f"the records directory of {shown}, {records}, is {_kind(rst.st_mode)}, not a directory; "
                      "move it away or name a directory in HFPATCHES_REPORT")
    return records, real


def _stat(path: str):
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _kind(mode: int) -> str:
    import stat

    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "not a regular file"


def index_text(index: str) -> str:
    """The index file of the file layout: identical whoever writes it."""
    base = os.path.basename(index)
    return _dumps({"hfpatches_manifest": RECORD_FORMAT, "records": base + ".d",
                   "layout": "one JSON record per process in the records directory",
                   "read_with": f"python -m hfpatches report {index}"}) + "\n"


def write_atomic(path: str, text: str, *, replace: bool = True) -> None:
    """Write ``text`` to ``path`` atomically (``_atomic.replace_atomic``: a temporary folder beside
    it, then a rename). ``replace=False``: create ``path`` only if it does not exist, never
    replace anything. No ``flock`` (``fcntl`` is not imported at start-up): a record write takes
    microseconds, and the clean-up only removes temporaries older than 10 s of a dead pid."""
    from ._atomic import replace_atomic, write_bytes

    data = text.encode("utf-8", "backslashreplace")
    replace_atomic(path, lambda tmp: write_bytes(tmp, data), lock=False, exclusive=not replace)


#: transitions of what is live kept per record: the first and the last ``TIMELINE_KEEP - 1``
TIMELINE_KEEP = 64


class Writer:
    """This interpreter's record: one file, created on the first write and rewritten in place (by
    rename) only when the state changes. Held by the engine; a forked child starts its own, and
    an ``exec``'d interpreter (same pid, fresh memory) writes its own under a new ``id``."""

    def __init__(self) -> None:
        import _thread

        self._lock = _thread.allocate_lock()
        self.pid: int | None = None
        self.id: str | None = None
        self.raw: str | None = None
        self.target: tuple[str, str | None] | None = None
        self.file: str | None = None
        self.started: float | None = None
        self.first: float | None = None
        self.forked_from: int | None = None
        self.ppid: int | None = None
        self.last: tuple | None = None
        self.timeline: list[dict] = []
        self.dropped = 0
        self.ended: dict | None = None
        self.warned: set[str] = set()

    def write(self, report, raw: str, via: str = "apply", end: bool = False) -> str | None:
        """Write the record for ``report`` (a ``Report``: the process's status) under ``raw`` when
        anything changed; ``via``: what changed it (``startup``, ``apply``, ``import``,
        ``revert``, ``check``, ``exit``); ``end``: the interpreter is exiting. Never raises; a
        failure is one WARNING per path. Returns the file."""
        with self._lock:
            try:
                return self._write(report, raw, via, end)
            except Refused as e:
                self._warn(raw, f"hfpatches: HFPATCHES_REPORT={e}")
            except Exception as e:  # never break training because of the manifest
                self._warn(raw, f"hfpatches: could not write the run record for HFPATCHES_REPORT={raw}: "
                                f"{type(e).__name__}: {e}; training goes on without it")
            return None

    def _write(self, report, raw: str, via: str, end: bool) -> str | None:
        import time

        pid = os.getpid()
        if self.pid != pid or self.started is None:
            if self.pid is not None and self.pid != pid:   # a fork of a recorded process: a record of its own
                self.forked_from, self.file, self.last = self.pid, None, None
                self.timeline, self.dropped, self.ended, self.first = [], 0, None, None
            self.pid = pid
            # the parent now, not at each write: by the exit write it may be gone (re-parented)
            self.ppid = self.forked_from if self.forked_from is not None else os.getppid()
            self.id = os.urandom(8).hex()
            self.started = process_start()
        started: float = self.started
        # APPLIED -> ALREADY_APPLIED (a repeated apply()) changes nothing worth a write
        state = tuple((k, "live") if r.outcome in _LIVE else (k, r.outcome, r.reason, r.target_version)
                      for k, r in report.items())
        if state == self.last and raw == self.raw and not end:
            return self.file
        now = time.time()
        live = sorted(k for k, r in report.items() if r.outcome in _LIVE)
        if not self.timeline or self.timeline[-1]["live"] != live:
            self.timeline.append({"t": round(now - started, 3), "at": _iso(now), "live": live, "via": via})
            if len(self.timeline) > TIMELINE_KEEP:   # keep the first (when hfpatches first ran) and the latest
                del self.timeline[1]
                self.dropped += 1
        if end:
            self.ended = {"how": "exit", "at": _iso(now)}
        if raw != self.raw or self.target is None:
            self.raw, self.target, self.file = raw, None, None
            self.target = resolve(raw)
        records, index = self.target
        os.makedirs(records, exist_ok=True)   # also after a log rotation removed it
        if self.file is None:
            if index is not None and not os.path.lexists(index):
                write_atomic(index, index_text(index), replace=False)
            self.first = now
            self.file = os.path.join(records, record_name(host(), pid, started, self.id or ""))
        rec = build_record(report, pid=pid, ppid=self.ppid, started=started, forked_from=self.forked_from)
        rec.update({"id": self.id, "first_written": round(self.first or now, 3), "timeline": self.timeline,
                    "timeline_dropped": self.dropped, "ended": self.ended})
        write_atomic(self.file, _dumps(rec, indent=True) + "\n")
        self.last = state
        if end:   # what writers killed mid-write left here (dead pid, older than 10 s)
            from ._atomic import remove_stale_temporaries

            try:
                remove_stale_temporaries(records)
            except OSError:
                pass
        return self.file

    def _warn(self, raw: str, msg: str) -> None:
        if raw in self.warned:
            return
        self.warned.add(raw)
        import logging  # noqa: F401  (imported here: the WARNING must reach stderr now, not wait)

        from ._log import WARNING, log

        log(WARNING, "%s", msg)


def host() -> str:
    from ._atomic import host_name

    return host_name()


def process_start() -> float:
    """Start time of this process (Unix seconds): on Linux its start in clock ticks after boot
    (/proc/self/stat) placed on the wall clock through CLOCK_BOOTTIME; elsewhere, now."""
    import time

    try:
        with open("/proc/self/stat", "rb") as fh:
            ticks = int(fh.read().rpartition(b")")[2].split()[19])
        boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


def record_name(host_name: str, pid: int, started: float, rid: str = "") -> str:
    """``<host>-<pid>-<process start>-<record id>.json``: unique across hosts, pid reuse and the
    interpreters one process runs in turn (``os.exec*`` keeps pid and start time)."""
    import time

    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in host_name)[:64] or "host"
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started)) + f"{int(started % 1 * 1000):03d}"
    return f"{safe}-{pid}-{stamp}-{rid or os.urandom(8).hex()}.json"


def _iso(t: float) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def launch_info(environ=None) -> dict:
    """rank / local_rank / world_size / rank_source / run / restart / env from the environment."""
    from . import _env

    names = list(dict.fromkeys([v for src in RANK_SOURCES for v in src] + list(RUN_VARS) + list(_env.ALL)))
    env = _env.get_set(names) if environ is None else {k: environ[k] for k in names if k in environ}
    out: dict = {"rank": None, "local_rank": None, "world_size": None, "rank_source": None}
    for rank_var, local_var, size_var in RANK_SOURCES:
        rank = _int(env.get(rank_var))
        if rank is not None:
            out.update(rank=rank, local_rank=_int(env.get(local_var)), world_size=_int(env.get(size_var)),
                       rank_source=rank_var)
            break
    if env.get("SLURM_JOB_ID"):
        run = "slurm:" + env["SLURM_JOB_ID"] + (f".{env['SLURM_STEP_ID']}" if env.get("SLURM_STEP_ID") else "")
    elif env.get("TORCHELASTIC_RUN_ID") and env.get("TORCHELASTIC_RUN_ID") != "none":
        run = "torchelastic:" + env["TORCHELASTIC_RUN_ID"]
    elif env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        run = f"master:{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
    else:
        run = None
    out["run"] = run
    out["restart"] = _int(env.get("TORCHELASTIC_RESTART_COUNT"))
    out["env"] = env
    return out


def _int(value) -> int | None:
    if value is None:
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def _argv0() -> str:
    """``sys.argv[0]``; for ``python -m mod`` while ``mod`` is still being located (its package
    imports run then, e.g. torch for ``-m torch.distributed.run``) ``-m mod`` from ``orig_argv``."""
    first = sys.argv[0] if sys.argv else ""
    orig = getattr(sys, "orig_argv", None) or []
    if first == "-m" and "-m" in orig[:-1]:
        return "-m " + orig[orig.index("-m") + 1]
    return first


def _started_by(forked_from: int | None) -> str | None:
    if forked_from is not None:
        return "fork"
    argv = getattr(sys, "orig_argv", None) or sys.argv
    if "--multiprocessing-fork" in argv or any(a.startswith("from multiprocessing.") for a in argv):
        return "multiprocessing"
    return None


def build_record(report, *, pid: int | None = None, ppid: int | None = None, started: float | None = None,
                 forked_from: int | None = None) -> dict:
    """The record of this process for ``report`` (its ``status()``)."""
    import time

    from ._version import __version__

    versions: dict = {}
    for r in report.values():
        for item in (r.target_version or "").split(", "):
            name, _, ver = item.rpartition(" ")
            if name and ver:
                versions[name] = ver
    for dist, mod in _VERSIONED:
        v = getattr(sys.modules.get(mod), "__version__", None)
        if dist not in versions and isinstance(v, str):
            versions[dist] = v
    now = time.time()
    started = now if started is None else started
    rec = {
        "hfpatches_record": RECORD_FORMAT,
        "pid": os.getpid() if pid is None else pid,
        "ppid": os.getppid() if ppid is None else ppid,
        "host": host(),
        "started": _iso(started),
        "started_unix": round(started, 3),
        "written": _iso(now),
        "argv0": _argv0(),
        "started_by": _started_by(forked_from),
        "forked_from": forked_from,
    }
    rec.update(launch_info())
    rec.update({
        "hfpatches": __version__,
        "python": sys.version.split()[0],
        "versions": versions,
        "patches": {k: r.to_dict() for k, r in report.items()},
        "live": sorted(k for k, r in report.items() if r.outcome in _LIVE),
    })
    return rec


_ESC = {i: f"\\u{i:04x}" for i in range(32)}
_ESC.update({ord("\\"): "\\\\", ord('"'): '\\"', 8: "\\b", 9: "\\t", 10: "\\n", 12: "\\f", 13: "\\r"})


def _dumps(obj, indent: bool = False, _pad: str = "") -> str:
    """JSON for str/int/float/bool/None/list/tuple/dict (string keys): what ``json.dumps`` would
    write, without importing ``json`` (it pulls ``re``: milliseconds of every start-up)."""
    if obj is None:
        return "null"
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    if isinstance(obj, int):
        return str(int(obj))
    if isinstance(obj, float):
        return repr(obj) if obj == obj and obj not in (float("inf"), float("-inf")) else "null"
    if isinstance(obj, str):
        return '"' + str.__str__(obj).translate(_ESC) + '"'
    inner = _pad + "  " if indent else ""
    sep, nl = (",\n", "\n") if indent else (", ", "")
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = sep.join(f"{inner}{_dumps(str(k))}: {_dumps(v, indent, inner)}" for k, v in obj.items())
        return "{" + nl + items + nl + (_pad if indent else "") + "}"
    if isinstance(obj, (list, tuple)):
        if not obj:
            return "[]"
        items = sep.join(f"{inner}{_dumps(v, indent, inner)}" for v in obj)
        return "[" + nl + items + nl + (_pad if indent else "") + "]"
    return _dumps(str(obj))
