"""Version lab: measure a patch's bug on each release of its target package.

    python scripts/version_lab.py PATCH_ID [--package NAME] [--versions SPEC]
                                  [--stack affected|latest|boundary] [--with PKG==VER ...] [--write]

For every release of ``--package`` (default: the first package of the patch's ``requires`` that is
not torch), the lab

1. makes an *overlay*: ``pip install --no-deps --target .cache/lab/<pkg>-<ver> <pkg>==<ver>``
   (built into a temporary directory, then renamed into place; reused when present; an overlay of
   the same name under ``.cache/overlay/`` made by someone else is reused too). torch is never
   installed. Nothing is installed into the stack's venv.
2. runs, in a FRESH interpreter of the stack's venv (``.venvs/<stack>/bin/python``) with
   ``PYTHONPATH=<overlay>[:<--with overlays>]:<this checkout>`` (an overlay wins over the venv's
   site-packages, for imports and for ``importlib.metadata`` alike):
   ``scripts/lab/<id>.py``'s ``reproduce()`` (is the bug there? measured, not guessed), then
   ``hfpatches._engine.run_probe(id)`` (what the probe says), then ``hfpatches.apply(only=[id])``
   and ``reproduce()`` again (does the patch fix it here?).
3. prints one row per release; ``--write`` puts them into the ``## Versions checked`` table of
   ``docs/patches/<id>.md`` (rows of other packages, and of releases not run now, are kept).

``make lab`` (``--all``) runs every ``scripts/lab/<id>.py``; a reproduction may say how with a
module-level ``LAB_RUNS = [{"package": ..., "versions": ..., "stack": ..., "with": [...]}, ...]``
(a literal; one lab run per dict, every key optional), so its table can be regenerated as is.

SPEC: a comma list of releases (``0.5.2,0.5.3``), or a PEP 440 specifier (``>=0.5.2,<0.6``)
filtered against ``pip index versions`` (final releases only). Without ``--versions``: both sides
of every boundary in ``requires``/``fixed_in`` for the package, the stack's own release and the
newest one. A release that does not install, import or finish within ``--timeout`` seconds is a
row ``n/a: <why>``. Needs the network (pip); not part of ``make test`` (``make lab`` runs it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "scripts" / "lab"
DOCS = ROOT / "docs" / "patches"
HEADING = "## Versions checked"
HEADER = "| package | release | bug present (measured) | probe said | with the patch | checked |"
COLUMNS = ("package", "release", "bug", "probe", "patched", "checked")

# ----------------------------------------------------------------------------- tables


def read_rows(text: str) -> list[dict[str, str]] | None:
    """The rows of the ``## Versions checked`` table in a docs page (None: no such section or no
    table in the lab's format)."""
    section = _section(text)
    if section is None:
        return None
    lines = [ln.strip() for ln in section[2].splitlines() if ln.strip().startswith("|")]
    if not lines or lines[0] != HEADER:
        return None
    rows = []
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if len(cells) != len(COLUMNS):
            raise ValueError(f"malformed row: {ln}")
        rows.append(dict(zip(COLUMNS, cells)))
    return rows


def _section(text: str) -> tuple[int, int, str] | None:
    """(start, end, body) of the ``## Versions checked`` section (end: the next ``## `` heading)."""
    m = re.search(rf"^{re.escape(HEADING)}[ \t]*$", text, flags=re.M)
    if m is None:
        return None
    nxt = re.search(r"^## ", text[m.end():], flags=re.M)
    end = m.end() + nxt.start() if nxt else len(text)
    return m.start(), end, text[m.end():end]


def _vkey(release: str) -> Any:
    from packaging.version import InvalidVersion, Version

    try:
        return (0, Version(release))
    except InvalidVersion:
        return (1, release)


def render(rows: list[dict[str, str]], note: str = "") -> str:
    rows = sorted(rows, key=lambda r: (r["package"], _vkey(r["release"])))
    out = [HEADING, "", HEADER, "|---|---|---|---|---|---|"]
    out += ["| " + " | ".join(r[c] for c in COLUMNS) + " |" for r in rows]
    return "\n".join(out) + "\n" + (f"\n{note}\n" if note else "") + "\n"


def write_doc(patch_id: str, new_rows: list[dict[str, str]], note: str) -> Path:
    """Merge ``new_rows`` into the page's table (same package+release: replaced) and rewrite only
    that section (a table in another format is replaced; the prose around it is kept)."""
    path = DOCS / f"{patch_id}.md"
    text = path.read_text() if path.exists() else f"# {patch_id}\n"
    old = read_rows(text) or []
    keys = {(r["package"], r["release"]) for r in new_rows}
    merged = [r for r in old if (r["package"], r["release"]) not in keys] + new_rows
    sec = _section(text)
    body = render(merged, note)
    if sec is None:
        text = text.rstrip("\n") + "\n\n" + body
    else:
        text = text[: sec[0]] + body + text[sec[1]:].lstrip("\n")
    path.write_text(text.rstrip("\n") + "\n")
    return path


