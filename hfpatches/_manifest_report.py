"""``hfpatches report``: read back the records ``_manifest`` wrote under ``HFPATCHES_REPORT``,
tell the processes' roles apart and judge each launch (the writer is ``_manifest.py``).

Roles: a *rank* is a training process (rank from the most specific launcher convention seen in
its launch); a process whose parent is the rank's process with the same rank is its *child*
(DataLoader workers, multiprocessing helpers, subprocesses); agents with only ``SLURM_PROCID``
under ``srun torchrun`` are *launchers*; a record of an interpreter that a later interpreter of
the same process replaced (``os.exec*``: same host, pid and process start, another record id)
is *replaced by exec*.

Launches: records of one launch id (``run``: SLURM job step, torchelastic run id, master
address) are split into attempts (same restart count, ranks started within
``ATTEMPT_GAP_S`` of each other) and attempts into launches (a launch's attempts have
increasing restart counts; an attempt that does not continue the count starts a new launch).
Each launch is judged on its latest attempt; earlier attempts are shown as such.

A rank is *live throughout* when its timeline shows no fix that stopped being live, and no
fix that went live later than ``LATE_S`` after the process started through ``apply()`` on a
target already imported (a fix attached when its target is imported, or at start-up, is live
before any of its target's code runs). Anything else is a change, and the launch's verdict
says when and why (exit 1).
"""
from __future__ import annotations

import os
import sys

from ._env import RANK_SOURCES
from ._manifest import _iso, _kind
from ._report import BAD_OUTCOMES as _BAD  # the outcome set, defined once

#: ranks of one attempt start within this many seconds of each other
ATTEMPT_GAP_S = 300.0
#: a fix applied (not attached on import) this long after its process started is late
LATE_S = 60.0
#: two records of the same host and pid whose process starts differ by less are one process
_SAME_START_S = 0.05
_VIA = {"startup": "at start-up", "apply": "apply()", "import": "attached on import", "revert": "revert()",
        "check": "found by status()", "exit": "at exit"}


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
                     ("restart", int), ("forked_from", int), ("started_unix", (int, float)),
                     ("first_written", (int, float)), ("timeline_dropped", int)):
        v = data.get(key)
        rec[key] = v if isinstance(v, typ) and not isinstance(v, bool) else None
    for key in ("id", "host", "started", "argv0", "started_by", "rank_source", "run", "hfpatches", "python"):
        v = data.get(key)
        rec[key] = v if isinstance(v, str) else None
    rec["host"] = rec["host"] or "?"
    versions = data.get("versions")
    rec["versions"] = {k: v for k, v in versions.items() if isinstance(v, str)} if isinstance(versions, dict) else {}
    env = data.get("env")
    rec["env"] = {k: v for k, v in env.items() if isinstance(v, str)} if isinstance(env, dict) else {}
    ended = data.get("ended")
    rec["ended"] = {k: str(v) for k, v in ended.items()} if isinstance(ended, dict) else None
    timeline = data.get("timeline")
    if timeline is None:
        rec["timeline"] = None    # written by hfpatches < 0.3: only the last state is known
    else:
        if not isinstance(timeline, list):
            return None, "'timeline' must be a list of {t, at, live, via}"
        steps = []
        for e in timeline:
            t = e.get("t") if isinstance(e, dict) else None
            ids = e.get("live") if isinstance(e, dict) else None
            if (not isinstance(t, (int, float)) or isinstance(t, bool) or not isinstance(ids, list)
                    or not all(isinstance(x, str) for x in ids)):
                return None, f"'timeline' entry {e!r} is not {{t: seconds, live: [ids], via, at}}"
            steps.append({"t": float(t), "at": str(e.get("at", "")), "live": sorted(ids), "via": str(e.get("via", "?"))})
        rec["timeline"] = steps
    rec["timeline_dropped"] = rec["timeline_dropped"] or 0
    return rec, ""


def changes(rec: dict, late: float = LATE_S) -> list[str] | None:
    """Why ``rec``'s fixes were not live throughout (empty: they were; None: the record has no
    timeline, written by an older hfpatches). Nothing of ours is live before the first entry."""
    steps = rec.get("timeline")
    if steps is None:
        return None
    out = []
    if rec.get("timeline_dropped"):
        out.append(f"{rec['timeline_dropped']} earlier changes not kept (a record keeps its first and latest "
                   "changes): cannot tell it was live throughout")
    prev: list[str] = []
    for e in steps:
        gone = [k for k in prev if k not in e["live"]]
        came = [k for k in e["live"] if k not in prev]
        if gone:
            out.append(f"at +{e['t']:.1f} s: {', '.join(gone)} no longer live ({e['via']})")
        if came and e["via"] not in ("startup", "import") and e["t"] > late:
            out.append(f"at +{e['t']:.1f} s: {', '.join(came)} went live ({_VIA.get(e['via'], e['via'])}, on a target "
                       f"already imported, {e['t']:.0f} s after the process started: what ran before ran without it)")
        prev = e["live"]
    return out


