"""Patch declarations, the recorder that owns every mutation, and the apply engine.

Order of checks for one patch (DESIGN.md): installed? -> version range -> target modules
imported (else DEFERRED, attach on import) -> target still has the expected shape -> probe says
the bug is present -> apply -> probe again says it is fixed (else roll back, FAILED).
"""
from __future__ import annotations

import _thread
import importlib
import os
import sys

from . import _env
from ._report import BAD_OUTCOMES, LIVE_OUTCOMES, OK_OUTCOMES, Outcome, PatchError, PatchResult, Report

# Start-up budget (<= 15 ms for ``import hfpatches; apply()``): no dataclasses, typing, inspect,
# importlib.metadata, packaging or wrapt at import time; they load when a patch attaches, which
# only happens when its (heavy) target is imported anyway.

_early: list[tuple[int, str, tuple]] = []   # records made before anyone imported logging


def _log(level: int, msg: str, *args) -> None:
    """Log on the ``hfpatches`` logger (INFO=20, WARNING=30). ``logging`` is not imported for us:
    until something else imports it (any target does; so does a user configuring logging) the
    records wait here, in order, and are emitted on the next call after it is there. Nothing is
    dropped; ``status()`` always has the full picture."""
    logging = sys.modules.get("logging")
    if logging is None:
        _early.append((level, msg, args))
        return
    # No NullHandler on purpose: with logging unconfigured, WARNING records (FAILED,
    # TARGET_CHANGED, CONFLICT) still reach stderr through logging's last-resort handler.
    log = logging.getLogger("hfpatches")
    while _early:
        lvl, m, a = _early.pop(0)
        log.log(lvl, m, *a)
    log.log(level, msg, *args)

_MISSING = object()


class _Frozen:
    """Tiny immutable record (keyword or positional init, repr, equality) without dataclasses."""

    __slots__: tuple[str, ...] = ()
    _defaults: dict = {}

    def __init__(self, *args, **kwargs) -> None:
        names = self.__slots__
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes at most {len(names)} arguments")
        values = dict(zip(names, args))
        for k, v in kwargs.items():
            if k not in names:
                raise TypeError(f"{type(self).__name__} got an unexpected keyword argument {k!r}")
            if k in values:
                raise TypeError(f"{type(self).__name__} got multiple values for {k!r}")
            values[k] = v
        for k in names:
            if k not in values:
                if k not in self._defaults:
                    raise TypeError(f"{type(self).__name__} missing required argument {k!r}")
                values[k] = self._defaults[k]
            object.__setattr__(self, k, values[k])

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _tuple(self) -> tuple:
        return tuple(getattr(self, k) for k in self.__slots__)

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and self._tuple() == other._tuple()

    def __hash__(self) -> int:
        return hash(tuple(id(v) if callable(v) else v for v in self._tuple()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in self.__slots__)})"


# ----------------------------------------------------------------------------- declarations
class Target(_Frozen):
    """One attribute a patch replaces: ``module`` must be imported before the patch attaches.

    ``attr`` is a dotted path inside the module (``"BertPreTrainedModel.from_pretrained"``).
    ``params``: parameter names the target's signature must start with (the shape check);
    a target whose signature changed is reported TARGET_CHANGED instead of being patched.
    """

    __slots__ = ("module", "attr", "params")
    _defaults = {"params": None}

    @property
    def path(self) -> str:
        return f"{self.module}.{self.attr}"

    def resolve(self):
        """Return ``(owner, name, raw_value)``; the raw value as stored (a classmethod stays one)."""
        owner = sys.modules[self.module]
        *parents, name = self.attr.split(".")
        for p in parents:
            owner = getattr(owner, p)
        return owner, name, _raw_getattr(owner, name)


class ProbeResult(_Frozen):
    """A probe's verdict: ``bug_present`` and a short ``detail`` shown in the reason.

    ``bug_present=None``: the probe could not run here (say why in ``detail``); the version range
    decides and the reason says that no probe ran."""

    __slots__ = ("bug_present", "detail")
    _defaults = {"detail": ""}


