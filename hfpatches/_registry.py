"""The catalog: every patch declared under ``hfpatches/patches/``, read without importing any
implementation (a patch package's ``__init__`` holds only its declaration; its ``impl`` module
is imported when the patch attaches)."""
from __future__ import annotations

import os

from ._declare import Patch, import_module

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable
    from typing import Any

_patches: dict[str, Patch] | None = None


def _discover() -> dict[str, Patch]:
    from . import patches as pkg

    names: set[str] = set()
    for d in pkg.__path__:
        for f in os.listdir(d):
            if f.startswith(("_", ".")):
                continue
            if f.endswith(".py"):
                names.add(f[:-3])
            elif os.path.isfile(os.path.join(d, f, "__init__.py")):
                names.add(f)
    found: dict[str, Patch] = {}
    for name in sorted(names):
        modname = f"{pkg.__name__}.{name}"
        mod = import_module(modname)
        patch = getattr(mod, "PATCH", None)
        if not isinstance(patch, Patch):
            continue
        if patch.id != name:
            raise RuntimeError(f"{modname} declares PATCH.id={patch.id!r}: a patch's id is its module name ({name!r})")
        if patch.impl is None:
            is_pkg = hasattr(mod, "__path__")
            patch = patch._replace(impl=f"{modname}.impl" if is_pkg else modname)
        found[patch.id] = patch
    return found


def registry() -> dict[str, Patch]:
    """All patches, in id order (discovered once)."""
    global _patches
    if _patches is None:
        _patches = _discover()
    return _patches


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
