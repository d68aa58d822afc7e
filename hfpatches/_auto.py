"""``HFPATCHES_AUTO``: apply at interpreter start (the installed ``hfpatches_auto.pth`` calls
:func:`autostart` whenever the variable is set at all; its value is judged here, by ``_env``)."""
from __future__ import annotations

import sys

from . import _env


#: Set once this interpreter ran the start-up. It lives in the interpreter, never in the
#: environment: a child process, and an interpreter ``os.exec*`` starts in the same process
#: (same pid, inherited environment, fresh memory), run their own start-up.
_started = False


def autostart() -> None:
    """Apply with the environment's settings, once per interpreter.

    Never breaks interpreter start-up: a malformed setting is printed to stderr and the process
    goes on unpatched, except under ``HFPATCHES_STRICT=1``, where the interpreter exits with
    status 1 (a run that must have its fixes does not start without them). site.py swallows
    exceptions raised in a .pth line, hence SystemExit.
    """
    global _started
    if _started:   # once per interpreter (the .pth may be processed twice: site.addsitedir)
        return
    try:
        if not _env.get_bool(_env.AUTO, False):
            return
        _started = True
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
