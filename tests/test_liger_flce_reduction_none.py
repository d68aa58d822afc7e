"""liger_flce_reduction_none: Liger's fused linear cross-entropy with ``reduction="none"``.

Real Liger kernel, CPU: the kernel cases run in one child process with TRITON_INTERPRET=1 (it
must be set before triton is imported; this process imports triton with liger), which runs every
scenario without hfpatches, then with it, then reverted. On the affected stack (liger-kernel
0.5.6) the unpatched gradients are wrong and the patched ones equal torch's; on the latest stack
(0.8.5, fixed upstream) the patch is NOT_AFFECTED and the same scenarios are right.

Tolerances: Liger computes in fp32, the reference in fp64 from the same fp32 inputs; the
quantities are O(1) sums of <= 64 products, so fp32 rounding gives ~1e-6 at most (measured
<= 1.6e-6). ``ATOL = 1e-5`` (x scale) leaves room for BLAS blocking differences; the bug is O(1).
"""
from __future__ import annotations

import inspect
import json
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("liger_kernel")

from hfpatches._engine import run_check, run_probe  # noqa: E402,F401
import hfpatches  # noqa: E402
from hfpatches import Outcome  # noqa: E402
from hfpatches.patches.liger_flce_reduction_none import impl as P  # noqa: E402

PID = P.PATCH_ID


@pytest.fixture(scope="session")
def stack() -> str:
    """'affected' where this patch's range holds for the installed versions, else 'latest' (the
    expectations below were written per stack; the boundary stack gets the ones its versions
    call for)."""
    from conftest import range_stack

    return range_stack(PID)
ATOL = 1e-5


@pytest.fixture(scope="module")
def F():
    import liger_kernel.transformers  # noqa: F401  (what a user imports)
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    return LigerFusedLinearCrossEntropyFunction