def _changed_ids(rec: dict) -> list[str]:
    ids: set[str] = set(rec["live"])
    for e in rec.get("timeline") or ():
        ids.update(e["live"])
    return sorted(ids)


def _source_rank(src: str | None) -> int:
    for i, vars_ in enumerate(RANK_SOURCES):
        if src == vars_[0]:
            return i
    return len(RANK_SOURCES)


def _mark_replaced(records: list[dict]) -> list[dict]:
    """Records of one process by several interpreters (``os.exec*`` keeps the host, pid and
    process start; each interpreter writes its own record under its own id): all but the latest
    are ``replaced by exec``. Returns the records that are a process's current interpreter."""
    groups: dict = {}
    for r in records:
        groups.setdefault((r["host"], r["pid"]), []).append(r)
    current = []
    for rs in groups.values():
        rs.sort(key=lambda r: (r["started_unix"] or 0.0, r["first_written"] or 0.0))
        for i, r in enumerate(rs):
            later = [o for o in rs[i + 1:] if r["started_unix"] is not None and o["started_unix"] is not None
                     and abs(o["started_unix"] - r["started_unix"]) < _SAME_START_S and o["id"] != r["id"]
                     and (o["first_written"] or 0.0) >= (r["first_written"] or 0.0)]
            if later:
                r["role"] = f"replaced by exec (pid {r['pid']} went on in interpreter {(later[-1]['id'] or '?')[:8]})"
                r["superseded_by"] = later[-1]["id"]
            else:
                current.append(r)
    return current


def _launches(tops: list[dict]) -> list[list[list[dict]]]:
    """The rank records of one launch id, as launches, each a list of attempts (oldest first)."""
    attempts: list[dict] = []
    for r in sorted(tops, key=lambda r: (r["started_unix"] is None, r["started_unix"] or 0.0, r["restart"] or 0)):
        k, t = r["restart"] or 0, r["started_unix"]
        for a in reversed(attempts):
            if a["restart"] == k and (t is None or a["last"] is None or t - a["last"] <= ATTEMPT_GAP_S):
                a["members"].append(r)
                a["last"] = t if t is not None else a["last"]
                break
        else:
            attempts.append({"restart": k, "first": t, "last": t, "members": [r]})
    launches: list[list[list[dict]]] = []
    last_restart = None
    for a in attempts:
        if launches and last_restart is not None and a["restart"] > last_restart:
            launches[-1].append(a["members"])
        else:
            launches.append([a["members"]])
        last_restart = a["restart"]
    return launches


def analyse(records: list[dict], late: float = LATE_S) -> dict:
    """Roles (rank / child / launcher / replaced by exec / process), per-launch verdicts and
    failures (see the module docs)."""
    for r in records:
        r["role"], r["parent"], r["superseded_by"] = "process", None, None
        ch = changes(r, late)
        r["changes"] = ch
        r["throughout"] = None if ch is None else not ch
    current = _mark_replaced(records)
    by_pid = {(r["host"], r["pid"]): r for r in current}
    for r in current:
        parent = by_pid.get((r["host"], r["ppid"]))
        if parent is not None and parent is not r:
            r["parent"] = parent["pid"]
    runs: dict = {}
    for r in current:
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
        launches = _launches(tops)
        for attempts in launches:
            for earlier in attempts[:-1]:
                for r in earlier:
                    r["role"] = f"rank, earlier attempt (restart {r['restart'] or 0})"
            latest = attempts[-1]
            starts = [r["started_unix"] for a in attempts for r in a if r["started_unix"] is not None]
            v = _verdict(run, latest, latest[0]["restart"] or 0)
            v["launch_started"] = _iso(min(starts)) if starts else None
            for a in attempts:
                for r in a:
                    r["launch"] = min(starts) if starts else 0.0
            v["attempts"] = len(attempts)
            v["launches_in_run"] = len(launches)
            verdicts.append(v)
    failures = [f"pid {r['pid']} on {r['host']}" + (f" (rank {r['rank']})" if r["role"] == "rank" else "")
                + f": {k} {p['outcome']}: {p['reason']}"
                for r in records for k, p in sorted(r["patches"].items()) if p["outcome"] in _BAD]
    for r in current:
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
    bad_ranks = sorted(k for k in per if k < 0)
    if bad_ranks:
        problems.append(f"rank {', '.join(map(str, bad_ranks))} is not a rank (ranks count from 0)")
    sizes = sorted({r["world_size"] for r in ranks if r["world_size"] is not None})
    if len(sizes) > 1:
        problems.append(f"ranks disagree on the world size: {', '.join(map(str, sizes))}")
    for s in sizes:
        if s <= 0:
            problems.append(f"world size {s} is not a world size (a run has at least one process)")
    if len(sizes) == 1 and sizes[0] > 0:
        beyond = sorted(k for k in per if k >= sizes[0])
        if beyond:
            problems.append(f"rank {', '.join(map(str, beyond))} is outside world size {sizes[0]} "
                            f"(its ranks are 0..{sizes[0] - 1}): these records are not one run")
        missing = sorted(set(range(sizes[0])) - set(per))
        if missing:
            problems.append(f"no record from rank {', '.join(map(str, missing))} of world size {sizes[0]} "
                            "(HFPATCHES_REPORT or HFPATCHES_AUTO not set there, or its record is unreadable)")
    elif not sizes and per and max(per) >= 0:
        missing = sorted(set(range(max(per) + 1)) - set(per))
        if missing:
            problems.append(f"no record from rank {', '.join(map(str, missing))} (no world size recorded; "
                            f"ranks up to {max(per)} seen)")
    ids = sorted({k for r in ranks for k in r["live"]})
    for k in ids:
        on = sorted({r["rank"] for r in ranks if k in r["live"]})
        off = [r for r in ranks if k not in r["live"]]
        if off:
            why = "; ".join(f"rank {r['rank']}: {r['patches'].get(k, {}).get('outcome', 'not recorded')}"
                            + (f" ({r['patches'][k]['reason']})" if k in r["patches"] else "")
                            for r in sorted(off, key=lambda r: r["rank"]))
            problems.append(f"mixed code: {k} live on rank {', '.join(map(str, on))}, not on the others ({why})")
    for r in sorted(ranks, key=lambda r: r["rank"]):
        if r["changes"]:
            problems.append(f"rank {r['rank']}: {', '.join(_changed_ids(r)) or 'its fixes'} not live throughout: "
                            + "; ".join(r["changes"]))
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
            "throughout": all(r["throughout"] for r in ranks),
            "ranks": sorted(per), "live": ids if not problems else None,
            "agree": not problems, "problems": problems}


