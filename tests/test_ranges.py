"""Every patch's ``requires``/``fixed_in`` agrees with its measured ``## Versions checked`` table.

The tables are written by ``scripts/version_lab.py`` (``make lab``): for each release of the
target package, the bug measured by running ``scripts/lab/<id>.py`` in a fresh interpreter. The
declaration must follow them:

* a ``yes`` row (bug measured) lies inside ``requires`` for that package, and the patch fixed it
  there (``..., fixed``) or refused it (``TARGET_CHANGED``); a ``yes`` row outside ``requires``
  (a buggy release the patch cannot fix, left alone) and a refused one must be named in the
  page's ``## Limits``;
* a ``no`` row lies outside ``requires`` (and a release at/after ``fixed_in`` is never ``yes``);
  the patch never applied where there was no bug;
* at least 4 measured releases per patch, and both sides of every boundary of ``requires`` and
  ``fixed_in`` present (an ``n/a: <why>`` row counts as a side that was tried).
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from hfpatches._registry import registry

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "patches"
PROBE_WORDS = {"bug", "no bug", "could not run", "-"}
OUTCOMES = {"APPLIED", "ALREADY_APPLIED", "DEFERRED", "NOT_INSTALLED", "NOT_AFFECTED", "DISABLED",
            "TARGET_CHANGED", "CONFLICT", "FAILED"}


def _lab():
    spec = importlib.util.spec_from_file_location("hfpatches_version_lab", ROOT / "scripts" / "version_lab.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


LAB = _lab()


def _lines(patch, package: str) -> list[Requirement]:
    lines = [Requirement(r) for r in patch.requires]
    return [r for r in lines if canonicalize_name(r.name) == canonicalize_name(package)]


def _fixed(patch, package: str) -> Requirement | None:
    if not patch.fixed_in:
        return None
    req = Requirement(patch.fixed_in)
    return req if canonicalize_name(req.name) == canonicalize_name(package) else None


def limits_of(page: str) -> str:
    """The text of a design page's ``## Limits`` section ('' when it has none)."""
    m = re.search(r"^## Limits\n(.*?)(?=^## |\Z)", page, re.S | re.M)
    return m.group(1) if m else ""


def problems(patch, rows: list[dict[str, str]] | None, limits: str = "") -> list[str]:
    """Everything in which ``rows`` (a parsed table) and ``patch`` (a declaration) disagree;
    ``limits``: the page's ``## Limits`` text (where a refused buggy release must be named)."""
    if rows is None:
        return [f"docs/patches/{patch.id}.md has no '## Versions checked' table in the lab's format"]
    out = []
    measured = set()
    for r in rows:
        tag = f"{r['package']} {r['release']}"
        try:
            v = Version(r["release"])
        except InvalidVersion:
            out.append(f"{tag}: release is not a version")
            continue
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", r["checked"]):
            out.append(f"{tag}: checked {r['checked']!r} is not a date")
        if r["probe"] not in PROBE_WORDS:
            out.append(f"{tag}: probe said {r['probe']!r} (want one of {sorted(PROBE_WORDS)})")
        bug = r["bug"]
        if bug.startswith("n/a:") and len(bug) > 5:
            continue
        if bug not in ("yes", "no"):
            out.append(f"{tag}: bug present {bug!r} (want yes / no / n/a: <why>)")
            continue
        word = r["patched"].split(",")[0].strip()
        if word not in OUTCOMES:
            out.append(f"{tag}: with the patch {r['patched']!r} does not start with an outcome")
        measured.add((canonicalize_name(r["package"]), r["release"]))
        inside = all(req.specifier.contains(v, prereleases=True) for req in _lines(patch, r["package"]))
        fixed = _fixed(patch, r["package"])
        if bug == "yes":
            if fixed is not None and fixed.specifier.contains(v, prereleases=True):
                out.append(f"{tag}: bug measured, but at/after fixed_in {patch.fixed_in}")
            if not inside:
                # a buggy release the patch cannot fix stays outside requires (the patch does not
                # touch it) only when the page's "## Limits" names it
                if word in ("APPLIED", "ALREADY_APPLIED") or r["release"] not in limits:
                    out.append(f"{tag}: bug measured, but outside requires {patch.requires} "
                               f"(and '## Limits' of the page does not name {r['release']})")
                continue
            # TARGET_CHANGED: the patch met code it does not know and refused, changing nothing
            # (honest; the page must say why under "## Limits"); anything else must be fixed
            if word == "TARGET_CHANGED":
                if f"{r['release']}" not in limits:
                    out.append(f"{tag}: the patch refuses this buggy release (TARGET_CHANGED) and "
                               f"'## Limits' of the page does not name {r['release']}")
            elif not r["patched"].endswith(", fixed"):
                out.append(f"{tag}: bug measured and the patch did not fix it ({r['patched']})")
        else:
            if inside:
                out.append(f"{tag}: no bug measured, but inside requires {patch.requires}")
            if word in ("APPLIED", "ALREADY_APPLIED"):
                out.append(f"{tag}: no bug, yet the patch applied")
    if len(measured) < 4:
        out.append(f"{len(measured)} measured releases (yes/no rows); want at least 4")
    out += _missing_sides(patch, rows)
    return out


