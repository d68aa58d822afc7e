"""Lifecycle cases generated over every registered patch (ddtrace's idea), each in a fresh
subprocess, so no case sees another's imports or patches.

For each patch and case the subprocess prints one JSON line; the assertions live here. The
expected outcome is whatever the patch honestly reports on this stack (APPLIED where the bug is
present, NOT_AFFECTED where upstream fixed it, NOT_INSTALLED where the target is absent); what is
asserted is that every order and switch agrees with it and that revert restores identity.
"""
from __future__ import annotations

import json

import pytest

from hfpatches._registry import registry

PATCH_IDS = sorted(registry())

PRELUDE = r'''
import importlib, importlib.util, json, os, sys
import hfpatches
from hfpatches._registry import registry, ENGINE
PID = %(pid)r
P = registry()[PID]

def import_targets():
    """Import the patch's target modules; False when the target is not installed here."""
    if any(m.split(".")[0] == "flash_attn" for m in P.modules):
        if importlib.util.find_spec("flash_attn") is None:
            return False
        from _stubs import install_flash_attn_cpu_stubs
        install_flash_attn_cpu_stubs()
    try:
        for m in P.modules:
            importlib.import_module(m)
    except ImportError:
        return False
    return True

_MISSING = object()

def snapshot():
    out = {}
    for t in P.targets:
        if t.module not in sys.modules:
            continue
        try:
            owner, name, raw = t.resolve()
        except (AttributeError, KeyError):
            continue
        out[t.path] = (owner, name, raw, name in getattr(owner, "__dict__", {}))
    return out

def same(before):
    for path, (owner, name, raw, own) in before.items():
        now_own = name in getattr(owner, "__dict__", {})
        now = owner.__dict__.get(name, _MISSING) if own else _MISSING
        if own and now is not raw:
            return f"{path} is not the original object"
        if now_own != own:
            return f"{path}: own attribute {'added' if now_own else 'removed'}"
    return "same"

def outcome(rep):
    return rep[PID].outcome.value

def emit(**kw):
    print("RESULT " + json.dumps(kw))
'''

CASES = {
    "import_then_apply": '''
ok = import_targets()
before = snapshot()
rep = hfpatches.apply(only=[PID])
live = bool(ENGINE.recorder.records(PID))
emit(installed=ok, outcome=outcome(rep), live=live, reason=rep[PID].reason)
''',
    "apply_then_import": '''
first = outcome(hfpatches.apply(only=[PID]))
ok = import_targets()
st = hfpatches.status()
emit(installed=ok, first=first, outcome=st[PID].outcome.value, live=bool(ENGINE.recorder.records(PID)))
''',
    "apply_twice": '''
ok = import_targets()
a = outcome(hfpatches.apply(only=[PID]))
b = outcome(hfpatches.apply(only=[PID]))
emit(installed=ok, first=a, second=b)
''',
    "apply_revert_apply_identity": '''
ok = import_targets()
before = snapshot()
a = outcome(hfpatches.apply(only=[PID]))
changed = same(before) != "same"
r = outcome(hfpatches.revert([PID]))
after_revert = same(before)
original = hfpatches.get_original(PID)
c = outcome(hfpatches.apply(only=[PID]))
hfpatches.revert([PID])
emit(installed=ok, first=a, changed=changed, revert=r, after_revert=after_revert, again=c, final=same(before))
''',
    "revert_without_apply": '''
ok = import_targets()
before = snapshot()
r = hfpatches.revert([PID])
emit(installed=ok, outcome=outcome(r), identity=same(before))
''',
    "patched_restores_on_exception": '''
ok = import_targets()
before = snapshot()
inside = None
try:
    with hfpatches.patched(PID) as rep:
        inside = outcome(rep)
        raise KeyError("boom")
except KeyError:
    pass
emit(installed=ok, inside=inside, identity=same(before), live=bool(ENGINE.recorder.records(PID)))
''',
    "env_disable": '''
os.environ["HFPATCHES_DISABLE"] = PID
ok = import_targets()
before = snapshot()
rep = hfpatches.apply()
emit(installed=ok, outcome=outcome(rep), reason=rep[PID].reason, identity=same(before))
''',
    "env_only": '''
os.environ["HFPATCHES_ONLY"] = PID
ok = import_targets()
rep = hfpatches.apply()
others = sorted({r.outcome.value for k, r in rep.items() if k != PID})
emit(installed=ok, outcome=outcome(rep), others=others)
''',
    "strict_raises_when_fix_does_not_verify": '''
os.environ["HFPATCHES_STRICT"] = "1"
ok = import_targets()
before = snapshot()
first = hfpatches.apply(only=[PID])   # an honest outcome never raises under strict
normal, in_range = outcome(first), first[PID].in_range
hfpatches.revert([PID])
object.__setattr__(P, "probe", lambda: True)    # a fix that never verifies
raised = None
try:
    hfpatches.apply(only=[PID])
except hfpatches.PatchError as e:
    raised = str(e)
emit(installed=ok, normal=normal, in_range=in_range, raised=raised, identity=same(before))
''',
}

