"""The recorder that owns every mutation, and the :class:`PatchContext` a patch mutates through.

A patch never touches the engine, the hooks or another patch's state: everything it needs is on
the context its ``apply(ctx)`` receives (``replace``, ``wrap``, ``original``, ``on_import``,
``state``, ``log``, ``module``), and all of it is undone or made inert by ``revert()``.
"""
from __future__ import annotations

import sys

from . import _hooks, _log
from ._declare import import_module, raw_getattr

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable
    from typing import Any, ContextManager

    from ._declare import Patch

OURS, ORIGINAL, FOREIGN = "ours", "original", "foreign"


def qualname(owner: Any) -> str:
    return getattr(owner, "__qualname__", None) or getattr(owner, "__name__", None) or repr(owner)


def _has_own(owner: Any, name: str) -> bool:
    try:
        return name in vars(owner)
    except TypeError:
        return hasattr(owner, name)


def _home(owner: Any) -> str:
    mod = owner.__name__ if isinstance(owner, type(sys)) else getattr(owner, "__module__", "") or ""
    return str(mod).split(".")[0]


def _foreign_reason(value: Any, owner: Any, owned: set[int]) -> str | None:
    """Why ``value`` looks like somebody else's patch (None when it looks original)."""
    import wrapt

    if id(value) in owned:
        return None
    if isinstance(value, wrapt.BaseObjectProxy):
        return f"it is already wrapped by a wrapt proxy we do not own ({type(value).__qualname__})"
    func = getattr(value, "__func__", value)
    mod = getattr(func, "__module__", None)
    home = _home(owner)
    if isinstance(mod, str) and home and mod.split(".")[0] not in (home, "builtins"):
        return f"it was replaced by {mod}.{getattr(func, '__qualname__', '?')} (not {home}'s own code)"
    return None


class Conflict(Exception):
    """Raised inside ``apply`` when the attribute is somebody else's patch."""


class Mutation:
    """One recorded mutation. ``original``: the raw stored value before we touched it (the first
    original); ``had_own`` False: it was inherited / absent, so revert deletes it."""

    __slots__ = ("owner", "name", "original", "had_own", "replacement", "patch_id")

    def __init__(self, owner: Any, name: str, original: Any, had_own: bool, replacement: Any, patch_id: str):
        self.owner, self.name, self.original = owner, name, original
        self.had_own, self.replacement, self.patch_id = had_own, replacement, patch_id

    @property
    def path(self) -> str:
        return f"{qualname(self.owner)}.{self.name}"

    def state(self) -> str:
        """Checked by identity, never remembered: OURS (our replacement is in place), ORIGINAL
        (somebody put the original back), FOREIGN (somebody else's object is there)."""
        current = raw_getattr(self.owner, self.name, None)
        if current is self.replacement:
            return OURS
        if self.had_own and current is self.original:
            return ORIGINAL
        if not self.had_own and not _has_own(self.owner, self.name):
            return ORIGINAL
        return FOREIGN


class Recorder:
    """Owns every mutation hfpatches makes; restores exactly what it still owns."""

    def __init__(self) -> None:
        self._records: dict[tuple[int, str], Mutation] = {}

    def owned_ids(self) -> set[int]:
        return {id(r.replacement) for r in self._records.values()}

    def set(self, patch_id: str, owner: Any, name: str, replacement: Any) -> Any:
        key = (id(owner), name)
        rec = self._records.get(key)
        if rec is not None and rec.patch_id != patch_id:
            raise Conflict(f"{qualname(owner)}.{name} is already patched by hfpatches patch {rec.patch_id!r}")
        current = raw_getattr(owner, name, None)
        if rec is None:
            # A binding by name of an object this patch already recorded as an original elsewhere
            # (``from accelerate import f`` in another package) is that original, not a foreign patch.
            known = any(current is r.original for r in self.records(patch_id))
            why = None if known else _foreign_reason(current, owner, self.owned_ids())
            if why:
                raise Conflict(f"{qualname(owner)}.{name}: {why}")
            rec = Mutation(owner, name, current, _has_own(owner, name), replacement, patch_id)
        elif current is not rec.replacement:
            raise Conflict(f"{qualname(owner)}.{name} was re-patched by someone else after hfpatches")
        rec.replacement = replacement
        setattr(owner, name, replacement)
        self._records[key] = rec
        return rec.original

    def records(self, patch_id: str) -> list[Mutation]:
        return [r for r in self._records.values() if r.patch_id == patch_id]

    def live(self, patch_id: str) -> bool:
        """Every mutation of ``patch_id`` is in place (checked by identity now)."""
        recs = self.records(patch_id)
        return bool(recs) and all(r.state() == OURS for r in recs)

    def forget_restored(self, patch_id: str) -> list[str]:
        """Drop the records of attributes somebody else put back to the original (there is
        nothing of ours left to undo there); return their paths."""
        gone = []
        for key, rec in list(self._records.items()):
            if rec.patch_id == patch_id and rec.state() == ORIGINAL:
                del self._records[key]
                gone.append(rec.path)
        return gone

    def blocked(self, patch_id: str) -> list[str]:
        """Why ``patch_id`` cannot be reverted now: its targets somebody else's object sits on
        (empty: nothing stands in the way)."""
        return [f"{rec.path} was patched again by someone else (e.g. a profiler wrapped it); the whole patch is "
                "left in place: its targets are reverted together or not at all"
                for rec in self.records(patch_id) if rec.state() == FOREIGN]

    def restore(self, patch_id: str) -> list[str]:
        """Undo every mutation of ``patch_id``, newest first, as a unit; return what stands in the
        way. A multi-target patch (a ``forward`` and the ``backward`` that reads what it saved)
        is never half reverted: when any of its targets holds somebody else's object now (a
        wrapper around ours), nothing is restored and every target stays as it is (status:
        CONFLICT, the reason says which); once the original or our object is back there, the
        next revert restores all of them. Targets somebody put back to the original are
        forgotten."""
        left = self.blocked(patch_id)
        if left:
            return left
        for key, rec in reversed(list(self._records.items())):
            if rec.patch_id != patch_id:
                continue
            if rec.state() == OURS:
                if rec.had_own:
                    setattr(rec.owner, rec.name, rec.original)
                else:
                    delattr(rec.owner, rec.name)
            del self._records[key]
        return left

    def original_of(self, owner: Any, name: str) -> Any:
        rec = self._records.get((id(owner), name))
        return rec.original if rec else raw_getattr(owner, name)

    def find_by_replacement(self, obj: Any) -> Mutation | None:
        for rec in self._records.values():
            if rec.replacement is obj or getattr(obj, "__func__", _NOTHING) is getattr(rec.replacement, "__func__", None):
                return rec
        return None