class Patch(_Frozen):
    """A fix: the declaration (a frozen record). One per file under ``hfpatches/patches/``,
    exported there as ``PATCH``.

    id, summary, upstream (refs), requires (PEP 508 lines, e.g. ``"liger-kernel>=0.5.6,<0.5.7"``),
    fixed_in (``"liger-kernel>=0.5.7"`` or None), targets, probe (``() -> bool | ProbeResult``,
    True: the installed code has the bug), apply (``(PatchContext) -> None``), default_enabled
    (False: opt-in), enable_env (env var that switches an opt-in patch on), check (extra shape
    check returning a reason when the target changed), affected (README text), verified_stacks.
    """

    __slots__ = ("id", "summary", "upstream", "requires", "fixed_in", "targets", "probe", "apply",
                 "default_enabled", "enable_env", "check", "affected", "verified_stacks")
    _defaults = {"default_enabled": True, "enable_env": None, "check": None, "affected": "",
                 "verified_stacks": ()}

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.module for t in self.targets))


# ----------------------------------------------------------------------------- recorder
def _raw_getattr(owner: Any, name: str, default: Any = _MISSING) -> Any:
    """The attribute as stored (``inspect.getattr_static`` semantics for classes)."""
    if isinstance(owner, type):
        for klass in owner.__mro__:
            if name in vars(klass):
                return vars(klass)[name]
        if default is _MISSING:
            raise AttributeError(f"{owner.__qualname__} has no attribute {name!r}")
        return default
    return getattr(owner, name) if default is _MISSING else getattr(owner, name, default)


def _has_own(owner: Any, name: str) -> bool:
    try:
        return name in vars(owner)
    except TypeError:
        return hasattr(owner, name)


def _home(owner) -> str:
    mod = owner.__name__ if isinstance(owner, type(sys)) else getattr(owner, "__module__", "") or ""
    return mod.split(".")[0]


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


class _Record:
    """One recorded mutation. ``original``: the raw stored value before we touched it (the first
    original); ``had_own`` False: it was inherited / absent, so revert deletes it."""

    __slots__ = ("owner", "name", "original", "had_own", "replacement", "patch_id")

    def __init__(self, owner, name, original, had_own, replacement, patch_id):
        self.owner, self.name, self.original = owner, name, original
        self.had_own, self.replacement, self.patch_id = had_own, replacement, patch_id


class Recorder:
    """Owns every mutation hfpatches makes; restores exactly what it still owns."""

    def __init__(self) -> None:
        self._records: dict[tuple[int, str], _Record] = {}

    def _key(self, owner: Any, name: str) -> tuple[int, str]:
        return (id(owner), name)

    def owned_ids(self) -> set[int]:
        return {id(r.replacement) for r in self._records.values()}

    def set(self, patch_id: str, owner: Any, name: str, replacement: Any) -> Any:
        key = self._key(owner, name)
        rec = self._records.get(key)
        if rec is not None and rec.patch_id != patch_id:
            raise Conflict(f"{_qual(owner)}.{name} is already patched by hfpatches patch {rec.patch_id!r}")
        current = _raw_getattr(owner, name, None)
        if rec is None:
            why = _foreign_reason(current, owner, self.owned_ids())
            if why:
                raise Conflict(f"{_qual(owner)}.{name}: {why}")
            rec = _Record(owner, name, current, _has_own(owner, name), replacement, patch_id)
        elif _raw_getattr(owner, name, None) is not rec.replacement:
            raise Conflict(f"{_qual(owner)}.{name} was re-patched by someone else after hfpatches")
        rec.replacement = replacement
        setattr(owner, name, replacement)
        self._records[key] = rec
        return rec.original

    def records(self, patch_id: str) -> list[_Record]:
        return [r for r in self._records.values() if r.patch_id == patch_id]

    def restore(self, patch_id: str) -> list[str]:
        """Undo every mutation of ``patch_id``, newest first; return what could not be undone."""
        left: list[str] = []
        for key, rec in reversed(list(self._records.items())):
            if rec.patch_id != patch_id:
                continue
            current = _raw_getattr(rec.owner, rec.name, None)
            if current is not rec.replacement:
                left.append(f"{_qual(rec.owner)}.{rec.name} was patched again by someone else; left in place")
                continue
            if rec.had_own:
                setattr(rec.owner, rec.name, rec.original)
            else:
                delattr(rec.owner, rec.name)
            del self._records[key]
        return left

    def original_of(self, owner: Any, name: str) -> Any:
        rec = self._records.get(self._key(owner, name))
        return rec.original if rec else _raw_getattr(owner, name)

    def find_by_replacement(self, obj: Any) -> _Record | None:
        for rec in self._records.values():
            if rec.replacement is obj or getattr(obj, "__func__", _MISSING) is getattr(rec.replacement, "__func__", None):
                return rec
        return None


def _qual(owner: Any) -> str:
    return getattr(owner, "__qualname__", None) or getattr(owner, "__name__", None) or repr(owner)