# ----------------------------------------------------------------------------- releases


def _pip(py: str) -> list[str]:
    return [py, "-m", "pip", "--disable-pip-version-check", "-q"]


def available(py: str, package: str) -> list[str]:
    """Final releases of ``package`` the index offers, oldest first."""
    from packaging.version import InvalidVersion, Version

    out = subprocess.run([py, "-m", "pip", "--disable-pip-version-check", "index", "versions", package],
                         capture_output=True, text=True, timeout=180)
    m = re.search(r"Available versions:\s*(.*)", out.stdout)
    if m is None:
        raise SystemExit(f"pip index versions {package} failed:\n{out.stdout}{out.stderr}")
    vs = []
    for s in m.group(1).split(","):
        try:
            v = Version(s.strip())
        except InvalidVersion:
            continue
        if not v.is_prerelease and not v.is_devrelease:
            vs.append(s.strip())
    return sorted(vs, key=Version)


def boundaries(patch: Any, package: str) -> list[str]:
    """The versions named in ``requires``/``fixed_in`` for ``package``."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lines = list(patch.requires) + ([patch.fixed_in] if patch.fixed_in else [])
    out = []
    for line in lines:
        req = Requirement(line)
        if canonicalize_name(req.name) == canonicalize_name(package):
            out += [s.version.replace(".*", "") for s in req.specifier]
    return out


def choose(patch: Any, package: str, spec: str | None, releases: list[str], installed: str | None) -> list[str]:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if spec:
        if re.fullmatch(r"[\w.+!-]+(\s*,\s*[\w.+!-]+)*", spec.strip()):
            return [s.strip() for s in spec.split(",") if s.strip()]
        ss = SpecifierSet(spec)
        return [r for r in releases if ss.contains(r)]
    picked = set()
    for b in boundaries(patch, package):
        bv = Version(b)
        below = [r for r in releases if Version(r) < bv]
        above = [r for r in releases if Version(r) >= bv]
        picked.update(below[-1:] + above[:1])
    if installed in releases:
        picked.add(installed)
    if releases:
        picked.add(releases[-1])
    for r in reversed(releases):  # at least four
        if len(picked) >= 4:
            break
        picked.add(r)
    return sorted(picked, key=Version)


def overlay(py: str, package: str, version: str, cache: Path) -> tuple[Path | None, str]:
    """The overlay directory for ``package==version`` (made when missing); (None, why) on failure."""
    name = f"{package}-{version}"
    lab, shared = cache / "lab" / name, cache / "overlay" / name
    for d in (lab, shared):
        if d.is_dir():
            return d, ""
    lab.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=lab.parent))
    env = {**os.environ, "FLASH_ATTENTION_SKIP_CUDA_BUILD": "TRUE", "FLASH_ATTENTION_FORCE_BUILD": "TRUE",
           "PIP_CONSTRAINT": ""}
    # --no-build-isolation: sdists such as flash-attn import torch (the venv's) in setup.py
    cmd = [*_pip(py), "install", "--no-deps", "--no-build-isolation", "--no-cache-dir", "--target", str(tmp),
           f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        return None, f"install failed ({(tail[-1] if tail else 'pip rc ' + str(proc.returncode))[:120]})"
    for junk in ("torch", "bin"):  # never shadow the venv's torch
        shutil.rmtree(tmp / junk, ignore_errors=True)
    try:
        tmp.rename(lab)
    except OSError:  # someone else made it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return lab, ""


# ----------------------------------------------------------------------------- one release

CHILD = r'''
import importlib.util, json, sys, traceback
pid, package, want, lab_file = sys.argv[1:5]
res = {"release": None, "bug": None, "probe": "-", "outcome": None, "fixed": None, "notes": []}
def out():
    print("LABRESULT " + json.dumps(res), flush=True)
try:
    import importlib.metadata as md
    try:
        res["release"] = md.version(package)
    except md.PackageNotFoundError:
        res["release"] = None
    spec = importlib.util.spec_from_file_location("hfpatches_lab_" + pid, lab_file)
    lab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lab)
    def measure(tag):
        try:
            bug, detail = lab.reproduce()
        except Exception as e:
            res["notes"].append(f"{tag}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
            return "error"
        res["notes"].append(f"{tag}: {detail}")
        return bug
    res["bug"] = measure("unpatched")
    out()
    import hfpatches
    from hfpatches._engine import run_probe
    from hfpatches._registry import registry
    patch = registry()[pid]
    import importlib
    try:
        for m in patch.modules:
            importlib.import_module(m)
        importable = True
    except Exception as e:  # ImportError, or a release that breaks at import beside this torch
        importable = False
        res["notes"].append(f"probe: target not importable ({type(e).__name__}: {str(e)[:120]})")
    if importable:
        try:
            pr = run_probe(pid)
            res["probe"] = {True: "bug", False: "no bug", None: "could not run"}[pr.bug_present]
            if pr.detail:
                res["notes"].append("probe: " + pr.detail[:160])
        except Exception as e:
            res["probe"] = "could not run"
            res["notes"].append(f"probe: {type(e).__name__}: {str(e)[:160]}")
    out()
    report = hfpatches.apply(only=[pid])
    r = report[pid]
    res["outcome"] = str(r.outcome.value)
    res["notes"].append(f"apply: {r.outcome.value} ({r.reason[:160]})")
    res["fixed"] = measure("patched")
except Exception:
    res["notes"].append("lab error: " + traceback.format_exc().strip().splitlines()[-1][:200])
out()
'''


def run_release(py: str, patch_id: str, package: str, version: str, paths: list[Path], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, paths), str(ROOT)]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRITON_INTERPRET": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    env.setdefault("HFPATCHES_CACHE", str(ROOT / ".cache"))
    for k in [k for k in env if k.startswith("HFPATCHES_") and k != "HFPATCHES_CACHE"]:
        del env[k]  # no user switches leak into the measurement
    cmd = [py, "-c", CHILD, patch_id, package, version, str(LAB / f"{patch_id}.py")]
    res: dict[str, Any] = {}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
        text, err, why = proc.stdout, proc.stderr, f"rc {proc.returncode}"
    except subprocess.TimeoutExpired as e:
        text = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, why = "", f"timeout after {timeout:.0f} s"
    for ln in text.splitlines():
        if ln.startswith("LABRESULT "):
            res = json.loads(ln[len("LABRESULT "):])
    if not res or res.get("fixed") is None and res.get("outcome") is None:
        tail = [ln for ln in err.strip().splitlines() if ln.strip()][-1:]
        res = {**res, "crash": f"{why}: {tail[0][:160]}" if tail else why}
    return res


def _short(cell: str, n: int = 90) -> str:
    """A table cell: no pipes, one line, at most ``n`` characters."""
    cell = " ".join(cell.replace("|", "/").split())
    return cell if len(cell) <= n else cell[: n - 3].rstrip() + "..."


def row(package: str, version: str, res: dict[str, Any], today: str) -> dict[str, str]:
    def word(b: Any) -> str:
        return {True: "yes", False: "no"}.get(b, "") if isinstance(b, bool) else ""

    if "install" in res:
        return dict(package=package, release=version, bug=_short(f"n/a: {res['install']}"), probe="-", patched="-", checked=today)
    if res.get("release") != version:
        why = f"n/a: {package} {res.get('release')} imported instead of {version}" if res.get("release") else \
            f"n/a: {res.get('crash', 'did not run')}"
        return dict(package=package, release=version, bug=_short(why), probe="-", patched="-", checked=today)
    bug = res.get("bug")
    notes = res.get("notes") or []
    if isinstance(bug, bool):
        bug_w = word(bug)
    else:
        detail = next((n.split(": ", 1)[1] for n in notes if n.startswith("unpatched:")), None)
        bug_w = f"n/a: {detail or res.get('crash', 'reproduction did not run')}"
    bug_w = _short(bug_w)
    outcome = res.get("outcome")
    if outcome is None:
        patched = _short(f"n/a: {res.get('crash', 'apply did not run')}")
    else:
        patched = outcome + (", fixed" if bug is True and res.get("fixed") is False else "")
    return dict(package=package, release=version, bug=bug_w, probe=res.get("probe") or "-", patched=patched,
                checked=today)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("patch_id", nargs="?")
    ap.add_argument("--all", action="store_true", help="every scripts/lab/<id>.py, as its LAB_RUNS say")
    ap.add_argument("--only", default="", help="with --all: these ids only (comma list)")
    ap.add_argument("--package", help="the PyPI package whose release varies (default: from requires)")
    ap.add_argument("--versions", help="comma list of releases, or a PEP 440 specifier")
    ap.add_argument("--stack", default="affected", help="the venv the overlays go on (.venvs/<stack>)")
    ap.add_argument("--with", dest="extra", action="append", default=[], metavar="PKG==VER",
                    help="a further overlay for every release (e.g. a tokenizers the release needs)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per release")
    ap.add_argument("--write", action="store_true", help="write the table into docs/patches/<id>.md")
    args = ap.parse_args(argv)
    if args.all:
        return run_all(args)
    if not args.patch_id:
        ap.error("PATCH_ID or --all")

    sys.path.insert(0, str(ROOT))
    from packaging.requirements import Requirement

    from hfpatches._registry import registry

    patch = registry().get(args.patch_id)
    if patch is None:
        raise SystemExit(f"unknown patch {args.patch_id!r}; known: {', '.join(registry())}")
    if not (LAB / f"{args.patch_id}.py").exists():
        raise SystemExit(f"no reproduction scripts/lab/{args.patch_id}.py")
    py = str(ROOT / ".venvs" / args.stack / "bin" / "python")
    if not os.path.exists(py):
        raise SystemExit(f"no venv {py} (bash scripts/setup_env.sh {args.stack})")
    package = args.package or next(
        (Requirement(r).name for r in patch.requires if Requirement(r).name != "torch"), None)
    if package is None:
        raise SystemExit("the patch requires only torch: name --package")
    if package == "torch":
        raise SystemExit("torch is never re-installed: the lab varies other packages")
    cache = Path(os.environ.get("HFPATCHES_CACHE") or ROOT / ".cache")
    installed = subprocess.run([py, "-c", f"import importlib.metadata as m;print(m.version({package!r}))"],
                               capture_output=True, text=True).stdout.strip() or None
    releases = [] if args.versions and re.fullmatch(r"[\w.+!,\s-]+", args.versions) else available(py, package)
    versions = choose(patch, package, args.versions, releases, installed)
    extra_paths = []
    for spec in args.extra:
        name, _, ver = spec.partition("==")
        d, why = overlay(py, name, ver, cache)
        if d is None:
            raise SystemExit(f"--with {spec}: {why}")
        extra_paths.append(d)
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    print(f"[lab] {args.patch_id}: {package} {', '.join(versions)} on .venvs/{args.stack} "
          f"({package} {installed} installed there)", flush=True)
    rows = []
    for v in versions:
        if v == installed and not extra_paths:
            paths: list[Path] = []
            res = run_release(py, args.patch_id, package, v, paths, args.timeout)
        else:
            d, why = overlay(py, package, v, cache)
            res = {"install": why} if d is None else run_release(py, args.patch_id, package, v, [d, *extra_paths],
                                                                 args.timeout)
        r = row(package, v, res, today)
        rows.append(r)
        notes = "; ".join(res.get("notes") or []) or res.get("crash") or res.get("install") or ""
        print(f"[lab] {package} {v}: bug={r['bug']} probe={r['probe']} patched={r['patched']}  [{notes}]", flush=True)
    print()
    print(render(rows))
    if args.write:
        stack_note = f"`.venvs/{args.stack}`" + (f" with {', '.join(args.extra)}" if args.extra else "")
        note = (f"Measured by `python scripts/version_lab.py {args.patch_id}` (reproduction: "
                f"`scripts/lab/{args.patch_id}.py`; {package} overlaid on {stack_note}).")
        old = read_rows((DOCS / f"{args.patch_id}.md").read_text()) if (DOCS / f"{args.patch_id}.md").exists() else None
        prev_note = _note(args.patch_id) if old else ""
        if prev_note and package not in prev_note:
            note = prev_note + "\n" + note
        path = write_doc(args.patch_id, rows, note)
        print(f"[lab] wrote {path.relative_to(ROOT)}")
    return 0


def lab_runs(patch_id: str) -> list[dict[str, Any]]:
    """``LAB_RUNS`` of ``scripts/lab/<id>.py`` (read without importing it), default one run."""
    import ast

    tree = ast.parse((LAB / f"{patch_id}.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "LAB_RUNS" for t in node.targets):
            return list(ast.literal_eval(node.value))
    return [{}]


def run_all(args: argparse.Namespace) -> int:
    failed = []
    for f in sorted(LAB.glob("*.py")):
        if f.name.startswith("_") or (args.only and f.stem not in args.only.split(",")):
            continue
        for run in lab_runs(f.stem):
            argv = [f.stem, "--stack", run.get("stack", args.stack), "--timeout", str(args.timeout)]
            for key in ("package", "versions"):
                if run.get(key):
                    argv += [f"--{key}", run[key]]
            for w in run.get("with", ()):
                argv += ["--with", w]
            if args.write:
                argv.append("--write")
            print(f"[lab] == {' '.join(argv)}", flush=True)
            if subprocess.run([sys.executable, __file__, *argv]).returncode != 0:
                failed.append(" ".join(argv))
    if failed:
        print("[lab] failed: " + "; ".join(failed))
    return 1 if failed else 0


def _note(patch_id: str) -> str:
    """The provenance lines under an existing lab table (kept when another package is added)."""
    sec = _section((DOCS / f"{patch_id}.md").read_text())
    if sec is None:
        return ""
    return "\n".join(ln for ln in sec[2].splitlines() if ln.startswith("Measured by"))


if __name__ == "__main__":
    sys.exit(main())
