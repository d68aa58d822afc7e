"""Run manifests: one record per process under ``HFPATCHES_REPORT``, read back by ``hfpatches report``.

A training run is many processes (``torchrun`` / ``accelerate launch`` ranks, DataLoader workers,
subprocesses, the launcher itself), all started with the same environment. Each one writes *its
own* record file and only ever rewrites that file, so no process overwrites another's record:

* ``HFPATCHES_REPORT=DIR/`` (an existing directory, or any value ending in ``/``): records are
  ``DIR/<host>-<pid>-<start>-<random>.json``.
* ``HFPATCHES_REPORT=FILE`` (anything else, e.g. ``/logs/hfpatches.json``): records go to the
  directory ``FILE.d/`` beside it, and ``FILE`` itself is a small index naming that directory
  and the command that reads it. The index has the same content whoever writes it, and is only
  written when it is absent: it is never a last-writer-wins summary.

Each write goes to a temporary file in the record's own directory, then ``os.replace``: a
reader sees the old record or the new one, never half of one. No locks and no appends, so this
holds on a local disk and on a shared (NFS-like) filesystem written from many hosts; names carry
host, pid, start time and random bits, so they do not collide across hosts or pid reuse. Files
are not fsynced (a host crash may lose the last update of that host's records, never corrupt
another's; ``report`` names an unreadable record and skips it).

The path is resolved (``os.path.realpath``) before anything is written: a symlink is followed,
never replaced; a target that exists but is neither a directory nor a regular file (a device
such as ``/dev/stdout``, a FIFO, a socket) is refused with one WARNING. Any failure to write
(read-only filesystem, a file where a directory should be, ...) is one WARNING naming the path;
training goes on.

When: a record is written when the process's outcomes are first known (``apply()``, also the
``HFPATCHES_AUTO`` start-up one) and again only when one of them changes (a deferred patch
attaching on import, a revert). A forked child that changes state writes a record of its own.
The start-up write imports nothing new: no ``json``, ``tempfile``, ``socket`` or ``platform``
(the record is serialised by ``_dumps`` below; the host name comes from ``os.uname``).

Record fields: ``hfpatches_record`` (format, 1), ``pid``, ``ppid``, ``host``, ``started``
(process start, UTC ISO 8601) and ``started_unix``, ``written``, ``argv0``, ``started_by``
(``"multiprocessing"`` for spawn/forkserver children and multiprocessing helpers, ``"fork"`` for
a fork of a recorded process, else null), ``forked_from``, ``rank`` / ``local_rank`` /
``world_size`` and ``rank_source`` (the first launcher convention found, ``_env.RANK_SOURCES``),
``run`` (the launch it belongs to: SLURM job step, torchelastic run id, or master address),
``restart`` (torchelastic restart count), ``env`` (the launcher and ``HFPATCHES_*`` variables that
were set), ``hfpatches``, ``python``, ``versions``, ``patches`` ({id: outcome, reason,
target_version, in_range, bug_present}) and ``live`` (ids of the fixes live in that process).
"""
from __future__ import annotations

import os
import sys

from ._declare import LIBRARIES as _VERSIONED  # (distribution, module): __version__ recorded when imported
from ._env import RANK_SOURCES, RUN_VARS  # the launcher variables, documented there
from ._report import BAD_OUTCOMES as _BAD, LIVE_OUTCOMES as _LIVE  # the outcome sets, defined once

