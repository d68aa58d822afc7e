"""``HFPATCHES_AUTO``: apply at interpreter start (the installed ``hfpatches_auto.pth`` calls
:func:`autostart` whenever the variable is set at all; its value is judged here, by ``_env``)."""
from __future__ import annotations

import os
import sys

from . import _env


def autostart() -> None:
    """Apply with the environment's settings, once per process.

    Never breaks interpreter start-up: a malformed setting is printed to stderr and the process
    goes on unpatched, except under ``HFPATCHES_STRICT=1``, where the interpreter exits with
    status 1 (a run that must have its fixes does not start without them). site.py swallows
    exceptions raised in a .pth line, hence SystemExit.
    """
    me = str(os.getpid())
    if _env.get_raw(_env.AUTOSTARTED) == me:
        return
    try:
        if not _env.get_bool(_env.AUTO, False):
            return
        _env.set_raw(_env.AUTOSTARTED, me)
        from ._engine import ENGINE

        ENGINE.apply(startup=True)
    except Exception as e:
        try:
            strict = _env.get_bool(_env.STRICT, False)
        except ValueError:
            strict = True  # a malformed strict switch is no reason to start without the fixes
        print(f"hfpatches: {_env.AUTO} is set but apply() failed: {type(e).__name__}: {e}", file=sys.stderr)
        if strict:
            print(f"hfpatches: {_env.STRICT} is on: refusing to start without the fixes", file=sys.stderr)
            raise SystemExit(1) from None
