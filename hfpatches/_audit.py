"""``python -m hfpatches audit FILE...``: judge a pin set offline, before anything is installed.

For every registered patch the answer is one of:

* ``affected``: every package the patch needs is pinned inside its ``requires`` range; hfpatches
  fixes the bug at run time (the probe still has the last word there).
* ``not-affected``: a package it needs is pinned outside the range (``fixed_in`` says where
  upstream fixed it, when it did).
* ``not-pinned``: a package it needs is not in the set.
* ``unknown``: pinned loosely (``>=``, ``~=``, a wildcard, a bare name), by a direct URL or local
  tree, by conflicting pins, or to a version that does not parse; the reason says which.

A patch with several ``requires`` lines (meta_buffers: torch and transformers) is affected only
when every one is in range; one pinned outside its range makes it not-affected, else a missing one
makes it not-pinned, else a loose one unknown. The row's ``package``/``pinned`` list each package.

The ranges are the ones the engine checks (``Patch.requires`` / ``Patch.fixed_in`` from the
registry): one source of truth. Nothing of the stack is imported; only ``packaging`` and, for lock
files, ``tomllib`` (Python >= 3.11; ``tomli`` is used where it is installed on older Pythons).

Inputs (detected by file name, then by content):

* requirements / constraints files and ``pip freeze`` output (``-`` reads stdin): ``name==version``
  with extras and environment markers, comments, ``\\`` continuations, ``${VAR}`` expansion,
  ``--hash`` and the other pip options, ``-r``/``-c`` includes (relative to the including file;
  each file is read once, so cycles and diamonds are harmless), ``-e`` and direct references
  (reported ``unknown``). A constraint counts as a pin: it fixes the version a package gets if
  anything installs it. Local version labels (``2.13.0+cpu``) compare as their release.
* lock files ``uv.lock``, ``poetry.lock``, ``pylock.toml`` / ``pylock.NAME.toml`` (PEP 751).

Environment markers are evaluated against the running interpreter (its Python version, platform,
machine, ...), as pip would when installing from the same file here; ``--marker-env NAME=VALUE``
evaluates them for another target (e.g. ``--marker-env sys_platform=linux``). An entry whose
marker is false does not count, and the reason of a patch that ends ``not-pinned`` because of it
names the skipped entry and its marker. In lock files the per-package markers are evaluated
(uv ``resolution-markers``, poetry ``markers``, pylock ``marker``); dependency edges are not
followed: a package listed in a lock file counts as pinned.
"""
from __future__ import annotations

import re
import sys
from typing import Any

from . import _ranges
from ._pins import AuditError, PinSet, _canon, marker_environment, read_inputs

STATUSES = ("affected", "not-affected", "not-pinned", "unknown")

__all__ = ["STATUSES", "AuditError", "PinSet", "marker_environment", "read_inputs", "audit", "main"]


# ----------------------------------------------------------------------------- judging
class _Resolved:
    """What the inputs say about one package: kind in exact/loose/any/direct/bad/marker/conflict/none."""

    __slots__ = ("kind", "version", "shown", "why", "sources")

    def __init__(self, kind, shown=None, version=None, why="", sources=()):
        self.kind, self.shown, self.version, self.why, self.sources = kind, shown, version, why, tuple(sources)


def _resolve(ps: PinSet, name: str) -> _Resolved:
    pins = ps.pins.get(name, [])
    if not pins:
        skipped = ps.skipped.get(name, [])
        why = "; ".join(f"{p.text!r} at {p.source} skipped: its marker {m!r} is false for this environment"
                        for p, m in skipped)
        return _Resolved("none", why=why)
    srcs = [p.source for p in pins]
    for kind in ("bad", "marker"):
        for p in pins:
            if p.kind == kind:
                return _Resolved(kind, p.version and str(p.version) or p.text, why=f"{p.source}: {p.why}",
                                 sources=srcs)
    exact = [p for p in pins if p.kind == "exact"]
    releases = {str(_ranges.release(p.version)) for p in exact}
    if len(releases) > 1:
        return _Resolved("conflict", " / ".join(str(p.version) for p in exact),
                         why="conflicting pins: " + ", ".join(f"{p.text!r} ({p.source})" for p in exact),
                         sources=srcs)
    if exact:
        v = exact[0].version
        for p in pins:
            if p.spec is not None and not p.spec.contains(v, prereleases=True):
                return _Resolved("conflict", str(v), sources=srcs,
                                 why=f"{exact[0].text!r} ({exact[0].source}) contradicts {p.text!r} ({p.source})")
        return _Resolved("exact", str(v), version=v, sources=srcs)
    direct = [p for p in pins if p.kind == "direct"]
    if direct:
        return _Resolved("direct", "direct", why=f"{direct[0].source}: {direct[0].why}", sources=srcs)
    loose = [p for p in pins if p.kind == "loose"]
    if loose:
        from packaging.specifiers import SpecifierSet

        spec = SpecifierSet(",".join(str(p.spec) for p in loose))
        return _Resolved("loose", str(spec), sources=srcs,
                         why=f"pinned loosely ({'; '.join(f'{p.text!r} at {p.source}' for p in loose)}): "
                             "any version in the range may be installed; pin it with == to judge")
    return _Resolved("any", "any", sources=srcs,
                     why=f"no version pinned ({pins[0].text!r} at {pins[0].source}); pin it with == to judge")


