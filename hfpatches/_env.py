"""Every environment variable hfpatches reads, in one place.

Precedence everywhere: arguments > environment > defaults.
"""
from __future__ import annotations

import os

#: Comma list of patch ids: apply only these (opt-in patches included).
ONLY = "HFPATCHES_ONLY"
#: Comma list of patch ids to leave alone, or ``*`` for all of them.
DISABLE = "HFPATCHES_DISABLE"
#: ``1``: anything but APPLIED / ALREADY_APPLIED / NOT_AFFECTED / NOT_INSTALLED / DISABLED raises.
STRICT = "HFPATCHES_STRICT"
#: ``0``: skip the behavioural probes and trust the version ranges.
PROBE = "HFPATCHES_PROBE"
#: Run manifest: a directory (existing, or ending in ``/``) gets one JSON record per process;
#: any other path ``FILE`` is an index, with the records in ``FILE.d/`` (see ``_manifest.py``).
#: Each process rewrites only its own record, when one of its outcomes changes.
REPORT = "HFPATCHES_REPORT"
#: ``1``: apply at interpreter start (through the installed ``hfpatches_auto.pth``).
AUTO = "HFPATCHES_AUTO"
#: ``1``: switch on the opt-in ``strict_loads`` patch.
STRICT_LOADS = "HFPATCHES_STRICT_LOADS"
#: ``backbone`` (default) or ``float32``: the compute dtype policy of ``peft_save_load``.
DTYPE_POLICY = "HFPATCHES_DTYPE_POLICY"

ALL = (ONLY, DISABLE, STRICT, PROBE, REPORT, AUTO, STRICT_LOADS, DTYPE_POLICY)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def get_bool(name: str, default: bool) -> bool:
    """Read a boolean switch; a malformed value is an error, never a guess."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    val = raw.strip().lower()
    if val in _TRUE:
        return True
    if val in _FALSE:
        return False if val else default
    raise ValueError(f"{name}={raw!r} is not a boolean: use 1 or 0 (also true/false, yes/no, on/off)")


def get_list(name: str) -> tuple[str, ...] | None:
    """Read a comma list (``None`` when unset or empty). ``*`` is returned as ``('*',)``."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    items = tuple(p.strip() for p in raw.split(",") if p.strip())
    for item in items:
        if item != "*" and not item.replace("_", "").isalnum():
            raise ValueError(f"{name}={raw!r}: {item!r} is not a patch id (ids are like 'meta_buffers')")
    return items


def get_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    val = raw.strip().lower()
    if val not in choices:
        raise ValueError(f"{name}={raw!r} is not one of {', '.join(choices)}")
    return val


def get_path(name: str) -> str | None:
    raw = os.environ.get(name)
    return raw.strip() or None if raw is not None else None
