"""``python -m hfpatches`` / ``hfpatches``: doctor, list, demo, inspect, report."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import platform
import sys

VERSIONED = ("torch", "transformers", "peft", "accelerate", "liger-kernel", "flash-attn", "flair", "trl")


def _versions() -> dict[str, str | None]:
    from ._registry import dist_version

    out: dict[str, str | None] = {"python": platform.python_version(), "hfpatches": None}
    from ._version import __version__

    out["hfpatches"] = __version__
    for name in VERSIONED:
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
    from ._registry import ENGINE, registry
    from ._report import BAD_OUTCOMES, Outcome

    versions = _versions()
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
        not_live_in_range = r.in_range and r.outcome not in (Outcome.APPLIED, Outcome.ALREADY_APPLIED,
                                                              Outcome.NOT_AFFECTED, Outcome.DISABLED)
        if r.outcome in BAD_OUTCOMES or not_live_in_range:
            bad = True
        probe = {True: "bug present", False: "no bug", None: "-"}[r.bug_present]
        rows.append({"patch": pid, "target": r.target_version or "-",
                     "in_range": {True: "yes", False: "no", None: "-"}[r.in_range],
                     "probe": probe, "outcome": r.outcome.value, "reason": reason})
    if as_json:
        print(json.dumps({"versions": versions, "patches": rows, "ok": not bad}, indent=2))
    else:
        print("hfpatches doctor")
        for k, v in versions.items():
            print(f"  {k:<13} {v or 'not installed'}")
        print()
        cols = ("patch", "target", "in_range", "probe", "outcome")
        w = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in cols}
        print("  ".join(c.ljust(w[c]) for c in cols) + "  reason")
        print("  ".join("-" * w[c] for c in cols) + "  ------")
        for r in rows:
            print("  ".join(r[c].ljust(w[c]) for c in cols) + "  " + r["reason"])
        if strict:
            print("\nstrict: " + ("FAIL: a fix that should be live is not" if bad else "ok"))
    return 1 if (strict and bad) else 0


def list_cmd() -> int:
    import hfpatches

    for p in hfpatches.list_patches():
        on = "default on" if p.default_enabled else f"opt-in ({p.enable_env or 'only='})"
        print(f"{p.id:<24} {on:<36} requires {', '.join(p.requires)}; fixed in {p.fixed_in or 'not yet'}")
        print(f"{'':<24} {p.summary}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hfpatches", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true", help="log every outcome (INFO)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("doctor", help="versions, then per patch: in range?, probe, outcome, reason")
    d.add_argument("--json", action="store_true")
    d.add_argument("--strict", action="store_true", help="exit 1 if a fix that should be live is not")
    sub.add_parser("list", help="the registered patches")
    dm = sub.add_parser("demo", help="every bug reproduced, then fixed, on real small models")
    dm.add_argument("--only", default=None, help="comma list of patch ids")
    ins = sub.add_parser("inspect", help="what loading a checkpoint would do")
    ins.add_argument("checkpoint")
    ins.add_argument("--model", default=None, help="dotted class name, e.g. transformers.BertModel")
    ins.add_argument("--config", default=None, help="config directory (default: the checkpoint's)")
    ins.add_argument("--json", action="store_true")
    ins.add_argument("--debug", action="store_true", help="show tracebacks")
    rp = sub.add_parser("report", help="read back a run's per-process records (HFPATCHES_REPORT): one row "
                        "per process, then whether the ranks agree; exit 0 consistent, 1 not, 2 unreadable")
    rp.add_argument("path", help="what HFPATCHES_REPORT named: the directory, or the file (records in FILE.d/)")
    rp.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.cmd == "doctor":
        return doctor(args.json, args.strict)
    if args.cmd == "list":
        return list_cmd()
    if args.cmd == "demo":
        from . import _demo

        return _demo.main(args.only)
    if args.cmd == "inspect":
        from . import loading

        return loading.inspect_main(args)
    if args.cmd == "report":
        from ._manifest import report_main

        return report_main(args.path, args.json)
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