_NOTHING = object()


class PatchLogger:
    """``ctx.log``: the ``hfpatches.<patch id>`` logger (records wait until logging is imported)."""

    __slots__ = ("name",)

    def __init__(self, patch_id: str) -> None:
        self.name = f"hfpatches.{patch_id}"

    def info(self, msg: str, *args: object) -> None:
        _log.log(_log.INFO, msg, *args, name=self.name)

    def warning(self, msg: str, *args: object) -> None:
        _log.log(_log.WARNING, msg, *args, name=self.name)


class ProbeContext:
    """What a patch's ``probe(ctx)`` and ``check(ctx)`` get: read-only.

    ``patch``: the declaration (``ctx.patch.id``, its targets, its range); ``log``: the patch's
    logger (``hfpatches.<id>``); ``module(name)``: an imported module (imports it if needed);
    ``resolve(target)``: ``(owner, name, raw value)`` of one of the declaration's targets (a
    :class:`~hfpatches._declare.Target` or its index in ``patch.targets``).
    """

    def __init__(self, patch: Patch) -> None:
        self.patch = patch
        self.log = PatchLogger(patch.id)

    @property
    def id(self) -> str:
        return self.patch.id

    def module(self, name: str) -> Any:
        return sys.modules.get(name) or import_module(name)

    def resolve(self, target: Any) -> tuple[Any, str, Any]:
        t = self.patch.targets[target] if isinstance(target, int) else target
        return t.resolve()  # type: ignore[no-any-return]


class PatchContext(ProbeContext):
    """What a patch's ``apply(ctx)`` uses to change anything; every change is recorded and
    undone by ``revert()``.

    ``replace(owner, name, value)`` / ``wrap(owner, name, wrapper)``: mutate (recorded).
    ``original(owner, name)``: the unpatched raw value. ``on_import(module, fn)``: call
    ``fn(module_object)`` when ``module`` is imported (now if it is), under the engine's lock,
    never after a revert. ``state``: a dict for the patch's own bookkeeping, dropped on revert.
    ``log``: the patch's logger. ``module(name)``: an imported module (imports it if needed).
    """

    def __init__(self, patch: Patch, recorder: Recorder, lock: ContextManager[Any]) -> None:
        super().__init__(patch)
        self.state: dict[str, Any] = {}
        self.awaited: list[str] = []
        self._rec = recorder
        self._lock = lock
        self._live = True

    @property
    def live(self) -> bool:
        return self._live

    def close(self) -> None:
        """Called by the engine on revert (or a failed apply): hooks go inert, state is dropped."""
        self._live = False
        self.state.clear()

    def replace(self, owner: Any, name: str, value: Any) -> Any:
        """Set ``owner.name = value``; returns the original raw value."""
        return self._rec.set(self.patch.id, owner, name, value)

    def wrap(self, owner: Any, name: str, wrapper: Callable[..., Any]) -> Any:
        """Wrap ``owner.name`` with a wrapt ``FunctionWrapper`` (descriptor-correct: classmethods,
        staticmethods and methods keep working). ``wrapper(wrapped, instance, args, kwargs)``."""
        import wrapt

        raw = raw_getattr(owner, name)
        proxy = wrapt.FunctionWrapper(raw, wrapper)
        self._rec.set(self.patch.id, owner, name, proxy)
        return proxy

    def original(self, owner: Any, name: str) -> Any:
        """The raw value ``owner.name`` had before hfpatches touched it (the current one if never)."""
        return self._rec.original_of(owner, name)

    def on_import(self, module: str, fn: Callable[[Any], None]) -> None:
        """Run ``fn(module_object)`` once ``module`` is imported, while this patch is live."""
        self.awaited.append(module)

        def hook(mod: Any) -> None:
            with self._lock:
                if not self._live:
                    return
                try:
                    fn(mod)
                except Exception as e:  # never break the user's import because of us
                    self.log.warning("%s: on_import(%s) raised %s: %s", self.patch.id, module, type(e).__name__, e)

        _hooks.when_imported(module, hook)
