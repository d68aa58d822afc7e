"""Lifecycle cases generated over every registered patch (ddtrace's idea), each in a fresh
subprocess, so no case sees another's imports or patches.

For each patch and case the subprocess prints one JSON line; the assertions live here. The
expected outcome is whatever the patch honestly reports on this stack (APPLIED where the bug is
present, NOT_AFFECTED where upstream fixed it, NOT_INSTALLED where the target is absent); what is
asserted is that every order and switch agrees with it and that revert restores identity.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hfpatches._registry import registry

PATCH_IDS = sorted(registry())

CASES = Path(__file__).with_name("lifecycle_cases.py")

# What a user may import first, per patch, beyond each target module and its top-level package.
# A probe that imports a module which may be mid-import at that moment fails here.
FIRST_IMPORTS_EXTRA = {
    "strict_loads": ["from transformers import BertModel", "from transformers import AutoModel"],
    "meta_buffers": ["transformers.models.llama.modeling_llama"],
    "liger_flash_kwargs": ["liger_kernel.transformers.model.loss_utils", "liger_kernel.transformers.monkey_patch"],
    "peft_save_load": ["flair.models"],
    "trainer_grad_accum_scaling": ["from transformers import Trainer", "transformers.training_args"],
    "accelerate_resume_epoch": ["accelerate.data_loader", "transformers.trainer"],
}


def first_imports(pid: str) -> list[str]:
    p = registry()[pid]
    out = []
    for m in p.modules:
        out += [m.partition(".")[0], m]
    return list(dict.fromkeys(out + FIRST_IMPORTS_EXTRA.get(pid, [])))


FIRST = [(pid, m) for pid in PATCH_IDS for m in first_imports(pid)]

OK = {"APPLIED", "NOT_AFFECTED", "NOT_INSTALLED"}


def run_case(py, pid: str, case: str, arg: str = "") -> dict:
    proc = py(f"import runpy, sys; sys.argv = [{str(CASES)!r}, {pid!r}, {case!r}, {arg!r}]; "
              f"runpy.run_path({str(CASES)!r}, run_name='__main__')")
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


@pytest.mark.parametrize(("pid", "first"), FIRST, ids=[f"{p}-{m}" for p, m in FIRST])
def test_first_import_is_any_target(py, honest, pid, first):
    """apply() first, then whichever module the user imports first: the same honest outcome."""
    want = expected(py, honest, pid)
    r = run_case(py, pid, "first_import", first)
    assert r["after_first_import"] != "FAILED", r
    assert r["outcome"] == want["outcome"] and r["live"] == want["live"], (r, want)


@pytest.mark.parametrize("pid", PATCH_IDS)
def test_status_checks_identity(py, honest, pid):
    """Somebody puts the original back behind our back: status() and the manifest say so, and
    apply() applies afresh."""
    want = expected(py, honest, pid)
    r = run_case(py, pid, "restored_behind_our_back")
    if want["outcome"] == "APPLIED":
        assert r["status"] == "CONFLICT" and not r["live"] and not r["manifest_live_restored"], r
        assert r["again"] == "APPLIED" and r["manifest_live"], r
    else:
        assert r["status"] == want["outcome"] and not r["manifest_live"], r


@pytest.mark.parametrize("pid", PATCH_IDS)
def test_conflicting_revert_then_original_back(py, honest, pid):
    want = expected(py, honest, pid)
    r = run_case(py, pid, "revert_conflict_then_original_back")
    if want["outcome"] == "APPLIED":
        assert r["revert"] == "CONFLICT" and r["again"] == "APPLIED" and r["final"] == "same", r
