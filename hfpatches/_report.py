"""Outcomes and the Report every public call returns."""
from __future__ import annotations

from ._declare import Record

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any

# No enum/dataclasses/typing/json/collections at import time: ``import hfpatches; apply()``
# must stay within its start-up budget (benchmarks/startup.py: BUDGET_MS).


class Outcome(str):
    """A patch outcome: a string constant (``Outcome.APPLIED == "APPLIED"``), enum-like.

    Not an ``enum.Enum`` on purpose: ``enum`` alone costs several ms of the start-up budget.
    """

    __slots__ = ()
    _ALL: tuple[str, ...] = ()
    APPLIED: Outcome
    ALREADY_APPLIED: Outcome
    DEFERRED: Outcome
    NOT_INSTALLED: Outcome
    NOT_AFFECTED: Outcome
    DISABLED: Outcome
    TARGET_CHANGED: Outcome
    CONFLICT: Outcome
    FAILED: Outcome

    def __new__(cls, value):
        value = str.__str__(value) if isinstance(value, str) else value
        if cls._ALL and value not in cls._ALL:
            raise ValueError(f"{value!r} is not an Outcome; valid: {', '.join(cls._ALL)}")
        return str.__new__(cls, value)

    @property
    def value(self) -> str:
        return str.__str__(self)

    @property
    def name(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"<Outcome.{str.__str__(self)}>"

    def __reduce__(self):
        return (Outcome, (str.__str__(self),))


for _n in ("APPLIED", "ALREADY_APPLIED", "DEFERRED", "NOT_INSTALLED", "NOT_AFFECTED", "DISABLED",
           "TARGET_CHANGED", "CONFLICT", "FAILED"):
    setattr(Outcome, _n, Outcome(_n))
Outcome._ALL = ("APPLIED", "ALREADY_APPLIED", "DEFERRED", "NOT_INSTALLED", "NOT_AFFECTED", "DISABLED",
                "TARGET_CHANGED", "CONFLICT", "FAILED")
del _n


#: Outcomes that are never a problem, also under strict mode.
OK_OUTCOMES = frozenset({Outcome.APPLIED, Outcome.ALREADY_APPLIED, Outcome.NOT_AFFECTED,
                         Outcome.NOT_INSTALLED, Outcome.DISABLED})
#: Outcomes that always mean "a fix that should be live is not".
BAD_OUTCOMES = frozenset({Outcome.FAILED, Outcome.TARGET_CHANGED, Outcome.CONFLICT})
#: Outcomes under which the fix is live.
LIVE_OUTCOMES = frozenset({Outcome.APPLIED, Outcome.ALREADY_APPLIED})


class PatchError(RuntimeError):
    """Raised by ``Report.raise_for_failures()`` and in strict mode."""

    def __init__(self, report: "Report"):
        self.report = report
        bad = [f"{r.patch_id}: {r.outcome.value} ({r.reason})" for r in report.values()
               if r.outcome not in OK_OUTCOMES]
        super().__init__("hfpatches: fixes that should be live are not:\n  " + "\n  ".join(bad))


class PatchResult(Record):
    """One patch's outcome, with a human reason (immutable).

    ``target_version``: ``"flash-attn 2.8.3"`` style, or None; ``in_range``: the installed version
    is inside ``requires``; ``bug_present``: the probe's verdict before applying (None: not probed).
    """

    __slots__ = ("patch_id", "outcome", "reason", "target_version", "in_range", "bug_present")
    _defaults = {"target_version": None, "in_range": None, "bug_present": None}
    patch_id: str
    outcome: Outcome
    reason: str
    target_version: str | None
    in_range: bool | None
    bug_present: bool | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "outcome", Outcome(self.outcome))

    def __repr__(self) -> str:
        return f"PatchResult({self.patch_id!r}, {self.outcome.value}, {self.reason!r})"

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__slots__}
        d["outcome"] = self.outcome.value
        return d


class Report(dict):
    """Maps each patch id to its :class:`PatchResult` (a dict, with a table ``str()``)."""

    @property
    def results(self) -> dict:
        return self

    def outcome(self, patch_id: str) -> Outcome:
        return self.results[patch_id].outcome

    @property
    def ok(self) -> bool:
        return not any(r.outcome in BAD_OUTCOMES for r in self.results.values())

    def raise_for_failures(self, strict: bool = False) -> "Report":
        """Raise :class:`PatchError` for FAILED / TARGET_CHANGED / CONFLICT.

        With ``strict=True`` a DEFERRED patch counts too (nothing is verified yet).
        """
        bad = BAD_OUTCOMES | ({Outcome.DEFERRED} if strict else frozenset())
        if any(r.outcome in bad for r in self.results.values()):
            raise PatchError(Report({k: v for k, v in self.results.items() if v.outcome in bad}))
        return self

    def to_dict(self) -> dict:
        return {k: v.to_dict() for k, v in self.results.items()}

    def to_json(self, **kw) -> str:
        import json

        kw.setdefault("indent", 2)
        return json.dumps(self.to_dict(), **kw)

    def __str__(self) -> str:
        if not self:
            return "(no patches)"
        rows = [("patch", "outcome", "target", "reason")]
        rows += [(r.patch_id, r.outcome.value, r.target_version or "-", r.reason)
                 for r in self.results.values()]
        w = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = []
        for i, row in enumerate(rows):
            lines.append("  ".join(c.ljust(w[j]) for j, c in enumerate(row[:3])) + "  " + row[3])
            if i == 0:
                lines.append("  ".join("-" * x for x in w) + "  " + "-" * 6)
        return "\n".join(lines)

    __repr__ = __str__