def _missing_sides(patch, rows: list[dict[str, str]]) -> list[str]:
    out = []
    tried: dict[str, list[Version]] = {}
    for r in rows:
        try:
            tried.setdefault(canonicalize_name(r["package"]), []).append(Version(r["release"]))
        except InvalidVersion:
            pass
    reqs = [Requirement(r) for r in patch.requires] + ([Requirement(patch.fixed_in)] if patch.fixed_in else [])
    for req in reqs:
        name = canonicalize_name(req.name)
        if name == "torch":  # torch is never re-installed by the lab; its boundary is the stacks'
            continue
        have = tried.get(name, [])
        for s in req.specifier:
            b = Version(s.version.replace(".*", ""))
            if s.operator in ("==", "!=", "==="):
                ok, want = b in have, f"{b}"
            elif s.operator in ("<=", ">"):
                ok, want = any(v <= b for v in have) and any(v > b for v in have), f"<= {b} and > {b}"
            else:  # <, >=, ~=
                ok, want = any(v < b for v in have) and any(v >= b for v in have), f"< {b} and >= {b}"
            if not ok:
                out.append(f"boundary {req.name}{s}: no row {want} (tried: {sorted(map(str, have))})")
    return out


PATCHES = sorted(registry())


def test_every_patch_has_a_table():
    missing = [pid for pid in PATCHES if LAB.read_rows((DOCS / f"{pid}.md").read_text()
                                                      if (DOCS / f"{pid}.md").exists() else "") is None]
    assert not missing, f"no '## Versions checked' table (scripts/version_lab.py ID --write) for: {missing}"


@pytest.mark.parametrize("pid", PATCHES)
def test_declaration_agrees_with_the_table(pid):
    path = DOCS / f"{pid}.md"
    rows = LAB.read_rows(path.read_text()) if path.exists() else None
    found = problems(registry()[pid], rows, limits_of(path.read_text()) if path.exists() else "")
    assert not found, f"{path.name} vs {pid}'s declaration:\n  " + "\n  ".join(found)


def _flip(text: str, want: str) -> str:
    """``text`` with its first measured row's bug column flipped."""
    lines = text.splitlines()
    for i, ln in enumerate(lines):
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if ln.startswith("|") and len(cells) == 6 and cells[2] in ("yes", "no") and cells[2] != want:
            cells[2] = want
            lines[i] = "| " + " | ".join(cells) + " |"
            return "\n".join(lines) + "\n"
    raise AssertionError("no row to flip")


