"""``doctor`` and ``list``: what is installed, and per patch what happened and why."""
from __future__ import annotations

import importlib
import json
import platform

from ._declare import LIBRARIES

#: The distributions of the stack hfpatches fixes, shown by doctor, the demo and the test header
#: (``_declare.LIBRARIES``: listed once).
STACK = tuple(dist for dist, _module in LIBRARIES)


def versions() -> dict[str, str | None]:
    from ._engine import dist_version

    out: dict[str, str | None] = {"python": platform.python_version(), "hfpatches": None}
    from ._version import __version__

    out["hfpatches"] = __version__
    for name in STACK:
        out[name] = dist_version(name)
    if out["torch"]:
        try:
            import torch

            cuda = torch.version.cuda
            out["torch"] += f" (CUDA {cuda}, device: {'yes' if torch.cuda.is_available() else 'no'})" if cuda \
                else " (CPU build)"
        except Exception as e:  # pragma: no cover - broken torch install
            out["torch"] += f" (import failed: {e})"
    return out


def doctor(as_json: bool = False, strict: bool = False) -> int:
    """Apply everything, import every installed target so deferred patches attach, report."""
    import hfpatches

    from ._registry import registry
    from ._report import BAD_OUTCOMES, LIVE_OUTCOMES, Outcome

    stack = versions()
    report = hfpatches.apply()
    import_errors: dict[str, str] = {}
    for pid, res in report.items():
        if res.outcome != Outcome.DEFERRED:
            continue
        for mod in registry()[pid].modules:
            try:
                importlib.import_module(mod)
            except Exception as e:  # the target cannot even be imported here: say why
                import_errors[pid] = f"target {mod} cannot be imported here: {type(e).__name__}: {e}"
                break
    final = hfpatches.status()
    rows = []
    bad = False
    for pid, patch in registry().items():
        r = final[pid]
        reason = import_errors.get(pid, r.reason) if r.outcome == Outcome.DEFERRED else r.reason
        not_live_in_range = r.in_range and r.outcome not in (*LIVE_OUTCOMES, Outcome.NOT_AFFECTED, Outcome.DISABLED)
        # DEFERRED here means doctor imported the target and it still did not attach (the import
        # failed): nothing is verified, so it fails --strict, as raise_for_failures(strict=True) does.
        if r.outcome in BAD_OUTCOMES or not_live_in_range or r.outcome == Outcome.DEFERRED:
            bad = True
        probe = {True: "bug present", False: "no bug", None: "-"}[r.bug_present]
        rows.append({"patch": pid, "target": r.target_version or "-",
                     "in_range": {True: "yes", False: "no", None: "-"}[r.in_range],
                     "probe": probe, "outcome": r.outcome.value, "reason": reason})
    advs = advisories_here()
    if as_json:
        print(json.dumps({"versions": stack, "patches": rows, "advisories": advs, "ok": not bad}, indent=2))
    else:
        print("hfpatches doctor")
        for k, v in stack.items():
            print(f"  {k:<13} {v or 'not installed'}")
        print()
        cols = ("patch", "target", "in_range", "probe", "outcome")
        w = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in cols}
        print("  ".join(c.ljust(w[c]) for c in cols) + "  reason")
        print("  ".join("-" * w[c] for c in cols) + "  ------")
        for r in rows:
            print("  ".join(r[c].ljust(w[c]) for c in cols) + "  " + r["reason"])
        here = [a for a in advs if a["applies"]]
        print("\nknown unpatched bugs here (advisories; hfpatches does not fix these):")
        if not here:
            print("  none for the installed versions")
        for a in here:
            print(f"  {a['id']} [{a['severity']}]: {a['summary']}\n    upstream: {', '.join(a['upstream'])}; "
                  f"{a['fixed_text'] or 'not fixed upstream'}\n    workaround: {a['workaround']}")
        if strict:
            print("\nstrict: " + ("FAIL: a fix that should be live is not" if bad else "ok"))
    return 1 if (strict and bad) else 0


def advisories_here() -> list[dict]:
    """Every advisory, judged on the installed versions by the engine's range judge: ``applies``
    is True when every ``requires`` line holds here (a package that is not installed: False)."""
    from . import _ranges
    from ._audit import advisory_fields
    from ._engine import dist_version
    from ._registry import advisories

    out = []
    for adv in advisories().values():
        verdicts = [_ranges.judge(line, dist_version(_ranges.requirement(line).name)) for line in adv.requires]
        live = [v for v in verdicts if v != _ranges.IGNORED]
        applies = bool(live) and all(v == _ranges.IN for v in live)
        out.append({**advisory_fields(adv), "applies": applies, "severity": adv.severity,
                    "fixed_text": adv.fixed_text})
    return out


def list_cmd() -> int:
    from ._registry import registry

    for p in registry().values():
        on = "default on" if p.default_enabled else f"opt-in ({p.enable_env or 'only='})"
        print(f"{p.id:<24} {on:<36} requires {', '.join(p.requires)}; {p.fixed_text or 'not fixed upstream'}")
        print(f"{'':<24} {p.summary}")
    return 0