# ----------------------------------------------------------------------------- real kernel (child)
KERNEL_CHILD = r'''
import json, os
assert os.environ.get("TRITON_INTERPRET") == "1"
import torch
torch.set_num_threads(1)
import hfpatches
from hfpatches.demos import liger_flce_reduction_none as D
from hfpatches.patches.liger_flce_reduction_none import impl as P
from hfpatches._engine import run_probe
import liger_kernel.transformers  # noqa: F401
from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction as F

CASES = {   # every case has ignore_index tokens (3 by default) and a zero token weight
    "plain": {},
    "no_bias": {"shape": {"bias": False}},
    "label_smoothing": {"options": {"label_smoothing": 0.1}},
    "z_loss": {"options": {"lse_square_scale": 1e-2}},
    "ce_weight": {"options": {"ce_weight": torch.linspace(0.5, 1.5, 16)}},
    "chunked": {"shape": {"bt": 32, "h": 8, "v": 64, "ignored": (0, 7, 30)}},   # 8 chunks of 4
    "softcap": {"options": {"softcap": 5.0}},
}
PATHS = ("module", "functional", "function")

def sweep():
    out = {}
    for name, case in CASES.items():
        for path in PATHS:
            if path == "function" and case.get("options", {}).get("ce_weight") is not None:
                continue
            try:
                out[f"{name}/{path}"] = D.scenario(path=path, options=case.get("options"), **case.get("shape", {}))
            except Exception as e:   # softcap: Triton's interpreter cannot run libdevice.tanh
                out[f"{name}/{path}"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    return out

out = {}
pr = run_probe(P.PATCH_ID)
out["probe_before"] = [pr.bug_present, pr.detail]
out["before"] = sweep()
ms_before = D.mean_sum_identical()
ms_before_chunked = D.mean_sum_identical(bt=32, h=8, v=64, bias=False)
out["model_before"] = None
ref = D.weighted_llama_step(liger=False)
def model_diff(got):
    return {"loss": float((got["loss"] - ref["loss"]).abs().max()), "grads": D.max_diff(got["grads"], ref["grads"]),
            "params": D.max_diff(got["params"], ref["params"]),
            "grad_scale": max(float(g.abs().max()) for g in ref["grads"].values())}
out["model_before"] = model_diff(D.weighted_llama_step(liger=True))
orig = (vars(F)["forward"], vars(F)["backward"])
rep = hfpatches.apply(only=[P.PATCH_ID])[P.PATCH_ID]
out["outcome"], out["reason"], out["bug_present"] = rep.outcome.value, rep.reason, rep.bug_present
out["live"] = vars(F)["forward"] is not orig[0]
out["after"] = sweep()
out["mean_sum_identical"] = all(D.same(ms_before[k], v) for k, v in D.mean_sum_identical().items())
out["mean_sum_identical_chunked"] = all(
    D.same(ms_before_chunked[k], v) for k, v in D.mean_sum_identical(bt=32, h=8, v=64, bias=False).items())
out["model_after"] = model_diff(D.weighted_llama_step(liger=True))
# Liger's own model path (labels -> LigerForCausalLMLoss, always mean/sum): untouched
from hfpatches.demos.liger_flash_kwargs import liger_forward, tiny_model
def lm_path():
    model = tiny_model("llama", 64, seed=3)
    ids = torch.arange(12).reshape(2, 6) * 5 % 64
    with liger_forward("llama"):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}
lm_after = lm_path()
hfpatches.revert([P.PATCH_ID])
out["revert_identity"] = vars(F)["forward"] is orig[0] and vars(F)["backward"] is orig[1]
lm_before = lm_path()
out["lm_path_identical"] = bool(torch.equal(lm_before[0], lm_after[0])) and all(
    torch.equal(lm_before[1][k], lm_after[1][k]) for k in lm_before[1])
out["after_revert"] = D.scenario()
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def kernel():
    from conftest import run_py

    proc = run_py(KERNEL_CHILD, env={"TRITON_INTERPRET": "1"}, timeout=1200)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def _exact(r: dict) -> bool:
    tol = ATOL * max(1.0, r["scale"])
    return all(r[k] <= tol for k in ("loss", "x", "w", "b") if k in r)


REQUIRED = [f"{c}/{p}" for c in ("plain", "no_bias", "label_smoothing", "z_loss", "chunked")
            for p in ("module", "functional", "function")]


def _cases(kernel, stage):
    """The cases that ran. Only Triton-interpreter limits may stop one (measured: softcap on both
    stacks -- libdevice.tanh; class weights on liger-kernel 0.8.5); the GPU suite runs those."""
    ran = {k: v for k, v in kernel[stage].items() if "error" not in v}
    for k, v in kernel[stage].items():
        if "error" in v:
            assert v["error"].startswith("InterpreterError") and k.split("/")[0] in ("softcap", "ce_weight"), (k, v)
    assert set(REQUIRED) <= set(ran), sorted(ran)
    return ran


def test_unpatched_shows_wrong_gradients(stack, kernel):
    """Without hfpatches: the per-token loss is right; on liger-kernel 0.5.6 grad_input,
    grad_weight and grad_bias of sum(loss * w) are wrong by O(1) in every case and path; on
    0.8.5 (fixed upstream) they are right."""
    before = _cases(kernel, "before")
    for case, r in before.items():
        assert r["loss"] <= ATOL * max(1.0, r["scale"]), (case, r)
        if stack == "affected":
            assert max(r["x"], r["w"]) > 0.1 * r["scale"], (case, r)
            assert r.get("b", 1.0) > 1e-2, (case, r)
        else:
            assert _exact(r), (case, r)


def test_patched_gradients_equal_torch(stack, kernel):
    """With hfpatches: loss, grad_input, grad_weight, grad_bias equal torch's weighted
    F.cross_entropy(x @ W.T + b, y, reduction="none") -- ignore_index tokens, zero weights, no
    bias, label smoothing, z-loss, class weights, 8 chunks; module, functional and Function."""
    if stack == "affected":
        assert kernel["outcome"] == "APPLIED", kernel["reason"]
        assert kernel["reason"] == "probe found the bug; fix applied and verified" and kernel["live"]
        assert kernel["probe_before"][0] is True and "ran on Triton interpreter" in kernel["probe_before"][1]
    else:
        assert kernel["outcome"] == "NOT_AFFECTED" and "fixed in liger-kernel>=0.8.2" in kernel["reason"], kernel
        assert not kernel["live"]
        # the probe itself also says "no bug" on the fixed code
        assert kernel["probe_before"][0] is False, kernel["probe_before"]
    after = _cases(kernel, "after")
    assert after.keys() == _cases(kernel, "before").keys()
    for case, r in after.items():
        assert _exact(r), (case, r)


def test_softcap_where_the_interpreter_can_run_it(kernel):
    """softcap: Liger's kernel uses libdevice.tanh, which Triton's CPU interpreter cannot run
    (measured: InterpreterError on 0.5.6 and 0.8.x, patched or not); the GPU suite covers it.
    Should a later interpreter run it, it must be exact here too."""
    for stage in ("before", "after"):
        r = kernel[stage]["softcap/module"]
        if "error" in r:
            assert "InterpreterError" in r["error"], r
        elif stage == "after":
            assert _exact(r), r
    if "error" in kernel["after"]["softcap/module"]:
        pytest.skip("Triton's interpreter cannot run Liger's softcap kernel (libdevice.tanh): "
                    + kernel["after"]["softcap/module"]["error"][:120])


def test_mean_and_sum_untouched(kernel):
    """reduction="mean"/"sum" give bit-identical losses and gradients with and without the patch
    (they call the original; one comparison in between), one chunk and eight."""
    assert kernel["mean_sum_identical"] and kernel["mean_sum_identical_chunked"]
    assert kernel["lm_path_identical"]   # Liger's model loss (labels=...), also mean


def test_model_level_weighted_step(stack, kernel):
    """tiny Llama with apply_liger_kernel_to_llama(), per-token weighted loss through
    LigerFusedLinearCrossEntropyLoss(reduction="none") on the decoder's hidden states (Liger's
    model path always reduces with mean/sum): one SGD step gives transformers' gradients and
    parameters; unpatched on 0.5.6 it does not."""
    before, after = kernel["model_before"], kernel["model_after"]
    scale = after["grad_scale"]
    assert after["loss"] <= ATOL and after["grads"] <= ATOL * max(1.0, scale), after
    assert after["params"] <= ATOL, after
    if stack == "affected":
        assert before["grads"] > 0.05 * scale, before
    else:
        assert before["grads"] <= ATOL * max(1.0, scale), before


def test_revert_is_exact(stack, kernel):
    assert kernel["revert_identity"]
    r = kernel["after_revert"]
    if stack == "affected":   # the bug is back
        assert max(r["x"], r["w"]) > 0.1 * r["scale"], r
    else:
        assert _exact(r), r


APPLY_FIRST_CHILD = r'''
import json, hfpatches
first = hfpatches.apply(only=["liger_flce_reduction_none"])["liger_flce_reduction_none"]
import liger_kernel.transformers  # noqa: F401  (the probe runs in the import hook, real kernel)
r = hfpatches.status()["liger_flce_reduction_none"]
print("RESULT " + json.dumps([first.outcome.value, r.outcome.value, r.reason]))
'''


def test_apply_before_liger_is_imported(stack, py):
    """``import hfpatches; apply()`` first, Liger imported afterwards: the patch attaches in the
    import hook and its probe runs the real kernel there (interpreter)."""
    proc = py(APPLY_FIRST_CHILD, env={"TRITON_INTERPRET": "1"}, timeout=600)
    first, outcome, reason = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    assert first == "DEFERRED"
    if stack == "affected":
        assert (outcome, reason) == ("APPLIED", "probe found the bug; fix applied and verified")
    else:
        assert outcome == "NOT_AFFECTED", reason


# ----------------------------------------------------------------------------- in process (no kernel)
def test_probe_cannot_run_here_and_says_so(stack, F):
    """This process has no Triton interpreter (TRITON_INTERPRET unset when triton was imported)
    and no initialised CUDA: the probe does not claim to have run; on the affected stack the
    patch applies on the version range and its reason says so."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the probe may run on it (gpu_tests cover that)")
    res = run_probe(PID)
    assert res.bug_present is None and "TRITON_INTERPRET=1" in res.detail, res
    r = hfpatches.apply(only=[PID])[PID]
    if stack == "affected":
        assert r.outcome == Outcome.APPLIED and r.bug_present is None, r
        assert r.reason.startswith("probe could not run (Liger's Triton kernel cannot run") and "not verified" in r.reason
    else:
        assert r.outcome == Outcome.NOT_AFFECTED and "outside the affected range" in r.reason, r


def test_revert_identity_in_process(stack, F):
    raw = (vars(F)["forward"], vars(F)["backward"])
    r = hfpatches.apply(only=[PID])[PID]
    if stack == "affected":
        assert r.outcome == Outcome.APPLIED
        assert getattr(vars(F)["forward"].__func__, "__hfpatches_patch__", None) == PID
        assert getattr(vars(F)["backward"].__func__, "__hfpatches_patch__", None) == PID
        assert hfpatches.get_original(f"{P.MODULE}.{P.CLASS}.backward") is raw[1]
    hfpatches.revert([PID])
    assert vars(F)["forward"] is raw[0] and vars(F)["backward"] is raw[1]
    assert hfpatches.status()[PID].outcome not in (Outcome.APPLIED, Outcome.ALREADY_APPLIED)


def test_mean_sum_branch_passes_everything_through():
    """The replacement forward hands any reduction but "none" to the original unchanged
    (positional, keyword, default), and "none" without anything requiring grad too."""
    seen = []

    def original(ctx, _input, weight, target, bias=None, ce_weight=None, ignore_index=-100,
                 lse_square_scale=0.0, label_smoothing=0.0, reduction="mean", softcap=None, return_z_loss=False):
        seen.append((ctx, _input, weight, target, bias, reduction))
        return "out"

    names = tuple(inspect.signature(original).parameters)
    defaults = {k: p.default for k, p in inspect.signature(original).parameters.items()
                if p.default is not inspect.Parameter.empty}
    fwd = P._make_forward(original, names, defaults)
    x, w, y = torch.zeros(2, 2), torch.zeros(3, 2), torch.zeros(2, dtype=torch.long)
    assert fwd("c", x, w, y) == "out" and seen[-1][-1] == "mean"
    assert fwd("c", x, w, y, None, None, -100, 0.0, 0.0, "sum") == "out" and seen[-1][-1] == "sum"
    assert fwd("c", x, w, y, reduction="mean") == "out"
    assert fwd("c", x, w, y, None, None, -100, 0.0, 0.0, "none") == "out"   # nothing needs grad
    assert all(s[1] is x and s[2] is w for s in seen)


def test_chunk_size_is_liger_s():
    import triton

    for bt in (1, 3, 8, 33, 4096):
        for h, v in ((8, 16), (8, 64), (576, 49152), (4096, 32000), (64, 8)):
            want = triton.next_power_of_2(triton.cdiv(bt, triton.cdiv(v, h)))
            assert P.chunk_size(bt, h, v) == want, (bt, h, v)


def test_check_reports_a_changed_helper(stack, F, monkeypatch):
    if stack != "affected":
        pytest.skip("the check runs only in the affected range")
    ce = sys.modules[P.CE_MODULE]
    assert run_check(PID) is None
    monkeypatch.setattr(ce, "cross_entropy_forward", lambda logits, target: None)
    why = run_check(PID)
    assert why and "cross_entropy_forward is (logits, target)" in why and "expected" in why
    r = hfpatches.apply(only=[PID])[PID]
    assert r.outcome == Outcome.TARGET_CHANGED and "cross_entropy_forward" in r.reason


def test_declaration():
    from hfpatches._registry import registry

    p = registry()["liger_flce_reduction_none"]
    assert p.default_enabled and p.fixed_in == "liger-kernel>=0.8.2"
    from packaging.requirements import Requirement

    spec = Requirement(p.requires[0]).specifier
    inside = ["0.5.3", "0.5.6", "0.5.8", "0.6.3", "0.7.0", "0.8.1"]
    outside = ["0.5.2", "0.5.9", "0.5.10", "0.6.0", "0.6.2", "0.8.2", "0.8.5"]
    assert all(spec.contains(v) for v in inside) and not any(spec.contains(v) for v in outside)
    doc = __import__("hfpatches.patches.liger_flce_reduction_none", fromlist=["PATCH"]).__doc__
    assert len(doc.strip().splitlines()) <= 30
    heads = [ln for ln in doc.splitlines() if ln and not ln.startswith(" ")][1:]
    assert heads == ["Bug", "Affected", "Upstream", "Probe", "What changes"], heads


HALF_REVERT_CHILD = r'''
import json, os
assert os.environ.get("TRITON_INTERPRET") == "1"
import torch
import hfpatches
from hfpatches.demos import liger_flce_reduction_none as D
from hfpatches.patches.liger_flce_reduction_none import impl as P
import liger_kernel.transformers  # noqa: F401
from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction as F

