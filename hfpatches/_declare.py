"""What a patch declares: :class:`Patch`, :class:`Target`, :class:`ProbeResult`.

This is the only core module a patch imports. A patch is a package under
``hfpatches/patches/<id>/`` whose ``__init__.py`` holds a short user docstring (Bug / Affected /
Upstream / Probe / What changes) and the declaration; the implementation sits beside it in
``impl.py`` and is imported only when the patch attaches (its target was imported), so reading
every declaration at start-up costs almost nothing::

    # hfpatches/patches/my_fix/__init__.py
    from hfpatches._declare import Patch, Target

    PATCH = Patch(
        id="my_fix",
        summary="one line: what goes wrong and what the fix does",
        upstream=("owner/repo#123",),
        requires=("somepkg>=1.2,<1.4",),          # PEP 508 lines: where the bug is
        fixed_in="somepkg>=1.4",                 # or None: not fixed upstream
        targets=(Target("somepkg.module", "Class.method", params=("self", "x")),),
    )

    # hfpatches/patches/my_fix/impl.py
    def probe(ctx) -> bool | ProbeResult: ... # True: the installed code has the bug
    def apply(ctx) -> None: ...               # mutate only through ctx (recorded, reverted exactly)
    def check(ctx) -> str | None: ...         # optional: a reason when the target changed shape

``probe`` and ``check`` get a read-only context (``ctx.patch``: this declaration, ``ctx.log``: the
patch's logger, ``ctx.module(name)``, ``ctx.resolve(target)``); ``apply`` gets the same plus the
recorded mutations (``replace``, ``wrap``, ``on_import``, ``state``, ``original``).

``scripts/new_patch.py ID`` writes that skeleton (plus docs, tests and a GPU test).

Fields of :class:`Patch`
  id               stable id (env vars, ``only=``); the package name
  summary          one line for the README matrix and ``list``
  upstream         issue/PR references (``owner/repo#N``)
  requires         PEP 508 lines, every one must hold for the patch to be in range
  fixed_in         where upstream fixed it (``"pkg>=X"``) or None
  targets          the attributes it replaces (:class:`Target`); their modules are what it waits for
  waits_for        further modules (or packages) that must be imported completely before the
                   patch attaches, although nothing in them is replaced
  probe, apply, check
                   callables, or None (the default): then ``probe``/``apply``/``check`` of the
                   ``impl`` module
  impl             the implementation module (default: ``<the declaring package>.impl``)
  default_enabled  False: opt-in (``only=[id]`` or ``enable_env=1``)
  enable_env       the env var that switches an opt-in patch on (named in ``hfpatches._env``)
  fix_word         how upstream ended the bug at ``fixed_in``: ``"fixed"`` (default) or
                   ``"removed"`` (the buggy code is gone there, nothing was fixed)
  affected         README text for the affected versions, only where it says more than
                   ``requires`` (the README shows ``requires`` itself)
  verified_stacks  the test stacks its tests pass on (default: every one in ``STACKS``)
"""
from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing itself costs start-up time; type checkers read this as True
if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable
    from typing import Any

#: The stacks the CPU suite runs on (constraints/<stack>.txt; ``make test`` runs each).
STACKS = ("affected", "latest", "boundary")
#: The libraries hfpatches fixes, as (PyPI distribution, import name): ``doctor``, the demo and the
#: test header show their versions, the run manifest records them. Listed here once.
LIBRARIES = (("torch", "torch"), ("transformers", "transformers"), ("peft", "peft"), ("accelerate", "accelerate"),
             ("liger-kernel", "liger_kernel"), ("flash-attn", "flash_attn"), ("flair", "flair"), ("trl", "trl"),
             ("triton", "triton"))

_MISSING = object()


class Record:
    """Tiny immutable record (keyword or positional init, repr, equality) without dataclasses,
    which cost start-up time. Subclasses list ``__slots__`` and ``_defaults``."""

    __slots__: tuple[str, ...] = ()
    _defaults: dict[str, Any] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
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

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, k) for k in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._tuple() == other._tuple()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(tuple(id(v) if callable(v) else v for v in self._tuple()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in self.__slots__)})"

    def _replace(self, **changes: Any) -> Any:
        """A copy with ``changes`` (like ``dataclasses.replace``)."""
        return type(self)(**{**{k: getattr(self, k) for k in self.__slots__}, **changes})


def import_module(name: str) -> Any:
    """``importlib.import_module`` without importing :mod:`importlib` (and :mod:`warnings` with it)
    at start-up: ``__import__`` imports the whole dotted chain, ``sys.modules`` hands out the leaf."""
    __import__(name)
    return sys.modules[name]