OK = {"APPLIED", "NOT_AFFECTED", "NOT_INSTALLED"}


def run_case(py, pid: str, case: str) -> dict:
    proc = py(PRELUDE % {"pid": pid} + CASES[case])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout + proc.stderr
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def honest(request):
    """The outcome each patch gives on this stack when imported first (computed once)."""
    return {}


def expected(py, honest, pid):
    if pid not in honest:
        honest[pid] = run_case(py, pid, "import_then_apply")
    return honest[pid]


@pytest.mark.parametrize("pid", PATCH_IDS)
def test_import_then_apply(py, honest, pid):
    r = expected(py, honest, pid)
    assert r["outcome"] in OK, r
    assert r["live"] == (r["outcome"] == "APPLIED")
    if not r["installed"]:
        assert r["outcome"] in ("NOT_INSTALLED", "NOT_AFFECTED"), r


@pytest.mark.parametrize("pid", PATCH_IDS)
def test_apply_then_import_same_result(py, honest, pid):
    want = expected(py, honest, pid)
    r = run_case(py, pid, "apply_then_import")
    if r["installed"]:
        assert r["first"] in ("DEFERRED", "NOT_AFFECTED", "APPLIED"), r
    assert r["outcome"] == want["outcome"] and r["live"] == want["live"], (r, want)


@pytest.mark.parametrize("pid", PATCH_IDS)
def test_apply_twice(py, honest, pid):
    want = expected(py, honest, pid)
    r = run_case(py, pid, "apply_twice")
    assert r["first"] == want["outcome"]
    assert r["second"] == ("ALREADY_APPLIED" if want["outcome"] == "APPLIED" else want["outcome"]), r


@pytest.mark.parametrize("pid", PATCH_IDS)
def test_apply_revert_apply_identity(py, honest, pid):
    want = expected(py, honest, pid)
    r = run_case(py, pid, "apply_revert_apply_identity")
    assert r["after_revert"] == "same" and r["final"] == "same", r
    if want["outcome"] == "APPLIED":
        assert r["changed"] and r["revert"] == "DISABLED" and r["again"] == "APPLIED", r
    else:
        assert not r["changed"] and r["again"] == want["outcome"], r


@pytest.mark.parametrize("pid", PATCH_IDS)
def test_revert_without_apply(py, pid):
    r = run_case(py, pid, "revert_without_apply")
    assert r["outcome"] == "DISABLED" and r["identity"] == "same", r


@pytest.mark.parametrize("pid", PATCH_IDS)
def test_patched_restores_on_exception(py, honest, pid):
    want = expected(py, honest, pid)
    r = run_case(py, pid, "patched_restores_on_exception")
    assert r["inside"] == want["outcome"] and r["identity"] == "same" and not r["live"], r


@pytest.mark.parametrize("pid", PATCH_IDS)
def test_env_disable(py, pid):
    r = run_case(py, pid, "env_disable")
    assert r["outcome"] == "DISABLED" and "HFPATCHES_DISABLE" in r["reason"] and r["identity"] == "same", r


@pytest.mark.parametrize("pid", PATCH_IDS)
def test_env_only(py, honest, pid):
    want = expected(py, honest, pid)
    r = run_case(py, pid, "env_only")
    assert r["outcome"] == want["outcome"] and r["others"] in ([], ["DISABLED"]), r


@pytest.mark.parametrize("pid", PATCH_IDS)
def test_strict_raises_when_fix_does_not_verify(py, honest, pid):
    want = expected(py, honest, pid)
    r = run_case(py, pid, "strict_raises_when_fix_does_not_verify")
    assert r["normal"] == want["outcome"], r
    assert r["identity"] == "same", r
    if r["installed"] and r["in_range"]:  # in range: the probe decides, and a fix that never verifies raises
        assert r["raised"] and "FAILED" in r["raised"] and pid in r["raised"], r
    else:  # out of range or absent: nothing is applied, nothing raises
        assert r["raised"] is None, r
