"""Lifecycle cases, run one per fresh interpreter by tests/test_lifecycle.py (ddtrace's idea):
``python tests/lifecycle_cases.py PATCH_ID CASE [ARG]`` prints one ``RESULT {json}`` line.

Real code, not source strings: every case is a function below. What is asserted lives in
test_lifecycle.py; a case only reports what it saw.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys

import hfpatches
from hfpatches._engine import ENGINE
from hfpatches._registry import registry

_MISSING = object()


#: modules a patch with no (or not only) declared targets changes when they are imported: the cases
#: import them too, so that what the patch does is there to be checked (read from the recorder)
DYNAMIC_IMPORTS = {"packed_attention_boundaries": ["transformers.models.llama.modeling_llama"]}


def import_targets(patch) -> bool:
    """Import the patch's target modules; False when the target is not installed here."""
    if any(m.split(".")[0] == "flash_attn" for m in patch.modules):
        if importlib.util.find_spec("flash_attn") is None:
            return False
        from _stubs import install_flash_attn_cpu_stubs

        install_flash_attn_cpu_stubs()
    try:
        for m in (*patch.modules, *DYNAMIC_IMPORTS.get(patch.id, ())):
            importlib.import_module(m)
    except ImportError:
        return False
    return True


def snapshot(patch) -> dict:
    out = {}
    for t in patch.targets:
        if t.module not in sys.modules:
            continue
        try:
            owner, name, raw = t.resolve()
        except (AttributeError, KeyError):
            continue
        out[t.path] = (owner, name, raw, name in getattr(owner, "__dict__", {}))
    return out


def recorded(pid: str) -> list:
    """What the recorder says ``pid`` changed (owner, name, original, had_own): also the changes no
    declared target names (classes wrapped per architecture, subclasses)."""
    return [(m.owner, m.name, m.original, m.had_own) for m in ENGINE._records(pid)]


def same_recorded(recs: list) -> str:
    for owner, name, original, had_own in recs:
        path = f"{getattr(owner, '__qualname__', owner)}.{name}"
        if had_own and owner.__dict__.get(name, _MISSING) is not original:
            return f"{path} is not the original object"
        if not had_own and name in owner.__dict__:
            return f"{path}: own attribute added"
    return "same"


def or_recorded(saved: dict, pid: str) -> dict:
    """``saved`` (the declared targets before apply) and, unless each of them is its owner's own
    attribute, what the recorder says the patch replaced (in the same form): a patch without
    declared targets, or whose declared target is inherited (peft >= 0.18: ``LoraModel`` inherits
    ``BaseTuner._unload_and_optionally_merge``), changes owners only the recorder names."""
    if saved and all(own for _, _, _, own in saved.values()):
        return saved
    out = dict(saved)
    covered = {(id(o), n) for o, n, _, _ in saved.values()}
    for o, n, raw, own in recorded(pid):
        if (id(o), n) not in covered:
            out[f"{getattr(o, '__qualname__', o)}.{n}"] = (o, n, raw, own)
    return out


def same(before: dict) -> str:
    for path, (owner, name, raw, own) in before.items():
        now_own = name in getattr(owner, "__dict__", {})
        now = owner.__dict__.get(name, _MISSING) if own else _MISSING
        if own and now is not raw:
            return f"{path} is not the original object"
        if now_own != own:
            return f"{path}: own attribute {'added' if now_own else 'removed'}"
    return "same"


def outcome(rep, pid: str) -> str:
    return rep[pid].outcome.value


# ----------------------------------------------------------------------------- cases
def import_then_apply(pid, patch, arg):
    ok = import_targets(patch)
    rep = hfpatches.apply(only=[pid])
    return dict(installed=ok, outcome=outcome(rep, pid), live=pid in ENGINE.live_ids(), reason=rep[pid].reason)


def apply_then_import(pid, patch, arg):
    first = outcome(hfpatches.apply(only=[pid]), pid)
    ok = import_targets(patch)
    st = hfpatches.status()
    return dict(installed=ok, first=first, outcome=outcome(st, pid), live=pid in ENGINE.live_ids())


def first_import(pid, patch, arg):
    """apply(), then the user's first import is ``arg`` (a module or an import statement)."""
    first = outcome(hfpatches.apply(only=[pid]), pid)
    if patch.modules[0].split(".")[0] == "flash_attn" and importlib.util.find_spec("flash_attn") is not None:
        from _stubs import install_flash_attn_cpu_stubs

        install_flash_attn_cpu_stubs()
    try:
        if " " in arg:
            exec(arg, {})
        else:
            importlib.import_module(arg)
        err = None
    except ImportError as e:
        err = f"{type(e).__name__}: {e}"
    mid = hfpatches.status()[pid]
    ok = import_targets(patch)
    st = hfpatches.status()
    return dict(installed=ok, first=first, import_error=err, after_first_import=mid.outcome.value,
                after_first_reason=mid.reason, outcome=outcome(st, pid), live=pid in ENGINE.live_ids())


def apply_twice(pid, patch, arg):
    ok = import_targets(patch)
    a = outcome(hfpatches.apply(only=[pid]), pid)
    b = outcome(hfpatches.apply(only=[pid]), pid)
    return dict(installed=ok, first=a, second=b)


