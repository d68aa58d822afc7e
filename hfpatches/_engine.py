"""The engine: selection, version and shape checks, probe -> apply -> verify, attach on import.

Order of checks for one patch (CONTRIBUTING.md has the layers): installed? -> version range -> target
modules imported (else DEFERRED, attach on import) -> target still has the expected shape ->
probe says the bug is present -> apply -> probe again says it is fixed (else roll back, FAILED).
Nothing here is imported by a patch; patches get a :class:`~hfpatches._recorder.PatchContext`.
"""
from __future__ import annotations

import _thread
import sys

from . import _env, _hooks
from ._declare import Patch, ProbeResult, import_module
from ._log import INFO, WARNING, log
from ._registry import implementation, registry
from ._report import BAD_OUTCOMES, LIVE_OUTCOMES, OK_OUTCOMES, Outcome, PatchError, PatchResult, Report

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Iterable
    from typing import Any

    from ._recorder import Mutation, PatchContext, Recorder

# Start-up budget (``benchmarks/startup.py``: BUDGET_MS over a bare interpreter for ``apply()``): no
# dataclasses, typing, inspect, importlib.metadata, packaging or wrapt at import time; they load
# when a patch attaches, which only happens when its (heavy) target is imported anyway.


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
    if top in sys.modules or top in _FOUND:
        return True
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None or type(finder).__name__ in ("_Sentinel", "ImportHookFinder"):
            continue
        try:
            if find(top, None) is not None:
                _FOUND.add(top)   # an installed package stays installed; an absent one is asked again
                return True
        except (ImportError, ValueError):
            continue
    return False


_FOUND: set[str] = set()


def _check_requires(patch: Patch) -> tuple[Outcome | None, str, str | None, bool | None]:
    """(outcome-or-None-to-continue, reason, "dist version", in_range): every ``requires`` line
    judged by :func:`hfpatches._ranges.judge` (markers included), as ``audit`` judges a pin set."""
    from . import _ranges

    shown = []
    judged = 0
    for line in patch.requires:
        req = _ranges.requirement(line)
        if _ranges.marker_holds(req) is False:
            continue
        judged += 1
        ver = dist_version(req.name)
        verdict = _ranges.judge(line, ver)
        if verdict == _ranges.MISSING:
            return Outcome.NOT_INSTALLED, f"{req.name} is not installed", None, None
        shown.append(f"{req.name} {ver}")
        if verdict == _ranges.UNPARSEABLE:
            return Outcome.TARGET_CHANGED, f"{req.name} has an unparseable version {ver!r}", ", ".join(shown), None
        if verdict == _ranges.OUT:
            fixed = f"; {patch.fixed_text}" if patch.fixed_text else ""
            return (Outcome.NOT_AFFECTED, f"{req.name} {ver} is outside the affected range "
                    f"{req.specifier}{fixed}", ", ".join(shown), False)
    if patch.requires and not judged:
        return (Outcome.NOT_AFFECTED, "every requirement's environment marker is false here: "
                + "; ".join(patch.requires), None, False)
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
    check = implementation(patch, "check", required=False)
    if check is not None:
        return _call(check, patch)  # type: ignore[no-any-return]
    return None


def _call(fn: Any, patch: Patch) -> Any:
    """``fn(ctx)`` with a read-only :class:`~hfpatches._recorder.ProbeContext` (``fn()`` for a
    probe or check written without one)."""
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    if code is not None and code.co_argcount == 0 and not code.co_flags & 0x04:
        return fn()
    from ._recorder import ProbeContext

    return fn(ProbeContext(patch))


def _run_probe(patch: Patch) -> ProbeResult:
    res = _call(implementation(patch, "probe"), patch)
    return res if isinstance(res, ProbeResult) else ProbeResult(bool(res))


def run_probe(patch_id: str) -> ProbeResult:
    """Run ``patch_id``'s probe now, as the engine does (tests, the version lab): the
    installed code has the bug <=> ``bug_present``."""
    return _run_probe(registry()[patch_id])


def run_check(patch_id: str) -> str | None:
    """Run ``patch_id``'s shape check now, as the engine does: None when the targets look as expected."""
    return _check_shape(registry()[patch_id])


