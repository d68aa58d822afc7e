"""Outcomes and the Report every public call returns."""
from __future__ import annotations

import enum
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Iterator, Mapping


class Outcome(str, enum.Enum):
    APPLIED = "APPLIED"
    ALREADY_APPLIED = "ALREADY_APPLIED"
    DEFERRED = "DEFERRED"
    NOT_INSTALLED = "NOT_INSTALLED"
    NOT_AFFECTED = "NOT_AFFECTED"
    DISABLED = "DISABLED"
    TARGET_CHANGED = "TARGET_CHANGED"
    CONFLICT = "CONFLICT"
    FAILED = "FAILED"

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.value


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


@dataclass(frozen=True)
class PatchResult:
    patch_id: str
    outcome: Outcome
    reason: str
    target_version: str | None = None   # "flash-attn 2.8.3" style, or None
    in_range: bool | None = None        # the installed version is inside `requires`
    bug_present: bool | None = None     # probe verdict before applying (None: not probed)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["outcome"] = self.outcome.value
        return d


@dataclass
class Report(Mapping[str, PatchResult]):
    """Maps each patch id to its :class:`PatchResult`."""

    results: dict[str, PatchResult] = field(default_factory=dict)

    def __getitem__(self, key: str) -> PatchResult:
        return self.results[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

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
        kw.setdefault("indent", 2)
        return json.dumps(self.to_dict(), **kw)

    def __str__(self) -> str:
        if not self.results:
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


def write_json_atomic(path: str, payload: dict) -> None:
    """Write ``payload`` as JSON so that a crash leaves the old file intact."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".hfpatches-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
