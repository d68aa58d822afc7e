"""liger_ce_reduction_none: Liger's cross-entropy with ``reduction="none"``.

Real Liger kernel, CPU: the kernel cases run in one child process with TRITON_INTERPRET=1 (it must
be set before triton is imported), which runs every scenario without hfpatches, then with it (alone
and together with liger_flce_reduction_none and liger_flash_kwargs), then reverted. On the affected
stack (liger-kernel 0.5.6) the unpatched logits gradients are wrong and the patched ones equal
torch's; on the latest stack (0.8.5, fixed upstream in 0.5.9) the patch is NOT_AFFECTED and the same
scenarios are right.

Tolerance: Liger computes in fp32, the reference in fp64 from the same fp32 logits; softmax
gradients of 16 classes: ~1e-7 (measured <= 5e-8). ``ATOL = 1e-5`` (x scale); the bug is O(1).
"""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("liger_kernel")

import hfpatches  # noqa: E402
from hfpatches import Outcome  # noqa: E402
from hfpatches._engine import run_probe  # noqa: E402
from hfpatches.patches.liger_ce_reduction_none import impl as P  # noqa: E402

PID = P.PATCH_ID
ATOL = 1e-5


@pytest.fixture(scope="module")
def affected() -> bool:
    """The installed liger-kernel is inside the patch's range (not decided by the stack's name)."""
    from importlib.metadata import version

    from packaging.requirements import Requirement

    from hfpatches._registry import registry

    req = Requirement(registry()[PID].requires[0])
    return req.specifier.contains(version(req.name), prereleases=True)


TRIO = ["liger_ce_reduction_none", "liger_flce_reduction_none", "liger_flash_kwargs"]

KERNEL_CHILD = r'''
import json, os
assert os.environ.get("TRITON_INTERPRET") == "1"
import torch
torch.set_num_threads(1)
import hfpatches
from hfpatches._engine import run_probe
from hfpatches.demos import liger_ce_reduction_none as D
from hfpatches.demos import liger_flce_reduction_none as FD
import liger_kernel.transformers  # noqa: F401
from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction as F

CASES = {   # every case has an ignore_index token and a zero token weight
    "plain": {},
    "label_smoothing": {"options": {"label_smoothing": 0.1}},
    "z_loss": {"options": {"lse_square_scale": 1e-2}},
    "ce_weight": {"options": {"ce_weight": torch.linspace(0.5, 1.5, 16)}},
    "big": {"shape": {"bt": 33, "v": 100, "ignored": (0, 7, 30)}},
    "softcap": {"options": {"softcap": 5.0}},
}
PATHS = ("module", "functional", "function")

def sweep():
    out = {}
    for name, case in CASES.items():
        for path in PATHS:
            try:
                out[f"{name}/{path}"] = D.scenario(path=path, options=case.get("options"), **case.get("shape", {}))
            except Exception as e:   # softcap: Triton's interpreter cannot run libdevice.tanh
                out[f"{name}/{path}"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    return out

def double_backward():
    z, y, tw = D.inputs()
    zl = z.clone().requires_grad_()
    from hfpatches.patches.liger_ce_reduction_none.impl import function_args
    loss = F.apply(*function_args(F, zl * 1.0, y, reduction="none"))[0]
    (loss * tw).sum().backward(retain_graph=True)
    try:
        (loss * tw).sum().backward()
    except RuntimeError as e:
        return str(e)[:200]
    return None

out = {}
pr = run_probe("liger_ce_reduction_none")
out["probe_before"] = [pr.bug_present, pr.detail]
out["before"] = sweep()
ms_before = D.mean_sum_runs()
orig = vars(F)["backward"]
rep = hfpatches.apply(only=["liger_ce_reduction_none"])["liger_ce_reduction_none"]
out["outcome"], out["reason"] = rep.outcome.value, rep.reason
out["live"] = vars(F)["backward"] is not orig
out["after"] = sweep()
out["mean_sum_identical"] = D.same(ms_before, D.mean_sum_runs())
out["double_backward"] = double_backward() if out["live"] else "not live"
# all three Liger patches together: each scenario still right
trio = hfpatches.apply(only=%(trio)r)
out["trio"] = {k: v.outcome.value for k, v in trio.items()}
out["trio_ce"] = D.scenario(path="module")
out["trio_flce"] = FD.scenario(path="module")
out["trio_mean_sum_identical"] = D.same(ms_before, D.mean_sum_runs())
from hfpatches.demos.liger_flash_kwargs import liger_forward, tiny_model
model = tiny_model("llama", 64, seed=3)
ids = torch.arange(12).reshape(2, 6) * 5 %% 64
with liger_forward("llama"):
    out["trio_lm_loss"] = float(model(input_ids=ids, labels=ids).loss)
out["plain_lm_loss"] = float(tiny_model("llama", 64, seed=3)(input_ids=ids, labels=ids).loss)
hfpatches.revert(%(trio)r)
out["revert_identity"] = vars(F)["backward"] is orig
out["after_revert"] = D.scenario()
print("RESULT " + json.dumps(out))
''' % {"trio": TRIO}


