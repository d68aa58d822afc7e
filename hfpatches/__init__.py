"""hfpatches: honest, version-aware fixes for the Hugging Face training stack.

``import hfpatches; hfpatches.apply()`` imports nothing heavy: each patch attaches when its
target module is imported. See README.md for the patches and the environment switches.
"""
from __future__ import annotations

from ._declare import import_module
from ._report import Outcome, PatchError, PatchResult, Report
from ._version import __version__

# ``collections.abc.Iterable`` without importing ``collections`` (start-up budget); real names,
# so that ``typing.get_type_hints`` works on the public functions.
from _collections_abc import Iterable

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from ._declare import Patch

# Nothing heavy here (no torch/transformers, not even typing/contextlib/wrapt): see _hooks.py.

__all__ = [
    "apply", "revert", "status", "patched", "list_patches", "get_original",
    "Report", "PatchResult", "Outcome", "PatchError", "PatchInfo", "__version__",
    # helpers that arrive with their patches (imported lazily on first use)
    "materialize", "peft_state_dict", "explain_load", "LoadReport", "LoadError", "CheckpointError",
]


def apply(only: Iterable[str] | str | None = None, exclude: Iterable[str] | str = (), *,
          strict: bool | None = None) -> Report:
    """Apply the selected patches (default: every default-on patch). Idempotent, thread-safe.

    ``only``/``exclude`` beat ``HFPATCHES_ONLY``/``HFPATCHES_DISABLE``; ``strict`` beats
    ``HFPATCHES_STRICT``. Under strict, FAILED / TARGET_CHANGED / CONFLICT raise
    :class:`PatchError` (for a DEFERRED patch: when its target is imported).
    """
    from ._engine import ENGINE

    if isinstance(only, str):
        only = [s.strip() for s in only.split(",") if s.strip()]
    if isinstance(exclude, str):
        exclude = [s.strip() for s in exclude.split(",") if s.strip()]
    return ENGINE.apply(only, tuple(exclude or ()), strict)


def revert(names: Iterable[str] | str | None = None) -> Report:
    """Restore the originals of the named patches (default: all). Exact: identity holds after."""
    from ._engine import ENGINE

    return ENGINE.revert(names if names is None or isinstance(names, str) else list(names))


def status() -> Report:
    """What is live now, checked by identity. No probe runs, nothing is imported; the run
    manifest (``HFPATCHES_REPORT``) is brought up to date if what is live changed behind our back."""
    from ._engine import ENGINE

    report = ENGINE.status()
    ENGINE.write_manifest("check")
    return report


class patched:
    """Context manager: apply the named patches (all default ones if none) on enter, revert them
    on exit, also when the block raises. ``with hfpatches.patched("meta_buffers") as report: ...``

    Only patches this block made live (or left waiting for an import) are reverted; ones that
    were already live before stay live.
    """

    def __init__(self, *names: str) -> None:
        self.names = names
        self.report: Report | None = None
        self._before: set[str] = set()

    def __enter__(self) -> Report:
        from ._engine import ENGINE

        self._before = set(ENGINE.live_ids())
        self.report = apply(list(self.names) if self.names else None)
        return self.report

    def __exit__(self, *exc: object) -> None:
        from ._engine import ENGINE

        mine = [pid for pid, r in (self.report or {}).items()
                if pid not in self._before and (ENGINE.recorder.records(pid) or r.outcome == Outcome.DEFERRED)]
        if mine:
            revert(mine)


class PatchInfo:
    """Read-only description of one patch (``list_patches()``)."""

    __slots__ = ("id", "summary", "upstream", "requires", "fixed_in", "default_enabled",
                 "enable_env", "affected", "verified_stacks", "targets", "docs")
    id: str
    summary: str
    upstream: tuple[str, ...]
    requires: tuple[str, ...]
    fixed_in: str | None
    targets: tuple[str, ...]
    default_enabled: bool
    enable_env: str | None
    affected: str
    verified_stacks: tuple[str, ...]
    docs: str

    def __init__(self, p: Patch) -> None:
        for k in self.__slots__[:-2]:
            setattr(self, k, getattr(p, k))
        self.targets = tuple(t.path for t in p.targets)
        self.docs = f"docs/patches/{p.id}.md"

    def __repr__(self) -> str:
        return f"PatchInfo({self.id!r}, requires={self.requires}, fixed_in={self.fixed_in!r})"


def list_patches() -> list[PatchInfo]:
    from ._registry import registry

    return [PatchInfo(p) for p in registry().values()]


def get_original(name_or_target: object) -> object:
    """The unpatched object for a patch id, a dotted attribute path, or a patched object."""
    from ._engine import get_original as _go

    return _go(name_or_target)


_LAZY = {
    "materialize": "hfpatches.patches.meta_buffers.impl",
    "peft_state_dict": "hfpatches.peft_keys",
    "explain_load": "hfpatches.loading",
    "LoadReport": "hfpatches.loading",
    "LoadError": "hfpatches.errors",
    "CheckpointError": "hfpatches.errors",
    "flair": "hfpatches.patches.peft_save_load.flair",
}


def __getattr__(name: str) -> object:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'hfpatches' has no attribute {name!r}")
    if name == "flair":
        return import_module(mod)
    return getattr(import_module(mod), name)
