"""``python -m hfpatches demo``: every bug reproduced unpatched, then fixed, with numbers.

Each patch contributes ``hfpatches/demos/<patch_id>.py`` with ``run(say) -> bool``: it prints its
own before/after lines and returns False only when a fix that should verify did not. A patch
whose target is not installed, or not affected on this stack, says so in one line.
"""
from __future__ import annotations

import importlib
import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable


def _say(prefix: str) -> Callable[..., None]:
    def say(line: str = "") -> None:
        print(f"{prefix}{line}", flush=True)

    return say


def main(only: str | None = None) -> int:
    from ._registry import registry

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    reg = registry()
    ids = [s.strip() for s in only.split(",")] if only else list(reg)
    unknown = [i for i in ids if i not in reg]
    if unknown:
        print(f"unknown patch id(s): {', '.join(unknown)}; valid ids: {', '.join(sorted(reg))}", file=sys.stderr)
        return 2
    from ._doctor import versions

    print("hfpatches demo: each bug reproduced without the patch, then with it")
    print("  " + ", ".join(f"{k} {v}" for k, v in versions().items() if v))
    failed: list[str] = []
    t_all = time.perf_counter()
    for pid in ids:
        print(f"\n== {pid}: {reg[pid].summary}", flush=True)
        t0 = time.perf_counter()
        say = _say("   ")
        try:
            mod = importlib.import_module(f"hfpatches.demos.{pid}")
        except ModuleNotFoundError as e:
            if e.name != f"hfpatches.demos.{pid}":
                raise
            say(f"no demo for this patch yet ({e.name})")
            continue
        try:
            ok = bool(mod.run(say))
        except Exception as e:  # a crashing demo is a failed verification, shown, never hidden
            import traceback

            traceback.print_exc()
            say(f"DEMO ERROR: {type(e).__name__}: {e}")
            ok = False
        finally:
            import hfpatches

            hfpatches.revert([pid])
        say(f"-> {'ok' if ok else 'FIX DID NOT VERIFY'} ({time.perf_counter() - t0:.1f} s)")
        if not ok:
            failed.append(pid)
    print(f"\ndemo finished in {time.perf_counter() - t_all:.1f} s: "
          + ("every in-range fix verified" if not failed else f"NOT verified: {', '.join(failed)}"))
    return 1 if failed else 0