out = {"outcome": hfpatches.apply(only=[P.PATCH_ID])[P.PATCH_ID].outcome.value}
ours = vars(F)["forward"].__func__

def profiled(*args, **kwargs):   # a profiler wraps the patched forward
    return ours(*args, **kwargs)

profiled.__module__ = "a_profiler"
F.forward = staticmethod(profiled)
rep = hfpatches.revert([P.PATCH_ID])[P.PATCH_ID]
out["revert"] = [rep.outcome.value, rep.reason]
out["backward_ours"] = getattr(vars(F)["backward"].__func__, "__hfpatches_patch__", None) == P.PATCH_ID
try:
    out["scenario"] = D.scenario(path="function")
except Exception as e:
    out["scenario"] = {"error": f"{type(e).__name__}: {e}"}
print("RESULT " + json.dumps(out))
'''


def test_half_revert_never_pairs_patched_forward_with_unpatched_backward(stack):
    """Issue 24 item 7 on the real kernel: the user wraps the patched ``forward`` (a profiler),
    then reverts. ``backward`` stays ours too (CONFLICT, reason given), so a reduction="none"
    backward still works and is exact (before: ValueError: too many values to unpack)."""
    from conftest import run_py

    proc = run_py(HALF_REVERT_CHILD, env={"TRITON_INTERPRET": "1"}, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    if stack != "affected" and out["outcome"] != "APPLIED":
        pytest.skip(f"the patch is {out['outcome']} on this stack: nothing to half-revert")
    assert out["revert"][0] == "CONFLICT" and "left in place" in out["revert"][1], out
    assert out["backward_ours"], out
    assert "error" not in out["scenario"] and _exact(out["scenario"]), out["scenario"]