def _declared_spec(line: str) -> str:
    """The version part of a ``requires`` line as declared (packaging would reorder it)."""
    m = re.match(r"^\s*[A-Za-z0-9._-]+\s*(?:\[[^\]]*\])?\s*([^;]*)", line)
    return m.group(1).strip() if m else ""


def _judge_line(ps: PinSet, line: str) -> dict:
    """One ``requires`` line against the pin set (the engine's judge: :mod:`hfpatches._ranges`)."""
    req = _ranges.requirement(line)
    name = _canon(req.name)
    spec = req.specifier
    r = _resolve(ps, name)
    shown_spec = _declared_spec(line)
    out = {"package": req.name, "pinned": r.shown, "range": shown_spec or "any version",
           "sources": list(r.sources)}
    if _ranges.marker_holds(req, ps.env) is False:
        return {**out, "status": "ignored", "reason": f"the requirement's marker {str(req.marker)!r} is false here"}
    if r.kind == "none":
        why = f"{req.name} is not in the pin set" + (f" ({r.why})" if r.why else "")
        return {**out, "status": "not-pinned", "reason": why}
    if r.kind == "exact":
        v = _ranges.release(r.version)
        local = f" (compared as {v})" if r.version.local else ""
        if _ranges.judge(line, r.version, ps.env) == _ranges.IN:
            return {**out, "status": "affected", "reason": f"{req.name} {r.shown}{local} is in the affected range"
                                                           + (f" {shown_spec}" if shown_spec else " (every version)")}
        return {**out, "status": "not-affected",
                "reason": f"{req.name} {r.shown}{local} is outside the affected range {shown_spec}"}
    if not str(spec) and r.kind in ("loose", "any", "direct"):
        return {**out, "status": "affected",
                "reason": f"every {req.name} version is in the affected range ({req.name} {r.shown})"}
    return {**out, "status": "unknown", "reason": r.why}


def _fixed_note(ps: PinSet, entry: Any) -> str:
    """``fixed in X`` (or ``removed in X``) when the pin is at/after it; otherwise the pin predates the bug."""
    from packaging.requirements import InvalidRequirement, Requirement

    word = getattr(entry, "fix_word", "fixed")
    try:
        req = Requirement(entry.fixed_in)
    except InvalidRequirement:
        return f"{word} in {entry.fixed_in}"
    r = _resolve(ps, _canon(req.name))
    if r.kind == "exact" and not req.specifier.contains(_ranges.release(r.version), prereleases=True):
        return f"older than the affected range (upstream {word} it in {entry.fixed_in})"
    return f"{word} in {entry.fixed_in}"


def _patches() -> dict:
    """The registered patches: the same declarations the engine checks (one source of truth)."""
    from ._registry import registry

    return registry()


def _advisories() -> dict:
    from ._registry import advisories

    return advisories()


def _judge(ps: PinSet, entry: Any) -> tuple[str, str, list[dict]]:
    """(status, reason, per-line rows) of a patch or an advisory on the pin set."""
    lines = [_judge_line(ps, line) for line in entry.requires]
    live = [x for x in lines if x["status"] != "ignored"]
    statuses = {x["status"] for x in live}
    status = next((s for s in ("not-affected", "not-pinned", "unknown") if s in statuses), "affected")
    if not live:   # every requirement's marker is false here: it cannot apply
        status = "not-affected"
    why = "; ".join(x["reason"] for x in live if x["status"] == status) if live else \
        "; ".join(x["reason"] for x in lines)
    if status == "not-affected" and entry.fixed_in:
        why += f"; {_fixed_note(ps, entry)}"
    return status, why, lines


def _common(entry: Any, status: str, why: str, lines: list[dict]) -> dict:
    pinned = [x["pinned"] for x in lines]
    return {"id": entry.id, "status": status, "package": ", ".join(x["package"] for x in lines),
            "pinned": ", ".join(p or "-" for p in pinned) if any(pinned) else None,
            "affected_range": " and ".join(entry.requires), "fixed_in": entry.fixed_in, "reason": why}


def audit(ps: PinSet) -> list[dict]:
    """One row per registered patch: id, status, package, pinned, affected_range, fixed_in, reason."""
    rows = []
    for pid, patch in _patches().items():
        status, why, lines = _judge(ps, patch)
        if status == "affected":
            why += "; hfpatches fixes it at run time"
            if patch.fixed_in:
                why += f" (or upgrade: {patch.fixed_text})"
            if not patch.default_enabled:
                why += f"; opt-in: {patch.opt_in_hint}"
        rows.append({**_common(patch, status, why, lines), "default_enabled": patch.default_enabled,
                     "requirements": lines})
    return rows