@pytest.fixture(scope="module")
def kernel():
    from conftest import run_py

    proc = run_py(KERNEL_CHILD, env={"TRITON_INTERPRET": "1"}, timeout=1200)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def _exact(r: dict) -> bool:
    return max(r["loss"], r["z"]) <= ATOL * max(1.0, r["scale"])


def _cases(kernel, stage):
    """The cases that ran. Only Triton-interpreter limits may stop one (measured: softcap on both
    stacks -- libdevice.tanh; class weights on liger-kernel 0.8.5); the GPU suite runs those."""
    ran = {k: v for k, v in kernel[stage].items() if "error" not in v}
    for k, v in kernel[stage].items():
        if "error" in v:
            assert v["error"].startswith("InterpreterError") and k.split("/")[0] in ("softcap", "ce_weight"), (k, v)
    required = {k for k in kernel[stage] if k.split("/")[0] not in ("softcap", "ce_weight")}
    assert required <= set(ran), sorted(ran)
    return ran


def test_class_weights_ran_where_the_bug_is(affected, kernel):
    if affected:
        assert all("error" not in kernel["after"][f"ce_weight/{p}"] for p in ("module", "functional", "function"))


def test_unpatched_shows_wrong_gradients(affected, kernel):
    """Without hfpatches: per-token loss right; on 0.5.6 the logits gradient of sum(loss * w) is
    wrong by O(1) in every case and path (plain, label smoothing, z-loss, class weights, 33
    tokens); on 0.8.5 right."""
    for case, r in _cases(kernel, "before").items():
        assert r["loss"] <= ATOL * max(1.0, r["scale"]), (case, r)
        if affected:
            assert r["z"] > 0.1 * r["scale"], (case, r)
        else:
            assert _exact(r), (case, r)


def test_patched_gradients_equal_torch(affected, kernel):
    if affected:
        assert kernel["outcome"] == "APPLIED", kernel["reason"]
        assert kernel["reason"] == "probe found the bug; fix applied and verified" and kernel["live"]
        assert kernel["probe_before"][0] is True and "ran on Triton interpreter" in kernel["probe_before"][1]
    else:
        assert kernel["outcome"] == "NOT_AFFECTED" and "fixed in liger-kernel>=0.5.9" in kernel["reason"], kernel
        assert not kernel["live"]
        assert kernel["probe_before"][0] is False, kernel["probe_before"]
    after = _cases(kernel, "after")
    assert after.keys() == _cases(kernel, "before").keys()
    for case, r in after.items():
        assert _exact(r), (case, r)


def test_mean_and_sum_bit_identical(kernel):
    assert kernel["mean_sum_identical"] and kernel["trio_mean_sum_identical"]


def test_second_backward_raises_instead_of_scaling_twice(affected, kernel):
    if affected:
        assert "backward ran twice" in kernel["double_backward"], kernel["double_backward"]
    else:
        assert kernel["double_backward"] == "not live"


def test_composes_with_the_other_liger_patches(affected, kernel):
    """liger_ce_reduction_none + liger_flce_reduction_none + liger_flash_kwargs applied together:
    both reduction="none" losses have torch's gradients, Liger's model loss equals transformers'."""
    if affected:   # liger_ce_reduction_none was applied alone just before
        assert kernel["trio"]["liger_ce_reduction_none"] == "ALREADY_APPLIED", kernel["trio"]
        assert kernel["trio"]["liger_flce_reduction_none"] == "APPLIED", kernel["trio"]
        assert kernel["trio"]["liger_flash_kwargs"] == "APPLIED", kernel["trio"]
    else:
        assert kernel["trio"]["liger_ce_reduction_none"] == "NOT_AFFECTED", kernel["trio"]
    assert _exact(kernel["trio_ce"]), kernel["trio_ce"]
    f = kernel["trio_flce"]
    assert max(f["loss"], f["x"], f["w"], f["b"]) <= ATOL * max(1.0, f["scale"]), f
    assert abs(kernel["trio_lm_loss"] - kernel["plain_lm_loss"]) <= 1e-5, kernel


