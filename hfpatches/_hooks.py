"""Lazy attach (wrapt post-import hooks) and the ``HFPATCHES_AUTO`` startup hook."""
from __future__ import annotations

import logging

log = logging.getLogger("hfpatches")


def attach_on_import(engine, module: str, patch_id: str) -> None:
    """Run ``engine.on_import(patch_id)`` once ``module`` has been imported (once per pair)."""
    key = (module, patch_id)
    if key in engine.hooked:
        return
    engine.hooked.add(key)
    import wrapt

    def hook(_mod, _pid=patch_id, _key=key):
        engine.hooked.discard(_key)
        engine.on_import(_pid)

    wrapt.register_post_import_hook(hook, module)


def autostart() -> None:
    """Entry of ``hfpatches_auto.pth`` when ``HFPATCHES_AUTO`` is set: apply with env settings.

    Never breaks interpreter start-up: a malformed setting is logged and printed to stderr,
    except under ``HFPATCHES_STRICT=1``, where it raises.
    """
    import os
    import sys

    from . import _env

    if os.environ.get("_HFPATCHES_AUTOSTARTED") == str(os.getpid()):
        return
    os.environ["_HFPATCHES_AUTOSTARTED"] = str(os.getpid())
    try:
        from . import apply

        apply()
    except Exception as e:
        strict = os.environ.get(_env.STRICT, "").strip().lower() in ("1", "true", "yes", "on")
        if strict:
            raise
        print(f"hfpatches: {_env.AUTO}=1 but apply() failed: {type(e).__name__}: {e}", file=sys.stderr)
