"""The catalog: every patch declared under ``hfpatches/patches/``, read without importing any
declaration or implementation at start-up.

Start-up reads one generated module, :mod:`hfpatches._index` (every declaration's data, written
by ``scripts/matrix.py --write``, checked for drift by ``matrix.py --check`` and the tests), so
``import hfpatches; apply()`` costs the same however many patches the catalog holds. A patch
directory the index does not know yet (a new patch before the index was regenerated) is read
from its declaration; an index entry without a directory is dropped. A patch package's
``__init__`` holds only its declaration; its ``impl`` module is imported when the patch attaches.
Advisories (known bugs with no patch, ``hfpatches/advisories``) are read only by ``doctor``,
``audit`` and the README matrix.
"""
from __future__ import annotations

import os

from ._declare import Advisory, Patch, import_module

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable
    from typing import Any

_patches: dict[str, Patch] | None = None
_PATCH_PKG = "hfpatches.patches"
_PATCH_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "patches")


def _patch_names() -> list[str]:
    """The patch packages (and single-module patches) present, by name: one directory listing."""
    names: set[str] = set()
    for f in os.listdir(_PATCH_DIR):
        if f.startswith(("_", ".")):
            continue
        if f.endswith(".py"):
            names.add(f[:-3])
        elif os.path.isfile(os.path.join(_PATCH_DIR, f, "__init__.py")):
            names.add(f)
    return sorted(names)


def declared(name: str) -> Patch | None:
    """Import ``hfpatches.patches.<name>`` and return its ``PATCH`` (``impl`` filled in)."""
    modname = f"{_PATCH_PKG}.{name}"
    mod = import_module(modname)
    patch = getattr(mod, "PATCH", None)
    if not isinstance(patch, Patch):
        return None
    if patch.id != name:
        raise RuntimeError(f"{modname} declares PATCH.id={patch.id!r}: a patch's id is its module name ({name!r})")
    if patch.impl is None:
        is_pkg = hasattr(mod, "__path__")
        patch = patch._replace(impl=f"{modname}.impl" if is_pkg else modname)
    return patch


def declarations() -> dict[str, Patch]:
    """Every declaration, imported from its package (the index generator and its drift test)."""
    found = {}
    for name in _patch_names():
        patch = declared(name)
        if patch is not None:
            found[name] = patch
    return found


def _discover() -> dict[str, Patch]:
    from ._index import PATCHES

    indexed = {p.id: p for p in PATCHES}
    found: dict[str, Patch] = {}
    for name in _patch_names():
        patch = indexed.get(name)
        if patch is None:   # not in the index yet: read its declaration
            patch = declared(name)
        if patch is not None:
            found[name] = patch
    return found


def registry() -> dict[str, Patch]:
    """All patches, in id order (discovered once)."""
    global _patches
    if _patches is None:
        _patches = _discover()
    return _patches


def advisories() -> dict[str, Advisory]:
    """Every advisory (``hfpatches/advisories``), in id order. Not read at start-up."""
    from .advisories import ADVISORIES

    return {a.id: a for a in sorted(ADVISORIES, key=lambda a: a.id)}


def register_for_tests(patch: Patch) -> None:
    """Add a patch declared outside ``hfpatches/patches`` (the core's own tests use fake targets)."""
    registry()[patch.id] = patch


def implementation(patch: Patch, name: str, required: bool = True) -> Callable[..., Any] | None:
    """``patch.<name>`` if declared, else ``<name>`` of its ``impl`` module (imported now)."""
    fn = getattr(patch, name)
    if fn is not None:
        return fn  # type: ignore[no-any-return]
    if patch.impl is None:
        if required:
            raise RuntimeError(f"patch {patch.id!r} declares no {name} and no impl module")
        return None
    mod = import_module(patch.impl)
    fn = getattr(mod, name, None)
    if fn is None and required:
        raise RuntimeError(f"{patch.impl} has no {name}() (patch {patch.id!r})")
    return fn  # type: ignore[no-any-return]