RECORD_FORMAT = 1


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
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``.
    ``replace=False``: create ``path`` only if it does not exist (a hard link, atomic also on
    NFS; where links are not supported, a rename after checking), never replace anything."""
    directory, base = os.path.split(path)
    tmp = os.path.join(directory, f".{base}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    data = text.encode("utf-8", "backslashreplace")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:   # no hard links on this filesystem
            if not os.path.lexists(path):
                os.replace(tmp, path)
                return
        os.unlink(tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class Writer:
    """This process's record: one file, created on the first write and rewritten in place (by
    rename) only when the state changes. Held by the engine; a forked child starts its own."""

    def __init__(self) -> None:
        import _thread

        self._lock = _thread.allocate_lock()
        self.pid: int | None = None
        self.raw: str | None = None
        self.target: tuple[str, str | None] | None = None
        self.file: str | None = None
        self.started: float | None = None
        self.forked_from: int | None = None
        self.last: tuple | None = None
        self.warned: set[str] = set()

    def write(self, report, raw: str) -> str | None:
        """Write the record for ``report`` (a ``Report``: the process's status) under ``raw`` when
        anything changed. Never raises; a failure is one WARNING per path. Returns the file."""
        with self._lock:
            try:
                return self._write(report, raw)
            except Refused as e:
                self._warn(raw, f"hfpatches: HFPATCHES_REPORT={e}")
            except Exception as e:  # never break training because of the manifest
                self._warn(raw, f"hfpatches: could not write the run record for HFPATCHES_REPORT={raw}: "
                                f"{type(e).__name__}: {e}; training goes on without it")
            return None

    def _write(self, report, raw: str) -> str | None:
        pid = os.getpid()
        if self.pid != pid or self.started is None:
            if self.pid is not None and self.pid != pid:   # a fork of a recorded process: a record of its own
                self.forked_from, self.file, self.last = self.pid, None, None
            self.pid = pid
            self.started = process_start()
        started: float = self.started
        # APPLIED -> ALREADY_APPLIED (a repeated apply()) changes nothing worth a write
        state = tuple((k, "live") if r.outcome in _LIVE else (k, r.outcome, r.reason, r.target_version)
                      for k, r in report.items())
        if state == self.last and raw == self.raw:
            return self.file
        if raw != self.raw or self.target is None:
            self.raw, self.target, self.file = raw, None, None
            self.target = resolve(raw)
        records, index = self.target
        os.makedirs(records, exist_ok=True)   # also after a log rotation removed it
        if self.file is None:
            if index is not None and not os.path.lexists(index):
                write_atomic(index, index_text(index), replace=False)
            self.file = os.path.join(records, record_name(host(), pid, started))
        rec = build_record(report, pid=pid, started=started, forked_from=self.forked_from)
        write_atomic(self.file, _dumps(rec, indent=True) + "\n")
        self.last = state
        return self.file

    def _warn(self, raw: str, msg: str) -> None:
        if raw in self.warned:
            return
        self.warned.add(raw)
        import logging  # noqa: F401  (imported here: the WARNING must reach stderr now, not wait)

        from ._log import WARNING, log

        log(WARNING, "%s", msg)


def host() -> str:
    try:
        return os.uname().nodename or "unknown-host"
    except AttributeError:  # pragma: no cover - Windows: no os.uname
        import socket

        return socket.gethostname() or "unknown-host"


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


def record_name(host_name: str, pid: int, started: float) -> str:
    import time

    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in host_name)[:64] or "host"
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started)) + f"{int(started % 1 * 1000):03d}"
    return f"{safe}-{pid}-{stamp}-{os.urandom(3).hex()}.json"


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


def build_record(report, *, pid: int | None = None, started: float | None = None,
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
        "ppid": os.getppid(),
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


# ----------------------------------------------------------------------------- reading back
class InputError(Exception):
    """The path cannot be read as a manifest at all (exit 2)."""


def _record_files(directory: str) -> list[str]:
    try:
        names = os.listdir(directory)
    except OSError as e:
        raise InputError(f"cannot list {directory}: {e.strerror or e}") from None
    return sorted(n for n in names if n.endswith(".json") and not n.startswith("."))


def load(path: str) -> tuple[list[dict], list[tuple[str, str]], str, list[str]]:
    """Read what ``HFPATCHES_REPORT=path`` wrote: ``(records, unreadable, source, notes)``.

    ``path`` may be the directory, the index file, its ``.d`` directory, or a single record.
    ``unreadable``: ``(file name, why)`` of records that were skipped. Raises :class:`InputError`
    when nothing can be read."""
    import stat

    real = os.path.realpath(os.path.abspath(os.path.expanduser(path)))
    notes: list[str] = []
    try:
        st = os.stat(real)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    if st is None:
        if os.path.isdir(real + ".d"):
            notes.append(f"{path} is missing; reading its records directory {real}.d")
            directory = real + ".d"
        else:
            raise InputError(f"{path}: no such file or directory (nor {path}.d): was HFPATCHES_REPORT "
                             "set to this path for the run?")
    elif stat.S_ISDIR(st.st_mode):
        directory = real
    elif not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path} is {_kind(st.st_mode)}, not a manifest (a directory or a JSON file)")
    else:
        data, err = _read_json(real)
        if err:
            raise InputError(f"{path}: {err}")
        if isinstance(data, dict) and "hfpatches_manifest" in data:
            rel = data.get("records")
            if not isinstance(rel, str) or not rel or os.sep in rel or rel in (".", ".."):
                raise InputError(f"{path}: the index names no valid records directory ({rel!r})")
            directory = os.path.join(os.path.dirname(real), rel)
            if not os.path.isdir(directory):
                raise InputError(f"{path} is an hfpatches index, but its records directory {directory} "
                                 "does not exist (no process wrote a record yet?)")
        elif isinstance(data, dict) and "patches" in data:
            if os.path.isdir(real + ".d"):
                notes.append(f"{path} is a single-process manifest written by an older hfpatches "
                             f"(last writer wins); ignored: reading the per-process records in {real}.d")
                directory = real + ".d"
            else:
                rec, why = normalise(data)
                if rec is None:
                    raise InputError(f"{path}: {why}")
                rec["file"] = os.path.basename(real)
                if "hfpatches_record" not in data:
                    notes.append(f"{path} is a single-process manifest written by an older hfpatches: "
                                 "it holds only the last process that wrote it")
                return [rec], [], path, notes
        else:
            raise InputError(f"{path}: not an hfpatches manifest (no 'hfpatches_manifest' or 'patches' key)")
    records, unreadable = [], []
    for name in _record_files(directory):
        data, err = _read_json(os.path.join(directory, name))
        rec, why = (None, err) if err else normalise(data)
        if rec is None:
            unreadable.append((name, why))
            continue
        rec["file"] = name
        records.append(rec)
    if not records:
        what = f"{len(unreadable)} unreadable record(s)" if unreadable else "no records"
        raise InputError(f"{directory}: {what}" + "".join(f"\n  {n}: {w}" for n, w in unreadable)
                         + ("" if unreadable else " (was HFPATCHES_REPORT set for the run?)"))
    return records, unreadable, directory, notes


def _read_json(file: str):
    import json
    import stat

    try:
        st = os.stat(file)
        if not stat.S_ISREG(st.st_mode):   # a FIFO named *.json would block the read forever
            return None, f"{_kind(st.st_mode)}, not a regular file"
        with open(file, "rb") as fh:
            raw = fh.read(16 * 1024 * 1024 + 1)
    except OSError as e:
        return None, f"cannot read: {e.strerror or e}"
    if len(raw) > 16 * 1024 * 1024:
        return None, "larger than 16 MiB: not a record"
    try:
        return json.loads(raw.decode("utf-8")), None
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 text ({e.reason} at byte {e.start})"
    except ValueError as e:
        return None, f"not valid JSON ({e})" if raw.strip() else "empty file (a write cut short?)"


def normalise(data) -> tuple[dict | None, str]:
    """A checked copy of one record (``None`` and why when it is not a record)."""
    from ._report import Outcome

    if not isinstance(data, dict):
        return None, f"a record is a JSON object, found {type(data).__name__}"
    pid = data.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool):
        return None, f"'pid' must be an integer, found {pid!r}"
    patches = data.get("patches")
    if not isinstance(patches, dict):
        return None, "'patches' must be an object {id: {outcome, reason}}"
    clean = {}
    for k, v in patches.items():
        if not isinstance(v, dict) or v.get("outcome") not in Outcome._ALL:
            return None, f"patch {k!r}: outcome must be one of {', '.join(Outcome._ALL)}, found " \
                         f"{v.get('outcome') if isinstance(v, dict) else v!r}"
        clean[k] = {"outcome": v["outcome"], "reason": str(v.get("reason", ""))}
    live = data.get("live", [])
    if not isinstance(live, list) or not all(isinstance(x, str) for x in live):
        return None, "'live' must be a list of patch ids"
    rec = {"pid": pid, "patches": clean, "live": sorted(live)}
    for key, typ in (("ppid", int), ("rank", int), ("local_rank", int), ("world_size", int),
                     ("restart", int), ("forked_from", int), ("started_unix", (int, float))):
        v = data.get(key)
        rec[key] = v if isinstance(v, typ) and not isinstance(v, bool) else None
    for key in ("host", "started", "argv0", "started_by", "rank_source", "run", "hfpatches", "python"):
        v = data.get(key)
        rec[key] = v if isinstance(v, str) else None
    rec["host"] = rec["host"] or "?"
    versions = data.get("versions")
    rec["versions"] = {k: v for k, v in versions.items() if isinstance(v, str)} if isinstance(versions, dict) else {}
    env = data.get("env")
    rec["env"] = {k: v for k, v in env.items() if isinstance(v, str)} if isinstance(env, dict) else {}
    return rec, ""


def _source_rank(src: str | None) -> int:
    for i, vars_ in enumerate(RANK_SOURCES):
        if src == vars_[0]:
            return i
    return len(RANK_SOURCES)


def analyse(records: list[dict]) -> dict:
    """Roles (rank / child / launcher / process), per-run verdicts and failures.

    Per launch (``run``): the rank processes are the records with a rank from the most specific
    launcher convention seen in that run (``srun torchrun``: torchrun's ``RANK``, not the agents'
    ``SLURM_PROCID``) whose parent is not a record with the same rank on the same host
    (DataLoader workers, multiprocessing helpers and subprocesses inherit ``RANK``). Of
    torchelastic restarts, the latest attempt is judged. The ranks agree when every rank has the
    same fixes live and the same library versions, each rank has exactly one record, and no rank
    of ``range(world_size)`` is missing."""
    by_pid = {(r["host"], r["pid"]): r for r in records}
    for r in records:
        r["role"], r["parent"] = "process", None
        parent = by_pid.get((r["host"], r["ppid"]))
        if parent is not None and parent is not r:
            r["parent"] = parent["pid"]
    runs: dict = {}
    for r in records:
        runs.setdefault(r["run"], []).append(r)
    verdicts = []
    for run, members in runs.items():
        ranked = [r for r in members if r["rank"] is not None]
        if not ranked:
            continue
        best = min(_source_rank(r["rank_source"]) for r in ranked)
        for r in ranked:
            if _source_rank(r["rank_source"]) != best:
                r["role"] = f"launcher ({r['rank_source']}={r['rank']})"
        cands = [r for r in ranked if _source_rank(r["rank_source"]) == best]
        ids = {id(r) for r in cands}
        for r in cands:
            parent = by_pid.get((r["host"], r["ppid"]))
            if parent is not None and parent is not r and id(parent) in ids and parent["rank"] == r["rank"]:
                # inherited RANK: a DataLoader worker, multiprocessing helper or subprocess of the rank
                r["role"] = f"child of {parent['pid']}" + (f" ({r['started_by']})" if r["started_by"] else "")
            else:   # also torch.multiprocessing.spawn'ed ranks: their parent has no rank
                r["role"] = "rank"
        tops = [r for r in cands if r["role"] == "rank"]
        latest = max((r["restart"] or 0) for r in tops) if tops else 0
        for r in tops:
            if (r["restart"] or 0) != latest:
                r["role"] = f"rank, earlier attempt (restart {r['restart'] or 0})"
        verdicts.append(_verdict(run, [r for r in tops if r["role"] == "rank"], latest))
    failures = [f"pid {r['pid']} on {r['host']}" + (f" (rank {r['rank']})" if r["role"] == "rank" else "")
                + f": {k} {p['outcome']}: {p['reason']}"
                for r in records for k, p in sorted(r["patches"].items()) if p["outcome"] in _BAD]
    for r in records:
        if r["role"] == "process" and r["parent"] is not None:
            r["role"] = f"child of {r['parent']}"
    consistent = not failures and all(v["agree"] for v in verdicts)
    return {"runs": verdicts, "failures": failures, "consistent": consistent}


def _verdict(run, ranks: list[dict], restart: int) -> dict:
    problems: list[str] = []
    per: dict = {}
    for r in ranks:
        per.setdefault(r["rank"], []).append(r)
    for rank, rs in sorted(per.items()):
        if len(rs) > 1:
            problems.append(f"rank {rank} recorded by {len(rs)} processes (pids "
                            f"{', '.join(str(r['pid']) for r in rs)}): several launches in one directory? "
                            "use one HFPATCHES_REPORT directory per run")
    sizes = sorted({r["world_size"] for r in ranks if r["world_size"] is not None})
    if len(sizes) > 1:
        problems.append(f"ranks disagree on the world size: {', '.join(map(str, sizes))}")
    if len(sizes) == 1:
        missing = sorted(set(range(sizes[0])) - set(per))
        if missing:
            problems.append(f"no record from rank {', '.join(map(str, missing))} of world size {sizes[0]} "
                            "(HFPATCHES_REPORT or HFPATCHES_AUTO not set there, or its record is unreadable)")
    ids = sorted({k for r in ranks for k in r["live"]})
    for k in ids:
        on = sorted({r["rank"] for r in ranks if k in r["live"]})
        off = [r for r in ranks if k not in r["live"]]
        if off:
            why = "; ".join(f"rank {r['rank']}: {r['patches'].get(k, {}).get('outcome', 'not recorded')}"
                            + (f" ({r['patches'][k]['reason']})" if k in r["patches"] else "")
                            for r in sorted(off, key=lambda r: r["rank"]))
            problems.append(f"mixed code: {k} live on rank {', '.join(map(str, on))}, not on the others ({why})")
    dists = sorted({d for r in ranks for d in r["versions"]})
    for d in dists:
        seen: dict = {}
        for r in ranks:
            if d in r["versions"]:
                seen.setdefault(r["versions"][d], []).append(r["rank"])
        if len(seen) > 1:
            problems.append(f"mixed versions: {d} " + "; ".join(
                f"{v} on rank {', '.join(map(str, sorted(rs)))}" for v, rs in sorted(seen.items())))
    return {"run": run, "restart": restart, "world_size": sizes[0] if len(sizes) == 1 else None,
            "ranks": sorted(per), "live": ids if not problems else None,
            "agree": not problems, "problems": problems}


def report_main(path: str, as_json: bool = False) -> int:
    """``python -m hfpatches report PATH [--json]``: 0 consistent, 1 ranks disagree or a fix
    failed, 2 unreadable input."""
    import json

    try:
        records, unreadable, source, notes = load(path)
    except InputError as e:
        if as_json:
            print(json.dumps({"path": path, "error": str(e), "processes": []}, indent=2))
        print(f"hfpatches report: {e}", file=sys.stderr)
        return 2
    me = (host(), os.getpid())   # under HFPATCHES_AUTO this command wrote a record of its own
    records = [r for r in records if (r["host"], r["pid"]) != me] or records
    result = analyse(records)
    records.sort(key=_order)
    code = 0 if result["consistent"] else 1
    if as_json:
        keys = ("pid", "host", "rank", "local_rank", "world_size", "role", "parent", "run", "restart",
                "argv0", "started", "started_by", "live", "patches", "versions", "env", "file")
        print(json.dumps({"path": path, "source": source, "notes": notes,
                          "processes": [{k: r.get(k) for k in keys} for r in records],
                          "unreadable": [{"file": n, "error": w} for n, w in unreadable],
                          "runs": result["runs"], "failures": result["failures"],
                          "consistent": result["consistent"], "exit_code": code}, indent=2))
        return code
    print(f"hfpatches report: {source} ({len(records)} process record(s)"
          + (f", {len(unreadable)} unreadable" if unreadable else "") + ")")
    for n in notes:
        print(f"note: {n}")
    rows = [("host", "pid", "rank", "role", "argv0", "live", "problems")]
    for r in records:
        bad = [f"{k} {p['outcome']}" for k, p in sorted(r["patches"].items()) if p["outcome"] in _BAD]
        rank = "-" if r["rank"] is None else (f"{r['rank']}/{r['world_size']}" if r["world_size"] else str(r["rank"]))
        rows.append((r["host"], str(r["pid"]), rank, r["role"], os.path.basename(r["argv0"] or "") or "-",
                     ", ".join(r["live"]) or "none", ", ".join(bad) or "-"))
    w = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    print()
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w[j]) for j, c in enumerate(row[:-1])) + "  " + row[-1])
        if i == 0:
            print("  ".join("-" * x for x in w) + "  " + "-" * 8)
    for name, why in unreadable:
        print(f"unreadable record skipped: {name}: {why}")
    print()
    for v in result["runs"]:
        label = f"run {v['run']}" if v["run"] else "ranks without a launch id"
        ranks = ", ".join(map(str, v["ranks"]))
        head = f"{label}: rank {ranks}" + (f" of world size {v['world_size']}" if v["world_size"] else "") \
            + (f", restart {v['restart']}" if v["restart"] else "")
        if v["agree"]:
            print(f"{head}: ranks agree; live on every rank: {', '.join(v['live']) or 'none'}")
        else:
            print(f"{head}: ranks DISAGREE (this run trained with mixed code or is incomplete):")
            for p in v["problems"]:
                print(f"  - {p}")
    if not result["runs"]:
        print("no distributed ranks in these records (no RANK / SLURM_PROCID / MPI rank set): nothing to compare")
    for f in result["failures"]:
        print(f"fix failed: {f}")
    print("verdict: " + ("consistent" if code == 0 else "NOT consistent (exit 1)"))
    return code


def _order(r: dict):
    """Ranks first (by launch, rank), then processes that carry a rank (children, launchers,
    earlier attempts), then the rest."""
    kind = 0 if r["role"] == "rank" else 1 if r["rank"] is not None else 2
    return (kind, str(r["run"] or ""), r["rank"] if r["rank"] is not None else -1, r["host"], r["pid"])
