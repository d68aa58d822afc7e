"""The ``hfpatches`` logger without importing :mod:`logging` at start-up (a leaf module).

Records made before anything imported ``logging`` wait here, in order, and are emitted on the
next call after it is there: nothing is dropped. No NullHandler on purpose: with logging
unconfigured, WARNING records (FAILED, TARGET_CHANGED, CONFLICT) still reach stderr through
logging's last-resort handler.
"""
from __future__ import annotations

import sys

INFO, WARNING = 20, 30
_early: list[tuple[int, str, tuple[object, ...]]] = []


def log(level: int, msg: str, *args: object, name: str = "hfpatches") -> None:
    """Log ``msg % args`` on the ``name`` logger (a child of ``hfpatches``)."""
    logging = sys.modules.get("logging")
    if logging is None:
        _early.append((level, msg, args))
        return
    while _early:
        lvl, m, a = _early.pop(0)
        logging.getLogger("hfpatches").log(lvl, m, *a)
    logging.getLogger(name).log(level, msg, *args)