class Engine:
    def __init__(self) -> None:
        self.lock = _thread.RLock()
        self._recorder: Recorder | None = None   # created (and _recorder imported) on first use
        self.results: dict[str, PatchResult] = {}
        self.wanted: set[str] = set()        # patches apply() asked for and revert() has not undone
        self.hooked: set[tuple[str, str]] = set()
        self.strict_for: dict[str, bool] = {}
        self.probe_for: dict[str, bool] = {}
        self.contexts: dict[str, PatchContext] = {}
        self.listeners: list[Any] = [self.write_manifest]  # called after an outcome changed
        self.manifest: Any = None                 # _manifest.Writer, made on the first write
        self.via = "apply"                        # what last changed the outcomes (the record's timeline)

    @property
    def recorder(self) -> Recorder:
        if self._recorder is None:
            from ._recorder import Recorder

            self._recorder = Recorder()
        return self._recorder

    def _records(self, pid: str) -> list[Mutation]:
        """The recorded mutations of ``pid`` (no recorder yet: none, and nothing imported)."""
        return self._recorder.records(pid) if self._recorder is not None else []

    # -- selection -------------------------------------------------------------------------
    def select(self, only: Iterable[str] | None, exclude: Iterable[str]) -> tuple[list[str], dict[str, str]]:
        reg = registry()
        valid = ", ".join(sorted(reg))

        def check(names: Iterable[str] | str, source: str) -> tuple[str, ...]:
            names = tuple([names] if isinstance(names, str) else names)
            for n in names:
                if n != "*" and n not in reg:
                    raise ValueError(f"unknown patch id {n!r} in {source}; valid ids: {valid}")
            return names

        chosen: list[str]
        why_src: str | None
        if only is not None:
            chosen, why_src = list(check(only, "only=")), "only="
        else:
            env_only = _env.get_list(_env.ONLY)
            if env_only is not None:
                chosen, why_src = list(check(env_only, _env.ONLY)), _env.ONLY
            else:
                chosen, why_src = [], None
        disabled: dict[str, str] = {}
        excl: tuple[str, ...]
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
                    disabled[pid] = f"opt-in: {p.opt_in_hint}"
        return [pid for pid in reg if pid not in disabled], disabled

    # -- one patch ---------------------------------------------------------------------------
    def _set(self, patch_id: str, outcome: str, reason: str, **kw: Any) -> PatchResult:
        prev = self.results.get(patch_id)
        res = PatchResult(patch_id, outcome, reason, **kw)
        self.results[patch_id] = res
        if prev != res:
            log(WARNING if res.outcome in BAD_OUTCOMES else INFO, "%s: %s (%s)", patch_id, res.outcome.value, reason)
        return res

    def _live_state(self, pid: str) -> PatchResult | None:
        """What the recorder says about ``pid`` now, checked by identity; None: nothing recorded."""
        recs = self._records(pid)
        if not recs:
            return None
        from ._recorder import OURS

        moved = [r for r in recs if r.state() != OURS]
        prev = self.results.get(pid)
        kw = {k: getattr(prev, k) for k in ("target_version", "in_range", "bug_present")} if prev else {}
        if moved:
            return PatchResult(pid, Outcome.CONFLICT, f"{', '.join(r.path for r in moved)} changed by someone else "
                               "after hfpatches patched it: the fix is not live", **kw)
        if prev is not None and prev.outcome in LIVE_OUTCOMES:
            return prev
        return PatchResult(pid, Outcome.APPLIED, "live", **kw)

    def _revert_one(self, pid: str) -> list[str]:
        """Revert ``pid`` as a unit (``Recorder.restore``); when something stands in the way the
        patch stays whole and live-wired (its context, hooks and state kept) and the reasons are
        returned."""
        left = self._recorder.blocked(pid) if self._recorder is not None else []
        if left:
            return left
        ctx = self.contexts.pop(pid, None)
        if ctx is not None:
            ctx.close()
        return self._recorder.restore(pid) if self._recorder is not None else []

    def process(self, patch: Patch, *, startup: bool = False, done: str | None = None) -> PatchResult:
        pid = patch.id
        if self._records(pid):
            restored = self.recorder.forget_restored(pid)
            if restored:
                # somebody put an original back: what is left of ours is undone, then applied afresh
                left = self._revert_one(pid)
                if left:
                    return self._set(pid, Outcome.CONFLICT, "; ".join(left))
            else:
                now = self._live_state(pid)
                assert now is not None
                if now.outcome == Outcome.CONFLICT:
                    return self._set(pid, now.outcome, now.reason)
                return self._set(pid, Outcome.ALREADY_APPLIED, "already live in this process",
                                 target_version=now.target_version, in_range=now.in_range,
                                 bug_present=now.bug_present)
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
            for m in missing:
                # the module itself, and its top-level package: the latter's hook fires after the
                # whole package finished initialising (see _ready)
                for hook_on in dict.fromkeys((m, m.partition(".")[0])):
                    self._attach_on_import(hook_on, pid)
            return self._set(pid, Outcome.DEFERRED, f"will attach when {', '.join(missing)} is imported")
        outcome, reason, version, in_range = _check_requires(patch)
        if outcome is not None:
            return self._set(pid, outcome, reason, target_version=version, in_range=in_range)
        return self._attach(patch, version, in_range)

    def _attach_on_import(self, module: str, patch_id: str) -> None:
        """Run ``self.on_import(patch_id)`` once ``module`` has been imported (once per pair)."""
        key = (module, patch_id)
        if key in self.hooked:
            return
        self.hooked.add(key)

        def hook(mod: Any) -> None:
            self.hooked.discard(key)
            self.on_import(patch_id, getattr(mod, "__name__", None))

        _hooks.when_imported(module, hook)

    def _attach(self, patch: Patch, version: str | None, in_range: bool | None) -> PatchResult:
        pid = patch.id
        kw: dict[str, Any] = dict(target_version=version, in_range=in_range)
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
        from ._recorder import Conflict, PatchContext

        ctx = PatchContext(patch, self.recorder, self.lock)
        self.contexts[pid] = ctx
        try:
            implementation(patch, "apply")(ctx)  # type: ignore[misc]
        except Conflict as e:
            self._revert_one(pid)
            return self._set(pid, Outcome.CONFLICT, str(e), bug_present=bug, **kw)
        except Exception as e:
            self._revert_one(pid)
            return self._set(pid, Outcome.FAILED, f"apply raised {type(e).__name__}: {e}", bug_present=bug, **kw)
        if use_probe:
            try:
                after = _run_probe(patch)
                still, detail = after.bug_present, after.detail
            except Exception as e:
                still, detail = True, f"probe raised {type(e).__name__}: {e}"
            if still:
                self._revert_one(pid)
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
    def apply(self, only: Iterable[str] | None = None, exclude: Iterable[str] = (), strict: bool | None = None,
              startup: bool = False) -> Report:
        strict = _env.get_bool(_env.STRICT, False) if strict is None else bool(strict)
        probe = _env.get_bool(_env.PROBE, True)
        _env.validate()
        with self.lock:
            chosen, disabled = self.select(only, exclude)
            out: dict[str, PatchResult] = {}
            for pid, why in disabled.items():
                if pid in self.wanted or self._records(pid):
                    # an earlier apply() switched it on: leave it live, say so
                    out[pid] = self._live_state(pid) or self.results.get(pid) or self._set(pid, Outcome.DISABLED, why)
                    continue
                out[pid] = self._set(pid, Outcome.DISABLED, why)
            reg = registry()
            for pid in chosen:
                self.wanted.add(pid)
                self.strict_for[pid] = strict
                self.probe_for[pid] = probe
                out[pid] = self.process(reg[pid], startup=startup)
            report = Report({pid: out[pid] for pid in reg if pid in out})
            self._notify("startup" if startup else "apply")
        if strict:
            report.raise_for_failures()
        return report

    def on_import(self, patch_id: str, done: str | None = None) -> None:
        """Called by the post-import hook of a target module (``done``: its name)."""
        with self.lock:
            if patch_id not in self.wanted or self._records(patch_id):
                return
            patch = registry()[patch_id]
            if not all(_ready(m, done) for m in patch.modules):
                return  # a later hook (the module's, or its top-level package's) comes back
            try:
                res = self.process(patch, done=done)
            except Exception as e:  # never break the user's import because of us
                res = self._set(patch_id, Outcome.FAILED, f"attach raised {type(e).__name__}: {e}")
            self._notify("import")
        if self.strict_for.get(patch_id) and res.outcome not in OK_OUTCOMES:
            raise PatchError(Report({patch_id: res}))

    def revert(self, names: Iterable[str] | str | None = None) -> Report:
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
                had = bool(self._records(pid))
                left = self._revert_one(pid)
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
            self._notify("revert")
            return Report(out)

    def status(self) -> Report:
        """What is live now, checked by identity against the recorder (never remembered)."""
        with self.lock:
            out = {}
            for pid in registry():
                out[pid] = (self._live_state(pid) or self.results.get(pid)
                            or PatchResult(pid, Outcome.DISABLED, "not applied in this process"))
            return Report(out)

    def live_ids(self) -> list[str]:
        """The patches whose every mutation is in place now (identity)."""
        with self.lock:
            rec = self._recorder
            return [pid for pid in registry() if rec is not None and rec.live(pid)]

    def _notify(self, via: str) -> None:
        """Tell the listeners (the run manifest) that outcomes may have changed, and by what
        (``startup``, ``apply``, ``import``, ``revert``); each decides itself whether anything
        did (the manifest compares the identity-checked status)."""
        self.via = via
        for fn in list(self.listeners):
            fn()

    def write_manifest(self, via: str | None = None, end: bool = False) -> None:
        """This process's record under ``HFPATCHES_REPORT`` (``_manifest``: one file per
        interpreter, rewritten only when its state changed, with the timeline of what was live;
        never raises). ``via``: what changed it (default: the last operation; ``status()``
        passes ``check``); ``end``: at exit."""
        raw = _env.get_path(_env.REPORT)
        if raw:
            if self.manifest is None:
                import atexit

                from ._manifest import Writer

                self.manifest = Writer()
                # the last state, checked by identity at exit: an attribute somebody restored
                # behind our back after the last outcome change is not reported as live
                atexit.register(self.write_manifest, "exit", True)
            self.manifest.write(self.status(), raw, via or self.via, end)


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
                    owner = import_module(mod)
                    for p in parts[i:-1]:
                        owner = getattr(owner, p)
                    return rec.original_of(owner, parts[-1])
            raise ValueError(f"cannot resolve {name_or_target!r}")
        hit = rec.find_by_replacement(name_or_target)
        return hit.original if hit else name_or_target


def _importable(mod: str) -> bool:
    try:
        import_module(mod)
        return True
    except ImportError:
        return False
