"""The range judge: is one release inside one ``requires`` line? Used by the engine (installed
versions), ``audit`` (a pin set) and the advisories, so they never disagree.

A ``requires`` line is PEP 508 (``"torch>=2.1"``, ``"flair>=0.14; python_version < '3.13'"``).
Its environment marker is evaluated against this interpreter, or against ``env`` (audit's
``--marker-env``): a line whose marker is false does not constrain anything (``ignored``).
A local version label (``2.13.0+cpu``) compares as its release. ``packaging`` is imported on the
first call, never at start-up.
"""
from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any

#: The verdicts of :func:`judge`.
IN, OUT, IGNORED, MISSING, UNPARSEABLE = "in", "out", "ignored", "missing", "unparseable"

_parsed: dict[str, Any] = {}


def requirement(line: str) -> Any:
    """``packaging.requirements.Requirement`` of ``line`` (parsed once)."""
    req = _parsed.get(line)
    if req is None:
        from packaging.requirements import Requirement

        req = _parsed[line] = Requirement(line)
    return req


def marker_holds(req: Any, env: dict[str, Any] | None = None) -> bool | None:
    """The line's marker, evaluated (True without one; None: it cannot be evaluated)."""
    if req.marker is None:
        return True
    try:
        return bool(req.marker.evaluate(env) if env is not None else req.marker.evaluate())
    except Exception:   # packaging raises several types (UndefinedEnvironmentName, KeyError, ...)
        return None


def release(version: Any) -> Any:
    """``Version`` of ``version`` as its public release (``2.13.0+cpu`` -> ``2.13.0``); None if it
    does not parse."""
    from packaging.version import InvalidVersion, Version

    try:
        v = version if isinstance(version, Version) else Version(str(version))
    except InvalidVersion:
        return None
    return Version(v.public)


def judge(line: str, version: Any, env: dict[str, Any] | None = None) -> str:
    """``version`` (a string, a ``Version``, or None: not installed / not pinned) against ``line``:
    :data:`IGNORED` (the marker is false here), :data:`MISSING`, :data:`UNPARSEABLE`, :data:`IN`
    or :data:`OUT`. A marker that cannot be evaluated counts as true (the line constrains)."""
    req = requirement(line)
    if marker_holds(req, env) is False:
        return IGNORED
    if version is None:
        return MISSING
    v = release(version)
    if v is None:
        return UNPARSEABLE
    return IN if req.specifier.contains(v, prereleases=True) else OUT