def test_revert_is_exact(affected, kernel):
    assert kernel["revert_identity"]
    r = kernel["after_revert"]
    assert (r["z"] > 0.1 * r["scale"]) if affected else _exact(r), r


APPLY_FIRST_CHILD = r'''
import json, hfpatches
first = hfpatches.apply(only=["liger_ce_reduction_none"])["liger_ce_reduction_none"]
import liger_kernel.transformers  # noqa: F401  (the probe runs in the import hook, real kernel)
r = hfpatches.status()["liger_ce_reduction_none"]
print("RESULT " + json.dumps([first.outcome.value, r.outcome.value, r.reason]))
'''


def test_apply_before_liger_is_imported(affected, py):
    proc = py(APPLY_FIRST_CHILD, env={"TRITON_INTERPRET": "1"}, timeout=600)
    first, outcome, reason = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    assert first == "DEFERRED"
    if affected:
        assert (outcome, reason) == ("APPLIED", "probe found the bug; fix applied and verified")
    else:
        assert outcome == "NOT_AFFECTED", reason


# ----------------------------------------------------------------------------- in process (no kernel)
@pytest.fixture(scope="module")
def F():
    import liger_kernel.transformers  # noqa: F401
    from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction

    return LigerCrossEntropyFunction


def test_probe_cannot_run_here_and_says_so(affected, F):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the probe may run on it (gpu_tests cover that)")
    res = run_probe(PID)
    assert res.bug_present is None and "TRITON_INTERPRET=1" in res.detail, res
    r = hfpatches.apply(only=[PID])[PID]
    if affected:
        assert r.outcome == Outcome.APPLIED and r.bug_present is None, r
        assert r.reason.startswith("probe could not run (Liger's Triton kernel cannot run") and "not verified" in r.reason
    else:
        assert r.outcome == Outcome.NOT_AFFECTED and "outside the affected range" in r.reason, r
    hfpatches.revert([PID])


def test_revert_identity_in_process(affected, F):
    raw = vars(F)["backward"]
    r = hfpatches.apply(only=[PID])[PID]
    if affected:
        assert r.outcome == Outcome.APPLIED
        assert getattr(vars(F)["backward"].__func__, "__hfpatches_patch__", None) == PID
        assert hfpatches.get_original(f"{P.MODULE}.{P.CLASS}.backward") is raw
    hfpatches.revert([PID])
    assert vars(F)["backward"] is raw


class _Ctx:
    needs_input_grad = (True,) + (False,) * 8

    def __init__(self, grad):
        self.saved_tensors = (grad,)


def test_backward_logic_without_the_kernel():
    """The replacement alone (no Triton): a scalar grad_output goes to the original unchanged; a
    per-token one scales row i by grad_output[i] in place, without bumping the version counter."""
    seen = []

    def original(ctx, grad_output, grad2):
        seen.append(grad_output)
        return "orig"

    bwd = P._make_backward(original)
    g = torch.arange(12.0).reshape(3, 4)
    ctx = _Ctx(g)
    assert bwd(ctx, torch.tensor(2.0), None) == "orig" and len(seen) == 1
    version = g._version
    out = bwd(ctx, torch.tensor([1.0, 0.0, 0.5]), None)
    assert out[0] is g and all(o is None for o in out[1:]) and len(out) == 9
    assert torch.equal(g, torch.tensor([[0.0, 1, 2, 3], [0, 0, 0, 0], [4, 4.5, 5, 5.5]]))
    assert g._version == version
    with pytest.raises(RuntimeError, match="backward ran twice"):
        bwd(ctx, torch.tensor([1.0, 0.0, 0.5]), None)
    with pytest.raises(RuntimeError, match="expected"):
        bwd(_Ctx(torch.zeros(3, 4)), torch.ones(2), None)


def test_declaration():
    from packaging.requirements import Requirement

    from hfpatches._registry import registry

    p = registry()[PID]
    assert p.default_enabled and p.fixed_in == "liger-kernel>=0.5.9"
    spec = Requirement(p.requires[0]).specifier
    assert all(spec.contains(v) for v in ["0.5.0", "0.5.2", "0.5.5", "0.5.6", "0.5.8"])
    assert not any(spec.contains(v) for v in ["0.4.0", "0.5.9", "0.5.10", "0.6.0", "0.8.5"])
    doc = __import__(f"hfpatches.patches.{PID}", fromlist=["PATCH"]).__doc__
    assert len(doc.strip().splitlines()) <= 30
    heads = [ln for ln in doc.splitlines() if ln and not ln.startswith(" ")][1:]
    assert heads == ["Bug", "Affected", "Upstream", "Probe", "What changes"], heads
