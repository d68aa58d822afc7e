#!/usr/bin/env python3
"""Scaffold a new patch: ``python scripts/new_patch.py ID [--root DIR]``.

Writes (and never overwrites):
  hfpatches/patches/ID/__init__.py   the declaration (opt-in until done) + the short user docstring
  hfpatches/patches/ID/impl.py       probe(ctx) / apply(ctx) (/ check(ctx))
  docs/patches/ID.md                 the rationale and the "Versions checked" table
  scripts/lab/ID.py                  the reproduction the version lab runs per release
  hfpatches/demos/ID.py              the demo section (``python -m hfpatches demo``)
  tests/test_ID.py                   CPU tests (bug shown unpatched, fixed patched, revert exact)
  gpu_tests/test_ID.py               CUDA tests (skip cleanly without CUDA)
No core file changes: the registry discovers the package. Every generated test, the demo and the
range check fail until the work is done. Then follow CONTRIBUTING.md.
"""
from __future__ import annotations

import argparse
import keyword
import re
import sys
from pathlib import Path

DECL = '''\"\"\"``{id}``: ONE LINE: what goes wrong, and that it no longer does.

Bug
    What the user sees (the error, or the silently wrong number), and why.
Affected
    somepkg X.Y-X.Z (the version lab's table: docs/patches/{id}.md, "Versions checked").
Upstream
    owner/repo#N (the report), owner/repo#M (the fix).
Probe
    What the probe runs on the installed code, and what "bug present" means. Cheap, no download.
What changes
    Exactly what is replaced, and what the user observes after.
\"\"\"
from hfpatches._declare import Patch, Target

PATCH = Patch(
    id="{id}",
    summary="ONE LINE for the README matrix",
    upstream=("owner/repo#N",),
    requires=("somepkg>=1.0,<1.1",),
    fixed_in="somepkg>=1.1",
    targets=(Target("somepkg.module", "Class.method", params=("self",)),),
    # A new patch starts opt-in (hfpatches.apply(only=["{id}"])): switch it on by default only
    # once its probe, fix, tests and version table are done.
    default_enabled=False,
)
'''

IMPL = '''\"\"\"Implementation of ``{id}`` (declared in ``__init__.py``; rationale in docs/patches/{id}.md).

Imported only when the target module has been imported. Reach the target through ``ctx``
(``ctx.module(...)``, ``ctx.resolve(0)``), never a module that may be mid-import.
\"\"\"
from __future__ import annotations

from typing import Any

from hfpatches._declare import ProbeResult


def probe(ctx: Any) -> ProbeResult:
    \"\"\"The installed code has the bug -> ``ProbeResult(True, what was measured)`` (runs before
    ``apply`` and again after it, to verify). ``ProbeResult(None, why)``: it cannot run here.\"\"\"
    raise NotImplementedError("write the probe")


def apply(ctx: Any) -> None:
    \"\"\"Mutate only through ``ctx`` (replace / wrap / on_import / state): recorded, reverted exactly.\"\"\"
    raise NotImplementedError("write the fix")
'''

DOCS = '''# `{id}`: ONE LINE

## The bug
What goes wrong, measured (numbers), and why (the upstream code path).

## Versions checked
Written by `python scripts/version_lab.py {id} --write` (reproduction: `scripts/lab/{id}.py`);
`requires`/`fixed_in` follow from it (`tests/test_ranges.py`).

| package | release | bug present (measured) | probe said | with the patch | checked |
|---|---|---|---|---|---|

## The fix, and why this way

## Probe

## Tests

## Limits
'''

LAB = '''\"\"\"The version lab's reproduction of ``{id}`` (``scripts/version_lab.py {id}``): runs in a fresh
interpreter on whatever release is installed; never applies hfpatches itself.\"\"\"
from __future__ import annotations

# how `make lab` reruns this table: one dict per lab run (keys: package, versions, stack, with)
LAB_RUNS = [{{"versions": "X.Y.Z,X.Y.Z"}}]


def reproduce() -> tuple[bool | None, str]:
    \"\"\"(bug present?, what was measured) on the installed code.\"\"\"
    raise NotImplementedError("write the reproduction")
'''

DEMO = '''\"\"\"Demo of ``{id}``: the bug reproduced unpatched, then fixed, with numbers.\"\"\"
from __future__ import annotations

from typing import Any


def run(say: Any) -> bool:
    \"\"\"Print before/after lines; False only when a fix that should verify did not.\"\"\"
    say("{id}: demo not written yet")
    return False
'''

TEST = '''\"\"\"CPU tests of ``{id}``: the bug shown unpatched, fixed patched, exact revert.\"\"\"
from __future__ import annotations

import importlib

import pytest

import hfpatches
from hfpatches._declare import raw_getattr
from hfpatches._registry import registry

PID = "{id}"


def test_bug_unpatched_then_fixed():
    pytest.fail("write me: show the bug with the patch reverted, then the fix with it applied")


def test_apply_then_revert_restores_every_target_by_identity():
    patch = registry()[PID]
    before = {{}}
    for t in patch.targets:
        importlib.import_module(t.module)
        owner, name, raw = t.resolve()
        before[t.path] = (owner, name, raw)
    rep = hfpatches.apply(only=[PID])
    assert rep[PID].outcome == hfpatches.Outcome.APPLIED, rep[PID].reason
    hfpatches.revert([PID])
    for path, (owner, name, raw) in before.items():
        assert raw_getattr(owner, name) is raw, f"{{path}} was not restored"
'''

GPU = '''\"\"\"GPU tests of ``{id}`` (real kernels on CUDA; skip cleanly elsewhere).\"\"\"
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_fixed_on_cuda():
    pytest.fail("write me")
'''


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("id", help="patch id: lower_snake_case, e.g. liger_flce_reduction_none")
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="repository root")
    args = ap.parse_args(argv)
    pid = args.id
    if not re.fullmatch(r"[a-z][a-z0-9_]*", pid) or keyword.iskeyword(pid):
        print(f"new_patch: {pid!r} is not a valid patch id (lower_snake_case, a Python identifier)", file=sys.stderr)
        return 2
    root = Path(args.root)
    files = {
        root / "hfpatches" / "patches" / pid / "__init__.py": DECL,
        root / "hfpatches" / "patches" / pid / "impl.py": IMPL,
        root / "docs" / "patches" / f"{pid}.md": DOCS,
        root / "scripts" / "lab" / f"{pid}.py": LAB,
        root / "hfpatches" / "demos" / f"{pid}.py": DEMO,
        root / "tests" / f"test_{pid}.py": TEST,
        root / "gpu_tests" / f"test_{pid}.py": GPU,
    }
    existing = [str(p) for p in files if p.exists()]
    if existing:
        print(f"new_patch: refusing to overwrite {', '.join(existing)}", file=sys.stderr)
        return 2
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace("{{", "\0").replace("}}", "\1").replace("{id}", pid)
                        .replace("\0", "{").replace("\1", "}"), encoding="utf-8")
        print(f"wrote {path.relative_to(root)}")
    print("next: CONTRIBUTING.md, 'Adding a patch'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