def raw_getattr(owner: Any, name: str, default: Any = _MISSING) -> Any:
    """The attribute as stored (``inspect.getattr_static`` semantics for classes)."""
    if isinstance(owner, type):
        for klass in owner.__mro__:
            if name in vars(klass):
                return vars(klass)[name]
        if default is _MISSING:
            raise AttributeError(f"{owner.__qualname__} has no attribute {name!r}")
        return default
    return getattr(owner, name) if default is _MISSING else getattr(owner, name, default)


class Target(Record):
    """One attribute a patch replaces: ``module`` must be imported before the patch attaches.

    ``attr`` is a dotted path inside the module (``"BertPreTrainedModel.from_pretrained"``).
    ``params``: parameter names the target's signature must start with (the shape check);
    a target whose signature changed is reported TARGET_CHANGED instead of being patched.
    """

    __slots__ = ("module", "attr", "params")
    _defaults = {"params": None}
    module: str
    attr: str
    params: tuple[str, ...] | None

    @property
    def path(self) -> str:
        return f"{self.module}.{self.attr}"

    def resolve(self) -> tuple[Any, str, Any]:
        """Return ``(owner, name, raw_value)``; the raw value as stored (a classmethod stays one)."""
        owner: Any = sys.modules[self.module]
        *parents, name = self.attr.split(".")
        for p in parents:
            owner = getattr(owner, p)
        return owner, name, raw_getattr(owner, name)


class ProbeResult(Record):
    """A probe's verdict: ``bug_present`` and a short ``detail`` shown in the reason.

    ``bug_present=None``: the probe could not run here (say why in ``detail``); the version range
    decides and the reason says that no probe ran (never "probe found the bug")."""

    __slots__ = ("bug_present", "detail")
    _defaults = {"detail": ""}
    bug_present: bool | None
    detail: str


class Patch(Record):
    """A fix, declared (see the module docstring for every field)."""

    __slots__ = ("id", "summary", "upstream", "requires", "fixed_in", "targets", "probe", "apply",
                 "default_enabled", "enable_env", "check", "affected", "verified_stacks", "impl", "waits_for",
                 "fix_word")
    _defaults = {"probe": None, "apply": None, "default_enabled": True, "enable_env": None, "check": None,
                 "affected": "", "verified_stacks": STACKS, "impl": None, "waits_for": (), "fix_word": "fixed"}
    id: str
    summary: str
    upstream: tuple[str, ...]
    requires: tuple[str, ...]
    fixed_in: str | None
    targets: tuple[Target, ...]
    probe: Callable[[Any], bool | ProbeResult] | None
    apply: Callable[[Any], None] | None
    default_enabled: bool
    enable_env: str | None
    check: Callable[[Any], str | None] | None
    affected: str
    verified_stacks: tuple[str, ...]
    impl: str | None
    waits_for: tuple[str, ...]
    fix_word: str

    @property
    def fixed_text(self) -> str | None:
        """``"fixed in pkg>=X"`` / ``"removed in pkg>=X"`` (None: not fixed upstream): the one
        wording the engine, doctor, audit and the README use."""
        return f"{self.fix_word} in {self.fixed_in}" if self.fixed_in else None

    @property
    def opt_in_hint(self) -> str:
        """How to switch an opt-in patch on (the engine's DISABLED reason and audit say this)."""
        return f"enable with only=[{self.id!r}]" + (f" or {self.enable_env}=1" if self.enable_env else "")

    @property
    def modules(self) -> tuple[str, ...]:
        """The modules the patch waits for (its targets', then ``waits_for``), in order, without repeats."""
        return tuple(dict.fromkeys([*(t.module for t in self.targets), *self.waits_for]))


#: ``Advisory.severity``: what the bug does to a run.
SEVERITIES = ("silent wrong results", "crash", "degraded")


class Advisory(Record):
    """A verified bug hfpatches does *not* fix in place (one release wide, GPU-only, or not
    fixable by a patch): data only, no implementation. ``doctor`` lists those whose ``requires``
    hold for the installed versions, ``audit`` judges them on a pin set, the README lists them.

    Fields as :class:`Patch` (``id``, ``summary``, ``upstream``, ``requires``, ``fixed_in``), plus
    ``workaround`` (what a user does instead), ``severity`` (one of :data:`SEVERITIES`) and
    ``evidence`` (how it was verified here: the releases run, or why it could not run)."""

    __slots__ = ("id", "summary", "upstream", "requires", "fixed_in", "workaround", "severity", "evidence")
    _defaults = {"evidence": ""}
    id: str
    summary: str
    upstream: tuple[str, ...]
    requires: tuple[str, ...]
    fixed_in: str | None
    workaround: str
    severity: str
    evidence: str

    @property
    def fixed_text(self) -> str | None:
        return f"fixed in {self.fixed_in}" if self.fixed_in else None
