#!/usr/bin/env python3
"""Run an upstream library's own test suite with ``HFPATCHES_AUTO=1`` and without, compare per test id.

    python scripts/upstream_suites.py PKG==VERSION TESTPATH [TESTPATH ...] [--stack affected]
                                      [-k EXPR] [--timeout S] [--json OUT] [--deps a,b]
                                      [--import-mode importlib]

The sdist (which ships the tests) is downloaded once into ``.cache/sdists/`` and unpacked; each
TESTPATH is relative to it (``tests/test_data_loader.py``). Both runs use the stack's venv
(``.venvs/<stack>``, whose installed PKG must be VERSION), the same test ids and the same
environment except ``HFPATCHES_AUTO``; the script prints every test whose outcome differs and exits 1
if any does (a test that fails in both runs, e.g. one that needs the hub, is no difference), and exits 2
when pytest ran nothing (no results, or no test id selected). Not part
of ``make test`` (it downloads); results go in the docs page of the patch it checks.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("HFPATCHES_CACHE", ROOT / ".cache"))


def sdist(spec: str, python: str) -> Path:
    name, _, version = spec.partition("==")
    if not version:
        raise SystemExit(f"upstream_suites: give an exact release, PKG==VERSION (got {spec!r})")
    out = CACHE / "sdists"
    out.mkdir(parents=True, exist_ok=True)
    norm = name.replace("-", "_").lower()
    for d in out.iterdir():
        if d.is_dir() and d.name.replace("-", "_").lower() == f"{norm}_{version}":
            return d
    subprocess.run([python, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", spec, "-d", str(out)],
                   check=True)
    archive = next(p for p in out.iterdir() if p.name.replace("-", "_").lower().startswith(f"{norm}_{version}.tar"))
    with tarfile.open(archive) as tf:
        tf.extractall(out, filter="data")
    return sdist(spec, python)


def installed(python: str, name: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({name!r}))"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_deps(python: str, stack: str, deps: list[str]) -> Path | None:
    """The upstream suite's own test requirements (``parameterized``...), installed once with
    ``--no-deps`` into ``.cache/upstream_deps/<stack>`` (put on PYTHONPATH; the venv is untouched)."""
    if not deps:
        return None
    target = CACHE / "upstream_deps" / stack
    stamp = target / ".deps"
    if not stamp.exists() or stamp.read_text() != " ".join(sorted(deps)):
        subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), *deps], check=True)
        stamp.write_text(" ".join(sorted(deps)))
    return target


def _tail(proc: subprocess.CompletedProcess) -> str:
    lines = (proc.stderr or proc.stdout or "").strip().splitlines()
    return " | ".join(lines[-3:]) if lines else "no output"


def run(python: str, src: Path, paths: list[str], auto: bool, extra: list[str], timeout: int,
        deps: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HFPATCHES_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONDONTWRITEBYTECODE="1")
    if deps is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(deps), env.get("PYTHONPATH")]))
    if auto:
        env["HFPATCHES_AUTO"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        ini = next((src / n for n in ("pytest.ini", "pyproject.toml", "setup.cfg", "tox.ini") if (src / n).exists()), None)
        if ini is None:
            ini = Path(tmp) / "pytest.ini"
            ini.write_text("[pytest]\n")

        def pytest(config: Path) -> subprocess.CompletedProcess:
            cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "-o", "addopts=",
                   "-c", str(config), "--rootdir", str(src), f"--junitxml={xml}", f"--timeout={timeout}", *extra,
                   *paths]
            return subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True)

        proc = pytest(ini)
        if not xml.exists() and ini.parent == src:
            # The sdist's own config can be one this pytest refuses (peft 0.15.2's pyproject has both
            # [tool.pytest] and [tool.pytest.ini_options], a usage error since pytest 9): run without it.
            print(f"upstream_suites: pytest refused {ini.name} ({_tail(proc)}); running with an empty config",
                  file=sys.stderr)
            ini = Path(tmp) / "pytest.ini"
            ini.write_text("[pytest]\n")
            proc = pytest(ini)
        if not xml.exists():
            # No junit means pytest never ran the tests: an empty result would read as "0 differ".
            raise SystemExit(f"upstream_suites: pytest wrote no results (rc {proc.returncode}): {_tail(proc)}")
        out: dict[str, str] = {}
        for case in ET.parse(xml).iter("testcase"):
            tid = f"{case.get('classname')}::{case.get('name')}"
            kind = "passed"
            for child in case:
                if child.tag in ("failure", "error"):
                    kind = "failed"
                elif child.tag == "skipped":
                    kind = "skipped"
            out[tid] = kind
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec")
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--stack", default="affected")
    ap.add_argument("-k", dest="k", default=None)
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--json", default=None)
    ap.add_argument("--import-mode", default=None, choices=("prepend", "append", "importlib"),
                    help="pytest's --import-mode (importlib for a tests/ without __init__.py that imports relatively)")
    ap.add_argument("--deps", default="", help="comma list of the suite's test requirements (installed --no-deps)")
    args = ap.parse_args(argv)
    python = str(ROOT / ".venvs" / args.stack / "bin" / "python")
    name, _, version = args.spec.partition("==")
    have = installed(python, name)
    if have != version:
        print(f"upstream_suites: .venvs/{args.stack} has {name} {have}, not {version}", file=sys.stderr)
        return 2
    src = sdist(args.spec, python)
    extra = (["-k", args.k] if args.k else []) + ([f"--import-mode={args.import_mode}"] if args.import_mode else [])
    deps = test_deps(python, args.stack, [d for d in args.deps.split(",") if d])
    plain = run(python, src, args.paths, False, extra, args.timeout, deps)
    auto = run(python, src, args.paths, True, extra, args.timeout, deps)
    ids = sorted(set(plain) | set(auto))
    if not ids:
        # A wrong path or a -k that selects nothing: nothing was compared, so no "0 differ".
        print(f"upstream_suites: no test ran for {' '.join(args.paths)} (-k {args.k!r})", file=sys.stderr)
        return 2
    diff = [(t, plain.get(t, "absent"), auto.get(t, "absent")) for t in ids if plain.get(t) != auto.get(t)]
    counts = {k: sum(1 for t in ids if plain.get(t) == k) for k in ("passed", "failed", "skipped")}
    print(f"{args.spec} {' '.join(args.paths)} on .venvs/{args.stack}: {len(ids)} test ids; without hfpatches "
          f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped; "
          f"with HFPATCHES_AUTO=1: {len(diff)} differ")
    for t, a, b in diff:
        print(f"  {t}: {a} -> {b}")
    if args.json:
        Path(args.json).write_text(json.dumps({"spec": args.spec, "paths": args.paths, "ids": len(ids),
                                               "unpatched": counts, "differ": diff}, indent=1))
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