@pytest.mark.parametrize("want", ["yes", "no"])
def test_a_wrong_row_fails(tmp_path, want):
    """The check can fail: a copy of a page with one row flipped disagrees with its declaration."""
    pid = next(p for p in PATCHES if (DOCS / f"{p}.md").exists()
               and any(r["bug"] in ("yes", "no") and r["bug"] != want
                       for r in LAB.read_rows((DOCS / f"{p}.md").read_text()) or []))
    copy = tmp_path / f"{pid}.md"
    copy.write_text(_flip((DOCS / f"{pid}.md").read_text(), want))
    assert problems(registry()[pid], LAB.read_rows(copy.read_text()))


def test_a_missing_boundary_side_fails():
    from hfpatches._declare import Patch

    p = Patch(id="x", summary="", upstream=(), requires=("pkg>=1.2,<1.4",), fixed_in="pkg>=1.4", targets=())
    rows = [dict(package="pkg", release=r, bug=b, probe="-", patched=o, checked="2026-12-05")
            for r, b, o in (("1.2.0", "yes", "APPLIED, fixed"), ("1.3.0", "yes", "APPLIED, fixed"),
                            ("1.3.5", "yes", "APPLIED, fixed"), ("1.4.0", "no", "NOT_AFFECTED"))]
    assert problems(p, rows) == ["boundary pkg>=1.2: no row < 1.2 and >= 1.2 (tried: ['1.2.0', '1.3.0', '1.3.5', '1.4.0'])"]
    rows.append(dict(rows[0], release="1.1.0", bug="n/a: does not install", patched="-"))
    assert problems(p, rows) == []
    rows.append(dict(rows[0], release="1.5.0", bug="yes"))
    assert any("fixed_in" in s for s in problems(p, rows))


def test_the_lab_round_trips_a_table(tmp_path, monkeypatch):
    """version_lab's --write keeps the prose and the rows of other packages, replaces its own."""
    monkeypatch.setattr(LAB, "DOCS", tmp_path)
    (tmp_path / "x.md").write_text("# x\n\nprose\n\n## Versions checked\n\nold hand-made list\n\n## After\n\nmore\n")
    row = dict(package="a", release="1.0", bug="yes", probe="bug", patched="APPLIED, fixed", checked="2026-12-05")
    LAB.write_doc("x", [row], "note")
    LAB.write_doc("x", [dict(row, package="b")], "note")
    LAB.write_doc("x", [dict(row, bug="no", patched="NOT_AFFECTED")], "note")
    text = (tmp_path / "x.md").read_text()
    assert text.startswith("# x\n\nprose\n\n## Versions checked\n") and text.rstrip().endswith("## After\n\nmore")
    rows = LAB.read_rows(text)
    assert [(r["package"], r["bug"]) for r in rows] == [("a", "no"), ("b", "yes")]


def test_a_buggy_release_outside_requires_must_be_named_in_limits():
    """A measured buggy release below ``requires`` (the patch cannot fix it and leaves it alone)
    passes only when ``## Limits`` names it; applying there never passes."""
    from hfpatches._declare import Patch

    p = Patch(id="x", summary="", upstream=(), requires=("pkg>=1.2",), fixed_in=None, targets=())
    rows = [dict(package="pkg", release=r, bug="yes", probe="bug", patched=o, checked="2026-12-05")
            for r, o in (("1.1.0", "NOT_AFFECTED"), ("1.2.0", "APPLIED, fixed"), ("1.3.0", "APPLIED, fixed"),
                         ("1.4.0", "APPLIED, fixed"))]
    assert any("outside requires" in s for s in problems(p, rows, ""))
    assert problems(p, rows, "* pkg 1.1.0: the patch cannot fix it") == []
    rows[0]["patched"] = "APPLIED, fixed"
    assert any("outside requires" in s for s in problems(p, rows, "* pkg 1.1.0: the patch cannot fix it"))
