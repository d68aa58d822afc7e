"""``python -m hfpatches`` / ``hfpatches``: doctor, list, demo, inspect."""
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
    sub.add_parser("list", help="the registered patches")
    dm = sub.add_parser("demo", help="every bug reproduced, then fixed, on real small models")
    dm.add_argument("--only", default=None, help="comma list of patch ids")
    ins = sub.add_parser("inspect", help="what loading a checkpoint would do")
    ins.add_argument("checkpoint")
    ins.add_argument("--model", default=None, help="dotted class name, e.g. transformers.BertModel")
    ins.add_argument("--config", default=None, help="config directory (default: the checkpoint's)")
    ins.add_argument("--json", action="store_true")
    ins.add_argument("--debug", action="store_true", help="show tracebacks")
    args = ap.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.cmd == "doctor":
        from . import _doctor

        return _doctor.doctor(args.json, args.strict)
    if args.cmd == "list":
        from . import _doctor

        return _doctor.list_cmd()
    if args.cmd == "demo":
        from . import _demo

        return _demo.main(args.only)
    if args.cmd == "inspect":
        from . import loading

        return loading.inspect_main(args)
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
