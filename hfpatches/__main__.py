"""``python -m hfpatches`` / ``hfpatches``: doctor, audit, list, demo, inspect, report."""
from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run one sub-command; returns the exit status."""
    ap = argparse.ArgumentParser(prog="hfpatches", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true", help="log every outcome (INFO)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("doctor", help="versions, then per patch: in range?, probe, outcome, reason")
    d.add_argument("--json", action="store_true")
    d.add_argument("--strict", action="store_true", help="exit 1 if a fix that should be live is not")
    au = sub.add_parser("audit", help="judge a pin set offline: which patches its pins are affected by")
    au.add_argument("files", nargs="+", metavar="FILE",
                    help="requirements/constraints file, pip freeze output ('-': stdin), uv.lock, poetry.lock, "
                         "pylock.toml")
    au.add_argument("--json", action="store_true")
    au.add_argument("--fail-on", default=None, metavar="STATUS[,STATUS]",
                    help="exit 1 when a patch ends with one of these statuses (e.g. 'affected')")
    au.add_argument("--marker-env", action="append", metavar="NAME=VALUE",
                    help="evaluate environment markers for another target (default: this interpreter), "
                         "e.g. sys_platform=linux; repeatable")
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
    try:
        return _run(args)
    except BrokenPipeError:   # ``hfpatches list | head``: the reader went away; nothing to say
        from ._audit import quiet_broken_pipe

        quiet_broken_pipe()
        return 0


def _run(args: argparse.Namespace) -> int:
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.cmd == "doctor":
        from . import _doctor

        return _doctor.doctor(args.json, args.strict)
    if args.cmd == "audit":
        from . import _audit

        return _audit.main(args)
    if args.cmd == "list":
        from . import _doctor

        return _doctor.list_cmd()
    if args.cmd == "demo":
        from . import _demo

        return _demo.main(args.only)
    if args.cmd == "inspect":
        from . import _inspect

        return _inspect.inspect_main(args)
    if args.cmd == "report":
        from ._manifest_report import report_main

        return report_main(args.path, args.json)
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
