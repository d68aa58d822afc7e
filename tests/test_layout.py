"""The core's shape (issue: core v2): layers point one way, no import cycles, patches import only
their declaration module from the core, typing of the public API resolves."""
from __future__ import annotations

import ast
import typing
from pathlib import Path

import hfpatches

PKG = Path(hfpatches.__file__).resolve().parent
#: core modules a patch never imports (it gets a PatchContext instead)
ENGINE_SIDE = {"hfpatches._engine", "hfpatches._registry", "hfpatches._recorder", "hfpatches._hooks",
               "hfpatches._auto", "hfpatches._report", "hfpatches._log", "hfpatches"}


def _modname(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_modname(p): p for p in PKG.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every hfpatches module ``name`` imports, at module level or inside functions."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "hfpatches":
                    out.add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                root = ".".join(base[: len(base) - node.level + 1])
                mod = f"{root}.{node.module}" if node.module else root
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "hfpatches":
                continue
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known]
            out.update(subs or [mod])
    out.discard(name)
    return {m for m in out if m in known}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {n: _imports(n, p, known) for n, p in mods.items()}


def test_no_import_cycles_anywhere():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles (counting imports inside functions): " + "; ".join(" -> ".join(c) for c in cycles)


def test_hooks_is_a_leaf_and_declarations_import_nothing_of_ours():
    graph = _graph()
    assert graph["hfpatches._hooks"] == set()
    assert graph["hfpatches._declare"] == set()
    assert graph["hfpatches._env"] == set()


def test_patches_import_only_their_declaration_module_from_the_core():
    graph = _graph()
    bad = {n: sorted(deps & ENGINE_SIDE) for n, deps in graph.items()
           if n.startswith("hfpatches.patches.") and deps & ENGINE_SIDE}
    assert not bad, f"patch modules reach into the engine side: {bad}"


def test_only_the_catalog_imports_patch_packages():
    """Shared rules live in core modules (e.g. ``_bert_checkpoint``) that patches import, never the
    other way: outside ``hfpatches.patches`` and the demos (one per patch) only the catalog and the
    public ``hfpatches.flair`` alias import a patch package."""
    allowed = {"hfpatches._registry", "hfpatches.flair"}
    bad = {n: sorted(d for d in deps if d.startswith("hfpatches.patches.")) for n, deps in _graph().items()
           if not n.startswith(("hfpatches.patches", "hfpatches.demos")) and n not in allowed}
    assert not {n: d for n, d in bad.items() if d}, bad


def test_declarations_do_not_import_implementations():
    graph = _graph()
    for n, deps in graph.items():
        if n.startswith("hfpatches.patches.") and n.count(".") == 2:   # hfpatches.patches.<id>
            assert deps <= {"hfpatches._declare", "hfpatches._env"}, (n, deps)


def test_public_type_hints_resolve():
    for name in ("apply", "revert", "status", "list_patches", "get_original"):
        typing.get_type_hints(getattr(hfpatches, name))
    typing.get_type_hints(hfpatches.patched.__init__)


def test_every_patch_has_short_docs_and_rationale():
    from hfpatches._registry import registry

    root = PKG.parent
    for pid in registry():
        mod = __import__(f"hfpatches.patches.{pid}", fromlist=["PATCH"])
        doc = mod.__doc__ or ""
        assert len(doc.strip().splitlines()) <= 30, f"{pid}: user docstring longer than 30 lines"
        for section in ("Bug", "Affected", "Upstream", "Probe", "What changes"):
            assert f"\n{section}\n" in doc, f"{pid}: docstring lacks the {section!r} section"
        assert (root / "docs" / "patches" / f"{pid}.md").is_file(), f"{pid}: docs/patches/{pid}.md missing"


def test_scaffold_adds_a_patch_without_touching_the_core(tmp_path):
    """scripts/new_patch.py writes a patch the registry discovers; no core file changes."""
    import hashlib
    import json
    import os
    import shutil
    import subprocess
    import sys

    root = PKG.parent
    shutil.copytree(root / "hfpatches", tmp_path / "hfpatches", ignore=shutil.ignore_patterns("__pycache__"))
    before = {p.relative_to(tmp_path): hashlib.sha256(p.read_bytes()).hexdigest()
              for p in (tmp_path / "hfpatches").rglob("*.py")}
    subprocess.run([sys.executable, str(root / "scripts" / "new_patch.py"), "trivial_fix", "--root", str(tmp_path)],
                   check=True, capture_output=True, text=True)
    after = {p.relative_to(tmp_path): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in (tmp_path / "hfpatches").rglob("*.py")}
    changed = [str(p) for p in before if after.get(p) != before[p]]
    assert not changed, changed
    code = ("import hfpatches, json; d = hfpatches.apply()['trivial_fix']; r = hfpatches.apply(only=['trivial_fix']);"
            "print(json.dumps([d.to_dict(), r['trivial_fix'].to_dict()]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path), "PATH": ""},
                         check=True, capture_output=True, text=True).stdout
    default, chosen = json.loads(out)
    assert default["outcome"] == "DISABLED" and "opt-in" in default["reason"], default   # starts opt-in
    assert chosen["outcome"] == "NOT_INSTALLED", chosen     # somepkg is not installed: honest, nothing touched
    for rel in ("docs/patches/trivial_fix.md", "scripts/lab/trivial_fix.py", "hfpatches/demos/trivial_fix.py",
                "tests/test_trivial_fix.py", "gpu_tests/test_trivial_fix.py"):
        assert (tmp_path / rel).is_file(), rel
    assert "## Versions checked" in (tmp_path / "docs" / "patches" / "trivial_fix.md").read_text()
    # the generated tests fail until the work is done (none of them passes or skips)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                          "-o", "addopts=", str(tmp_path / "tests" / "test_trivial_fix.py")],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True)
    assert run.returncode == 1 and "2 failed" in run.stdout, run.stdout[-2000:]