def _own_record_id() -> str | None:
    """The id of the record this process wrote itself (under ``HFPATCHES_AUTO`` the report
    command is a recorded process too); None when it wrote none."""
    engine = sys.modules.get("hfpatches._engine")
    writer = getattr(getattr(engine, "ENGINE", None), "manifest", None)
    if writer is None or getattr(writer, "pid", None) != os.getpid():
        return None
    return getattr(writer, "id", None)


def report_main(path: str, as_json: bool = False) -> int:
    """``python -m hfpatches report PATH [--json]``: 0 consistent, 1 ranks disagree, a rank's
    fixes were not live throughout, or a fix failed; 2 unreadable input."""
    import json

    try:
        records, unreadable, source, notes = load(path)
    except InputError as e:
        if as_json:
            print(json.dumps({"path": path, "error": str(e), "processes": []}, indent=2))
        print(f"hfpatches report: {e}", file=sys.stderr)
        return 2
    me = _own_record_id()   # skip only this command's own record, by its unique id
    if me is not None:
        records = [r for r in records if r["id"] != me] or records
    result = analyse(records)
    records.sort(key=_order)
    code = 0 if result["consistent"] else 1
    if as_json:
        keys = ("pid", "host", "id", "rank", "local_rank", "world_size", "role", "parent", "run", "restart",
                "argv0", "started", "started_by", "live", "throughout", "changes", "timeline", "ended",
                "superseded_by", "patches", "versions", "env", "file")
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
    rows = [("host", "pid", "rank", "role", "argv0", "live", "timeline", "problems")]
    for r in records:
        bad = [f"{k} {p['outcome']}" for k, p in sorted(r["patches"].items()) if p["outcome"] in _BAD]
        rank = "-" if r["rank"] is None else (f"{r['rank']}/{r['world_size']}" if r["world_size"] else str(r["rank"]))
        tl = "-" if r["throughout"] is None else "throughout" if r["throughout"] else "CHANGED"
        rows.append((r["host"], str(r["pid"]), rank, r["role"], os.path.basename(r["argv0"] or "") or "-",
                     ", ".join(r["live"]) or "none", tl, ", ".join(bad) or "-"))
    w = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    print()
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w[j]) for j, c in enumerate(row[:-1])) + "  " + row[-1])
        if i == 0:
            print("  ".join("-" * x for x in w) + "  " + "-" * 8)
    for name, why in unreadable:
        print(f"unreadable record skipped: {name}: {why}")
    print()
    for r in records:
        if r["changes"] and r["role"] != "rank":
            print(f"note: pid {r['pid']} on {r['host']} ({r['role']}): not live throughout: {'; '.join(r['changes'])}")
    for v in result["runs"]:
        label = f"run {v['run']}" if v["run"] else "ranks without a launch id"
        if v["launches_in_run"] > 1:
            label += f", launch started {v['launch_started']}"
        ranks = ", ".join(map(str, v["ranks"]))
        head = f"{label}: rank {ranks}" + (f" of world size {v['world_size']}" if v["world_size"] else "") \
            + (f", restart {v['restart']}" if v["restart"] else "")
        if v["agree"]:
            print(f"{head}: ranks agree; live on every rank: {', '.join(v['live']) or 'none'}"
                  + (", throughout" if v["live"] and v["throughout"] else ""))
        else:
            print(f"{head}: ranks DISAGREE (this run trained with mixed code, changed code mid-run, or is incomplete):")
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
    return (kind, str(r["run"] or ""), r.get("launch") or 0.0, r["rank"] if r["rank"] is not None else -1,
            r["host"], r["pid"], r["started_unix"] or 0.0)
