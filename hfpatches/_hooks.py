"""Post-import hooks: ``when_imported(module, callback)``. A leaf: imports nothing of ours.

wrapt 2.x imports asyncio, inspect and importlib.metadata (tens of ms), which would blow the
start-up budget of ``import hfpatches; apply()`` (``benchmarks/startup.py``: BUDGET_MS) when no target is imported yet. So
until a target package is first imported, a tiny ``sys.meta_path`` sentinel waits for the
top-level names (``torch``, ``flash_attn``, ...). On the first such import it removes itself,
imports wrapt, registers wrapt's post-import hooks for every awaited module and hands that very
import to wrapt's finder. From then on wrapt does all the work; we hand-roll nothing of the
hook machinery itself.
"""
from __future__ import annotations

import _thread
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable
    from typing import Any

_lock = _thread.RLock()
_pending: dict[str, list[Callable[[Any], None]]] = {}      # awaited module -> callbacks, before wrapt takes over
_sentinel: _Sentinel | None = None
_wrapt_live = False


class _Sentinel:
    """``sys.meta_path`` entry: fires once, on the first import of an awaited top-level package."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
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


def when_imported(module: str, callback: Callable[[Any], None]) -> None:
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