def apply_revert_apply_identity(pid, patch, arg):
    ok = import_targets(patch)
    before = snapshot(patch)
    a = outcome(hfpatches.apply(only=[pid]), pid)
    recs = recorded(pid)
    changed = same(before) != "same" or (bool(recs) and same_recorded(recs) != "same")
    r = outcome(hfpatches.revert([pid]), pid)
    after_revert = same(before) if same(before) != "same" else same_recorded(recs)
    hfpatches.get_original(pid)
    c = outcome(hfpatches.apply(only=[pid]), pid)
    hfpatches.revert([pid])
    final = same(before) if same(before) != "same" else same_recorded(recs)
    return dict(installed=ok, first=a, changed=changed, revert=r, after_revert=after_revert, again=c,
                final=final)


def revert_without_apply(pid, patch, arg):
    ok = import_targets(patch)
    before = snapshot(patch)
    r = hfpatches.revert([pid])
    return dict(installed=ok, outcome=outcome(r, pid), identity=same(before))


def patched_restores_on_exception(pid, patch, arg):
    ok = import_targets(patch)
    before = snapshot(patch)
    inside = None
    try:
        with hfpatches.patched(pid) as rep:
            inside = outcome(rep, pid)
            raise KeyError("boom")
    except KeyError:
        pass
    return dict(installed=ok, inside=inside, identity=same(before), live=bool(ENGINE.recorder.records(pid)))


def env_disable(pid, patch, arg):
    os.environ["HFPATCHES_DISABLE"] = pid
    ok = import_targets(patch)
    before = snapshot(patch)
    rep = hfpatches.apply()
    return dict(installed=ok, outcome=outcome(rep, pid), reason=rep[pid].reason, identity=same(before))


def env_only(pid, patch, arg):
    os.environ["HFPATCHES_ONLY"] = pid
    ok = import_targets(patch)
    rep = hfpatches.apply()
    others = sorted({r.outcome.value for k, r in rep.items() if k != pid})
    return dict(installed=ok, outcome=outcome(rep, pid), others=others)


def strict_raises_when_fix_does_not_verify(pid, patch, arg):
    os.environ["HFPATCHES_STRICT"] = "1"
    ok = import_targets(patch)
    before = snapshot(patch)
    first = hfpatches.apply(only=[pid])   # an honest outcome never raises under strict
    normal, in_range = outcome(first, pid), first[pid].in_range
    hfpatches.revert([pid])
    object.__setattr__(patch, "probe", lambda: True)    # a fix that never verifies
    raised = None
    try:
        hfpatches.apply(only=[pid])
    except hfpatches.PatchError as e:
        raised = str(e)
    return dict(installed=ok, normal=normal, in_range=in_range, raised=raised, identity=same(before))


def restored_behind_our_back(pid, patch, arg):
    """A library saved the original before apply() and puts it back later (item: status by identity)."""
    import tempfile

    report = os.path.join(tempfile.mkdtemp(prefix="hfpatches-lc-"), "manifest.json")
    os.environ["HFPATCHES_REPORT"] = report
    ok = import_targets(patch)
    saved = snapshot(patch)
    first = outcome(hfpatches.apply(only=[pid]), pid)
    saved = or_recorded(saved, pid)
    for owner, name, raw, own in saved.values():
        if own:
            setattr(owner, name, raw)
        elif name in getattr(owner, "__dict__", {}):
            delattr(owner, name)
    st = hfpatches.status()[pid]
    live_now = pid in ENGINE.live_ids()
    manifest_live_restored = pid in my_record(report).get("live", [])
    again = outcome(hfpatches.apply(only=[pid]), pid)
    return dict(installed=ok, first=first, status=st.outcome.value, status_reason=st.reason, live=live_now,
                again=again, manifest_live=pid in my_record(report).get("live", []),
                manifest_live_restored=manifest_live_restored, identity_after=same(saved))


def my_record(report: str) -> dict:
    """This process's record under HFPATCHES_REPORT (one file per process)."""
    from hfpatches import _manifest_report as _manifest

    records = _manifest.load(report)[0]
    return next(r for r in records if r.get("pid") == os.getpid())


def revert_conflict_then_original_back(pid, patch, arg):
    """revert() meets a foreign re-patch (CONFLICT, left in place); once the original is back,
    apply() applies afresh instead of repeating CONFLICT."""
    ok = import_targets(patch)
    saved = snapshot(patch)
    first = outcome(hfpatches.apply(only=[pid]), pid)
    saved = or_recorded(saved, pid)

    def foreign(*a, **k):
        raise AssertionError("foreign")

    foreign.__module__ = "somebody_else"
    for owner, name, raw, own in saved.values():
        setattr(owner, name, foreign)
    rev = outcome(hfpatches.revert([pid]), pid)
    for owner, name, raw, own in saved.values():
        if own:
            setattr(owner, name, raw)
        else:
            delattr(owner, name)
    again = outcome(hfpatches.apply(only=[pid]), pid)
    hfpatches.revert([pid])
    return dict(installed=ok, first=first, revert=rev, again=again, final=same(saved))


def main(argv: list[str]) -> None:
    pid, case = argv[0], argv[1]
    arg = argv[2] if len(argv) > 2 else ""
    result = globals()[case](pid, registry()[pid], arg)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
