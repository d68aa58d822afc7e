"""Lazy attach (wrapt post-import hooks) and the ``HFPATCHES_AUTO`` startup hook.

wrapt 2.x imports asyncio, inspect and importlib.metadata (tens of ms), which would blow the
start-up budget of ``import hfpatches; apply()`` (<= 15 ms) when no target is imported yet. So
until a target package is first imported, a tiny ``sys.meta_path`` sentinel waits for the
top-level names (``torch``, ``flash_attn``, ...). On the first such import it removes itself,
imports wrapt, registers wrapt's post-import hooks for every awaited module and hands that very
import to wrapt's finder. From then on wrapt does all the work; we hand-roll nothing of the
hook machinery itself.
"""
from __future__ import annotations

import sys
import _thread

_lock = _thread.RLock()
_pending: dict[str, list] = {}      # awaited module -> callbacks, before wrapt takes over
_sentinel = None
_wrapt_live = False


class _Sentinel:
    """``sys.meta_path`` entry: fires once, on the first import of an awaited top-level package."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] not in {m.partition(".")[0] for m in _pending}:
            return None
        _activate()
        for finder in sys.meta_path:  # hand this import to wrapt's finder (it wraps the loader)
            if type(finder).__name__ == "ImportHookFinder" and hasattr(finder, "find_spec"):
                return finder.find_spec(fullname, path, target)
        return None


def _activate() -> None:
    global _sentinel, _wrapt_live
    with _lock:
        if _sentinel is not None:
            try:
                sys.meta_path.remove(_sentinel)
            except ValueError:
                pass
            _sentinel = None
        if _wrapt_live:
            return
        import wrapt

        _wrapt_live = True
        pending = dict(_pending)
        _pending.clear()
    for module, callbacks in pending.items():
        for cb in callbacks:
            wrapt.register_post_import_hook(cb, module)


def when_imported(module: str, callback) -> None:
    """Call ``callback(module_object)`` once ``module`` is imported (now, if it already is)."""
    global _sentinel
    with _lock:
        if not _wrapt_live:
            if module in sys.modules:
                pass  # fall through: wrapt fires at once for an imported module
            else:
                _pending.setdefault(module, []).append(callback)
                if _sentinel is None:
                    _sentinel = _Sentinel()
                    sys.meta_path.insert(0, _sentinel)
                return
    import wrapt

    wrapt.register_post_import_hook(callback, module)


def attach_on_import(engine, module: str, patch_id: str) -> None:
    """Run ``engine.on_import(patch_id)`` once ``module`` has been imported (once per pair)."""
    key = (module, patch_id)
    if key in engine.hooked:
        return
    engine.hooked.add(key)

    def hook(mod, _pid=patch_id, _key=key):
        engine.hooked.discard(_key)
        engine.on_import(_pid, getattr(mod, "__name__", None))

    when_imported(module, hook)


def autostart() -> None:
    """Entry of ``hfpatches_auto.pth`` when ``HFPATCHES_AUTO`` is set: apply with env settings.

    Never breaks interpreter start-up: a malformed setting is printed to stderr and the process
    goes on unpatched, except under ``HFPATCHES_STRICT=1``, where the interpreter exits with
    status 1 (a run that must have its fixes does not start without them). site.py swallows
    exceptions raised in a .pth line, hence SystemExit.
    """
    import os

    from . import _env

    if os.environ.get("_HFPATCHES_AUTOSTARTED") == str(os.getpid()):
        return
    os.environ["_HFPATCHES_AUTOSTARTED"] = str(os.getpid())
    try:
        from ._registry import ENGINE

        ENGINE.apply(None, (), None, startup=True)
    except Exception as e:
        strict = os.environ.get(_env.STRICT, "").strip().lower() in ("1", "true", "yes", "on")
        print(f"hfpatches: {_env.AUTO}=1 but apply() failed: {type(e).__name__}: {e}", file=sys.stderr)
        if strict:
            print(f"hfpatches: {_env.STRICT}=1: refusing to start without the fixes", file=sys.stderr)
            raise SystemExit(1)