class PatchContext:
    """What a patch's ``apply`` uses to mutate anything; every change is recorded."""

    def __init__(self, patch: Patch, recorder: Recorder):
        self.patch = patch
        self._rec = recorder

    def module(self, name: str):
        return sys.modules.get(name) or importlib.import_module(name)

    def replace(self, owner: Any, name: str, value: Any) -> Any:
        """Set ``owner.name = value``; returns the original raw value."""
        return self._rec.set(self.patch.id, owner, name, value)

    def wrap(self, owner: Any, name: str, wrapper: Callable) -> Any:
        """Wrap ``owner.name`` with a wrapt ``FunctionWrapper`` (descriptor-correct: classmethods,
        staticmethods and methods keep working). ``wrapper(wrapped, instance, args, kwargs)``."""
        import wrapt

        raw = _raw_getattr(owner, name)
        proxy = wrapt.FunctionWrapper(raw, wrapper)
        self._rec.set(self.patch.id, owner, name, proxy)
        return proxy


# ----------------------------------------------------------------------------- registry
_patches: dict[str, Patch] | None = None


def registry() -> dict[str, Patch]:
    """All patches, discovered from ``hfpatches/patches/*.py`` (each exports ``PATCH``)."""
    global _patches
    if _patches is None:
        from . import patches as pkg

        names = sorted({f[:-3] for d in pkg.__path__ for f in os.listdir(d)
                        if f.endswith(".py") and not f.startswith("_")})
        found: dict[str, Patch] = {}
        for name in names:
            mod = importlib.import_module(f"{pkg.__name__}.{name}")
            patch = getattr(mod, "PATCH", None)
            if isinstance(patch, Patch):
                if patch.id in found:
                    raise RuntimeError(f"duplicate patch id {patch.id!r} in {mod.__name__}")
                found[patch.id] = patch
        _patches = found
    return _patches


def _register_for_tests(patch: Patch) -> None:
    """Add a patch outside ``hfpatches/patches`` (the framework's own tests use fake targets)."""
    registry()[patch.id] = patch