def audit_advisories(ps: PinSet) -> list[dict]:
    """One row per advisory (a known bug hfpatches does not fix): ``applies`` True (every line in
    range), False (outside), None (not pinned, or pinned loosely: cannot tell)."""
    rows = []
    for adv in _advisories().values():
        status, why, lines = _judge(ps, adv)
        applies = {"affected": True, "not-affected": False}.get(status)
        rows.append({**advisory_fields(adv), **_common(adv, status, why, lines), "applies": applies,
                     "severity": adv.severity, "requirements": lines})
    return rows


def advisory_fields(adv: Any) -> dict:
    """The JSON fields every advisory row carries (doctor and audit)."""
    return {"id": adv.id, "summary": adv.summary, "upstream": list(adv.upstream), "requires": list(adv.requires),
            "fixed_in": adv.fixed_in, "workaround": adv.workaround}


# ----------------------------------------------------------------------------- command line
def _parse_marker_env(items: Any) -> dict[str, str]:
    out = {}
    for item in items or ():
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise AuditError(f"--marker-env {item!r}: expected NAME=VALUE, e.g. sys_platform=linux")
        out[key.strip()] = value.strip()
    return out


#: ``--fail-on`` also takes ``advisory``: exit 1 when a known unpatched bug applies to the pins.
FAIL_ON = (*STATUSES, "advisory")


def _parse_fail_on(value: str | None) -> set[str]:
    if not value:
        return set()
    chosen = {s.strip() for s in value.split(",") if s.strip()}
    bad = chosen - set(FAIL_ON)
    if bad:
        raise AuditError(f"--fail-on: unknown status {', '.join(sorted(bad))}; valid: {', '.join(FAIL_ON)}")
    return chosen


def main(args: Any, stdout: Any = None, stderr: Any = None, stdin: Any = None) -> int:
    """``audit`` subcommand: 0 when the audit ran, 1 with ``--fail-on`` hits, 2 on bad input."""
    import json

    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        fail_on = _parse_fail_on(args.fail_on)
        env = marker_environment(_parse_marker_env(args.marker_env))
        ps = read_inputs(args.files, env, stdin)
    except AuditError as e:
        print(f"hfpatches audit: error: {e}", file=stderr)
        return 2
    rows = audit(ps)
    advs = audit_advisories(ps)
    found = {r["status"] for r in rows} | ({"advisory"} if any(a["applies"] for a in advs) else set())
    hits = sorted(found & fail_on)
    try:
        if args.json:
            payload = {"patches": rows, "advisories": advs, "inputs": ps.inputs, "notes": ps.notes,
                       "marker_environment": {k: ps.env[k] for k in sorted(ps.env)}}
            print(json.dumps(payload, indent=2), file=stdout)
        else:
            _print_table(ps, rows, advs, stdout)
            if hits:
                print(f"\nfail-on: {', '.join(hits)} found", file=stdout)
        stdout.flush()
    except BrokenPipeError:
        quiet_broken_pipe()
    return 1 if hits else 0


def quiet_broken_pipe() -> None:
    """The reader of our stdout went away (``| head``): stop writing, and make the interpreter's
    final flush at exit quiet too (Python's documented recipe: stdout onto /dev/null)."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):   # no real stdout (a test's StringIO): nothing left to flush
        pass


def _print_table(ps: PinSet, rows: list[dict], advs: list[dict], out: Any) -> None:
    env = ps.env
    n = len(ps.pins)
    print(f"hfpatches audit: {n} package{'s' if n != 1 else ''} from {', '.join(ps.inputs)}", file=out)
    print(f"  markers evaluated for Python {env['python_full_version']}, {env['sys_platform']} "
          f"{env['platform_machine']}", file=out)
    print(file=out)
    cols = ("patch", "status", "package", "pinned", "affected_range", "fixed_in")
    cells = [{"patch": r["id"], "status": r["status"], "package": r["package"], "pinned": r["pinned"] or "-",
              "affected_range": r["affected_range"], "fixed_in": r["fixed_in"] or "-"} for r in rows]
    w = {c: max([len(c)] + [len(x[c]) for x in cells]) for c in cols}
    print("  ".join(c.ljust(w[c]) for c in cols) + "  reason", file=out)
    print("  ".join("-" * w[c] for c in cols) + "  ------", file=out)
    for x, r in zip(cells, rows):
        print("  ".join(x[c].ljust(w[c]) for c in cols) + "  " + r["reason"], file=out)
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    print("\n" + ", ".join(f"{k}: {v}" for k, v in counts.items() if v), file=out)
    hit = [a for a in advs if a["applies"]]
    unclear = [a for a in advs if a["applies"] is None and a["status"] == "unknown"]
    if hit or unclear:
        print("\nknown bugs hfpatches does not fix (advisories):", file=out)
        for a in hit:
            print(f"  {a['id']}: {a['summary']} ({a['reason']})\n    workaround: {a['workaround']}", file=out)
        for a in unclear:
            print(f"  {a['id']}: cannot tell ({a['reason']})", file=out)
    for note in ps.notes:
        print(f"note: {note}", file=out)
