#!/usr/bin/env python3
"""Scaffold a new patch: ``python scripts/new_patch.py ID [--root DIR]``.

Writes (and never overwrites):
  hfpatches/patches/ID/__init__.py   the declaration + the short user docstring
  hfpatches/patches/ID/impl.py       probe / apply (/ check)
  docs/patches/ID.md                 the rationale and the ``## Versions checked`` table
  scripts/lab/ID.py                  the reproduction the version lab runs per release
  tests/test_ID.py                   CPU tests (bug shown unpatched, fixed patched, revert exact)
  gpu_tests/test_ID.py               CUDA tests (skip cleanly without CUDA)
No core file changes: the registry discovers the package. Then follow CONTRIBUTING.md.
"""
from __future__ import annotations

import argparse
import keyword
import re
import sys
from pathlib import Path

DECL = '''"""``{id}``: ONE LINE: what goes wrong, and that it no longer does.

Bug
    What the user sees (the error, or the silently wrong number), and why.
Affected
    somepkg X.Y .. X.Z (found by installing the releases around it; table in docs/patches/{id}.md).
Upstream
    owner/repo#N (the report), owner/repo#M (the fix).
Probe
    What the probe runs on the installed code, and what "bug present" means. Cheap, no download.
What changes
    Exactly what is replaced, and what the user observes after.
    Rationale: docs/patches/{id}.md.
"""
from hfpatches._declare import Patch, Target

PATCH = Patch(
    id="{id}",
    summary="ONE LINE for the README matrix",
    upstream=("owner/repo#N",),
    requires=("somepkg>=1.0,<1.1",),
    fixed_in="somepkg>=1.1",
    targets=(Target("somepkg.module", "Class.method", params=("self",)),),
)
'''

IMPL = '''"""Implementation of ``{id}`` (declared in ``__init__.py``; rationale in docs/patches/{id}.md).

Imported only when the target module has been imported. Import the target's modules inside the
functions (``ctx.module(...)`` / ``sys.modules``), never a module that may be mid-import.
"""
from __future__ import annotations

from hfpatches._declare import ProbeResult


def probe() -> ProbeResult:
    """True when the installed code has the bug (runs before and again after ``apply``)."""
    raise NotImplementedError("write the probe")


def apply(ctx) -> None:
    """Mutate only through ``ctx`` (replace / wrap / on_import / state): recorded, reverted exactly."""
    raise NotImplementedError("write the fix")
'''

DOCS = '''# `{id}` — design notes

## The bug
## Versions checked

Written by `python scripts/version_lab.py {id} --versions ... --write` (tests/test_ranges.py
checks `requires`/`fixed_in` against it: at least 4 releases, both sides of every boundary).

| package | release | bug present (measured) | probe said | with the patch | checked |
|---|---|---|---|---|---|
## Upstream
## Probe
## The fix, and why this way
## Limits
'''

LAB = '''"""Lab reproduction for ``{id}``: the bug scenario on whatever is installed (run by
scripts/version_lab.py in a fresh interpreter per release; never applies hfpatches itself)."""
from __future__ import annotations

# how `make lab` reruns this table: one dict per lab run (keys: package, versions, stack, with)
LAB_RUNS = [{"versions": "X.Y.Z,X.Y.Z"}]


def reproduce() -> tuple[bool | None, str]:
    """(bug present?, a short measured detail); (None, why) when it cannot run here."""
    raise NotImplementedError
'''

TEST = '''"""CPU tests of ``{id}``: the bug shown unpatched, fixed patched, exact revert."""
from __future__ import annotations

import pytest

import hfpatches

pytest.importorskip("somepkg")


def test_bug_unpatched_then_fixed():
    pytest.skip("write me: show the bug with the patch reverted, then the fix with it applied")


def test_revert_is_exact():
    rep = hfpatches.apply(only=["{id}"])
    hfpatches.revert(["{id}"])
    assert rep["{id}"].outcome.value in ("APPLIED", "NOT_AFFECTED", "NOT_INSTALLED", "DEFERRED")
'''

GPU = '''"""GPU tests of ``{id}`` (real kernels on CUDA; skip cleanly elsewhere)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_fixed_on_cuda():
    pytest.skip("write me")
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
        root / "tests" / f"test_{pid}.py": TEST,
        root / "gpu_tests" / f"test_{pid}.py": GPU,
    }
    existing = [str(p) for p in files if p.exists()]
    if existing:
        print(f"new_patch: refusing to overwrite {', '.join(existing)}", file=sys.stderr)
        return 2
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace("{id}", pid), encoding="utf-8")
        print(f"wrote {path.relative_to(root)}")
    print("next: CONTRIBUTING.md, 'Adding a patch'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