# ----------------------------------------------------------------------------- engine
def dist_version(dist: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _ready(module: str, done: str | None = None) -> bool:
    """``module`` and every package above it are imported *completely*. A post-import hook of
    ``torch.nn.modules.module`` fires while ``torch/__init__`` is still running (``torch.nn`` is
    not even bound yet); a patch attaches only once its whole package chain is initialised.
    ``done``: the module whose post-import hook is firing; its code has run completely, although
    the import system still flags it as initialising until the hook returns."""
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        mod = sys.modules.get(name)
        if mod is None:
            return False
        if name != done and getattr(getattr(mod, "__spec__", None), "_initializing", False):
            return False
    return True


def _findable(module: str) -> bool:
    """Is the top-level package of ``module`` installed? No import, no metadata scan, and not
    even ``importlib.util`` (it pulls contextlib & co.: several ms of the start-up budget): ask
    the ``sys.meta_path`` finders directly, as the import system does for a top-level name."""
    top = module.partition(".")[0]
    if top in sys.modules:
        return True
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None or type(finder).__name__ in ("_Sentinel", "ImportHookFinder"):
            continue
        try:
            if find(top, None) is not None:
                return True
        except (ImportError, ValueError):
            continue
    return False


def _check_requires(patch: Patch) -> tuple[Outcome | None, str, str | None, bool | None]:
    """(outcome-or-None-to-continue, reason, "dist version", in_range)."""
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version

    shown = []
    for line in patch.requires:
        req = Requirement(line)
        ver = dist_version(req.name)
        if ver is None:
            return Outcome.NOT_INSTALLED, f"{req.name} is not installed", None, None
        shown.append(f"{req.name} {ver}")
        try:
            v = Version(ver)
        except InvalidVersion:
            return Outcome.TARGET_CHANGED, f"{req.name} has an unparseable version {ver!r}", ", ".join(shown), None
        if not req.specifier.contains(v, prereleases=True):
            fixed = f"; fixed in {patch.fixed_in}" if patch.fixed_in else ""
            return (Outcome.NOT_AFFECTED, f"{req.name} {ver} is outside the affected range "
                    f"{req.specifier}{fixed}", ", ".join(shown), False)
    return None, "", ", ".join(shown) or None, True


def _check_shape(patch: Patch) -> str | None:
    import inspect

    for t in patch.targets:
        try:
            _owner, _name, raw = t.resolve()
        except (AttributeError, KeyError) as e:
            return f"{t.path} not found ({e})"
        if t.params is not None:
            func = getattr(raw, "__func__", raw)
            try:
                names = tuple(inspect.signature(func).parameters)
            except (TypeError, ValueError):
                return f"{t.path} has no inspectable signature"
            if names[: len(t.params)] != t.params:
                return f"{t.path} signature is ({', '.join(names)}), expected it to start with ({', '.join(t.params)})"
    if patch.check is not None:
        return patch.check()
    return None


def _run_probe(patch: Patch) -> ProbeResult:
    res = patch.probe()
    return res if isinstance(res, ProbeResult) else ProbeResult(bool(res))


class Engine:
    def __init__(self) -> None:
        self.lock = _thread.RLock()
        self.recorder = Recorder()
        self.results: dict[str, PatchResult] = {}
        self.wanted: set[str] = set()        # patches apply() asked for and revert() has not undone
        self.hooked: set[tuple[str, str]] = set()
        self.strict_for: dict[str, bool] = {}
        self.probe_for: dict[str, bool] = {}

    # -- selection -------------------------------------------------------------------------
    def select(self, only, exclude) -> tuple[list[str], dict[str, str]]:
        reg = registry()
        valid = ", ".join(sorted(reg))

        def check(names, source):
            names = tuple([names] if isinstance(names, str) else names)
            for n in names:
                if n != "*" and n not in reg:
                    raise ValueError(f"unknown patch id {n!r} in {source}; valid ids: {valid}")
            return names

        if only is not None:
            chosen, why_src = list(check(only, "only=")), "only="
        else:
            env_only = _env.get_list(_env.ONLY)
            if env_only is not None:
                chosen, why_src = list(check(env_only, _env.ONLY)), _env.ONLY
            else:
                chosen, why_src = [], None
        disabled: dict[str, str] = {}
        if exclude:
            excl, excl_src = check(exclude, "exclude="), "exclude="
        elif only is None:
            excl, excl_src = check(_env.get_list(_env.DISABLE) or (), _env.DISABLE), _env.DISABLE
        else:
            excl, excl_src = (), ""
        for pid, p in reg.items():
            if why_src is not None and pid not in chosen and "*" not in chosen:
                disabled[pid] = f"not selected ({why_src} {','.join(chosen)})"
            elif "*" in excl or pid in excl:
                disabled[pid] = f"disabled by {excl_src}"
            elif why_src is None and not p.default_enabled:
                if not (p.enable_env and _env.get_bool(p.enable_env, False)):
                    disabled[pid] = (f"opt-in: enable with only=[{pid!r}]"
                                     + (f" or {p.enable_env}=1" if p.enable_env else ""))
        return [pid for pid in reg if pid not in disabled], disabled

    # -- one patch ---------------------------------------------------------------------------
    def _set(self, patch_id: str, outcome: Outcome, reason: str, **kw) -> PatchResult:
        prev = self.results.get(patch_id)
        res = PatchResult(patch_id, outcome, reason, **kw)
        self.results[patch_id] = res
        level = 30 if outcome in BAD_OUTCOMES else 20  # logging.WARNING / logging.INFO
        if prev != res:
            _log(level, "%s: %s (%s)", patch_id, outcome.value, reason)
        return res

    def process(self, patch: Patch, *, from_hook: bool = False, startup: bool = False,
                done: str | None = None) -> PatchResult:
        pid = patch.id
        recs = self.recorder.records(pid)
        if recs:
            prev = self.results.get(pid)
            moved = [f"{_qual(r.owner)}.{r.name}" for r in recs if _raw_getattr(r.owner, r.name, None) is not r.replacement]
            if moved:
                return self._set(pid, Outcome.CONFLICT, f"{', '.join(moved)} re-patched by someone else after hfpatches")
            return self._set(pid, Outcome.ALREADY_APPLIED, "already live in this process",
                             target_version=prev.target_version if prev else None,
                             in_range=prev.in_range if prev else None,
                             bug_present=prev.bug_present if prev else None)
        missing = [m for m in patch.modules if not _ready(m, done)]
        if missing:
            # Not imported yet: only the cheap "is it there at all?" check now; the version range,
            # shape check and probe run when the target is imported (nothing heavy imported early).
            # At interpreter start-up (HFPATCHES_AUTO, from a .pth file) sys.path is not final yet:
            # paths added by later .pth files are missing, so "not findable" proves nothing there.
            absent = [] if startup else [m for m in missing if not _findable(m)]
            if absent:
                return self._set(pid, Outcome.NOT_INSTALLED,
                                 f"module {absent[0].partition('.')[0]} is not installed "
                                 f"(needs {'; '.join(patch.requires)})")
            from . import _hooks

            for m in missing:
                # the module itself, and its top-level package: the latter's hook fires after the
                # whole package finished initialising (see _ready)
                for hook_on in dict.fromkeys((m, m.partition(".")[0])):
                    _hooks.attach_on_import(self, hook_on, pid)
            return self._set(pid, Outcome.DEFERRED, f"will attach when {', '.join(missing)} is imported")
        outcome, reason, version, in_range = _check_requires(patch)
        if outcome is not None:
            return self._set(pid, outcome, reason, target_version=version, in_range=in_range)
        return self._attach(patch, version, in_range)

    def _attach(self, patch: Patch, version, in_range) -> PatchResult:
        pid = patch.id
        kw = dict(target_version=version, in_range=in_range)
        changed = _check_shape(patch)
        if changed:
            return self._set(pid, Outcome.TARGET_CHANGED, changed, **kw)
        use_probe = self.probe_for.get(pid, True)
        bug = None
        if use_probe:
            try:
                before = _run_probe(patch)
            except Exception as e:  # a probe that cannot run is a failure we report, not hide
                return self._set(pid, Outcome.FAILED, f"probe raised {type(e).__name__}: {e}", **kw)
            bug = before.bug_present
            if bug is None:
                # the probe could not run here (e.g. no device for the kernel it needs): the
                # version range decides, and the reason says so -- never "probe found the bug"
                blind = before.detail or "the probe could not run here"
            elif not bug:
                return self._set(pid, Outcome.NOT_AFFECTED, "probe: the installed code does not have the bug"
                                 + (f" ({before.detail})" if before.detail else ""), bug_present=False, **kw)
        ctx = PatchContext(patch, self.recorder)
        try:
            patch.apply(ctx)
        except Conflict as e:
            self.recorder.restore(pid)
            return self._set(pid, Outcome.CONFLICT, str(e), bug_present=bug, **kw)
        except Exception as e:
            self.recorder.restore(pid)
            return self._set(pid, Outcome.FAILED, f"apply raised {type(e).__name__}: {e}", bug_present=bug, **kw)
        if use_probe:
            try:
                after = _run_probe(patch)
                still, detail = after.bug_present, after.detail
            except Exception as e:
                still, detail = True, f"probe raised {type(e).__name__}: {e}"
            if still:
                self.recorder.restore(pid)
                return self._set(pid, Outcome.FAILED, "verify: the probe still shows the bug after applying; "
                                 "rolled back" + (f" ({detail})" if detail else ""), bug_present=bug, **kw)
            if bug is None:
                reason = f"probe could not run ({blind}); version in range: applied, not verified by a probe"
            elif still is None:
                reason = f"probe found the bug; fix applied, not verified (the probe could not run again: {detail})"
            else:
                reason = "probe found the bug; fix applied and verified"
        else:
            reason = f"version in range; applied without probing ({_env.PROBE}=0)"
        return self._set(pid, Outcome.APPLIED, reason, bug_present=bug, **kw)

    # -- public operations -------------------------------------------------------------------
    def apply(self, only=None, exclude=(), strict=None, startup: bool = False) -> Report:
        strict = _env.get_bool(_env.STRICT, False) if strict is None else bool(strict)
        probe = _env.get_bool(_env.PROBE, True)
        _env.get_path(_env.REPORT)
        with self.lock:
            chosen, disabled = self.select(only, exclude)
            out: dict[str, PatchResult] = {}
            for pid, why in disabled.items():
                if pid in self.wanted or self.recorder.records(pid):
                    # an earlier apply() switched it on: leave it live, say so
                    out[pid] = self.results.get(pid) or self._set(pid, Outcome.DISABLED, why)
                    continue
                out[pid] = self._set(pid, Outcome.DISABLED, why)
            reg = registry()
            for pid in chosen:
                self.wanted.add(pid)
                self.strict_for[pid] = strict
                self.probe_for[pid] = probe
                out[pid] = self.process(reg[pid], startup=startup)
            report = Report({pid: out[pid] for pid in reg if pid in out})
            self.write_manifest()
        if strict:
            report.raise_for_failures()
        return report

    def on_import(self, patch_id: str, done: str | None = None) -> None:
        """Called by the post-import hook of a target module (``done``: its name)."""
        with self.lock:
            if patch_id not in self.wanted or self.recorder.records(patch_id):
                return
            patch = registry()[patch_id]
            if not all(_ready(m, done) for m in patch.modules):
                return  # a later hook (the module's, or its top-level package's) comes back
            try:
                res = self.process(patch, from_hook=True, done=done)
            except Exception as e:  # never break the user's import because of us
                res = self._set(patch_id, Outcome.FAILED, f"attach raised {type(e).__name__}: {e}")
            self.write_manifest()
        if self.strict_for.get(patch_id) and res.outcome not in OK_OUTCOMES:
            raise PatchError(Report({patch_id: res}))

    def revert(self, names=None) -> Report:
        with self.lock:
            reg = registry()
            if names is None:
                names = list(reg)
            elif isinstance(names, str):
                names = [names]
            for n in names:
                if n not in reg:
                    raise ValueError(f"unknown patch id {n!r}; valid ids: {', '.join(sorted(reg))}")
            out: dict[str, PatchResult] = {}
            for pid in names:
                self.wanted.discard(pid)
                had = bool(self.recorder.records(pid))
                left = self.recorder.restore(pid)
                if left:
                    out[pid] = self._set(pid, Outcome.CONFLICT, "; ".join(left))
                elif had:
                    out[pid] = self._set(pid, Outcome.DISABLED, "reverted: originals restored")
                else:
                    prev = self.results.get(pid)
                    if prev is not None and prev.outcome == Outcome.DEFERRED:
                        out[pid] = self._set(pid, Outcome.DISABLED, "reverted before it attached")
                    else:
                        out[pid] = prev or PatchResult(pid, Outcome.DISABLED, "was not applied")
            self.write_manifest()
            return Report(out)

    def status(self) -> Report:
        with self.lock:
            out = {}
            for pid in registry():
                if self.recorder.records(pid):
                    prev = self.results.get(pid)
                    out[pid] = prev if prev and prev.outcome in LIVE_OUTCOMES else PatchResult(pid, Outcome.APPLIED, "live")
                else:
                    out[pid] = self.results.get(pid) or PatchResult(pid, Outcome.DISABLED, "not applied in this process")
            return Report(out)

    def write_manifest(self) -> None:
        path = _env.get_path(_env.REPORT)
        if not path:
            return
        from ._report import write_json_atomic
        from ._version import __version__

        reg = registry()
        versions = {}
        for p in reg.values():
            for line in p.requires:
                from packaging.requirements import Requirement

                name = Requirement(line).name
                versions[name] = dist_version(name)
        payload = {
            "hfpatches": __version__,
            "python": sys.version.split()[0],
            "pid": os.getpid(),
            "versions": versions,
            "patches": {pid: r.to_dict() for pid, r in self.results.items()},
            "live": sorted(pid for pid in reg if self.recorder.records(pid)),
        }
        try:
            write_json_atomic(path, payload)
        except OSError as e:
            _log(30, "could not write %s=%s: %s", _env.REPORT, path, e)


ENGINE = Engine()


def get_original(name_or_target):
    """The unpatched object.

    * a patch id -> its original (a dict ``{target path: original}`` if it has several targets);
    * a dotted path ``"pkg.module.Class.attr"`` -> the original raw value at that path;
    * a patched object itself -> the object it replaced.
    Unpatched things are returned as they are.
    """
    rec = ENGINE.recorder
    with ENGINE.lock:
        if isinstance(name_or_target, str):
            reg = registry()
            if name_or_target in reg:
                patch = reg[name_or_target]
                found = {}
                for t in patch.targets:
                    if t.module in sys.modules:
                        try:
                            owner, name, _ = t.resolve()
                        except (AttributeError, KeyError):
                            continue  # the target does not exist here (e.g. a fixed version): nothing patched
                        found[t.path] = rec.original_of(owner, name)
                if len(found) == 1:
                    return next(iter(found.values()))
                return found
            parts = name_or_target.split(".")
            for i in range(len(parts) - 1, 0, -1):
                mod = ".".join(parts[:i])
                if mod in sys.modules or _importable(mod):
                    owner = importlib.import_module(mod)
                    for p in parts[i:-1]:
                        owner = getattr(owner, p)
                    return rec.original_of(owner, parts[-1])
            raise ValueError(f"cannot resolve {name_or_target!r}")
        hit = rec.find_by_replacement(name_or_target)
        return hit.original if hit else name_or_target


def _importable(mod: str) -> bool:
    try:
        importlib.import_module(mod)
        return True
    except ImportError:
        return False
