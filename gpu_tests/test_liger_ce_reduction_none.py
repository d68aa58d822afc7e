"""liger_ce_reduction_none on CUDA: Liger's real Triton kernel (no interpreter), fp32 and bf16.

* per-token weighted ``reduction="none"`` loss: without the patch the logits gradient is wrong
  (liger-kernel 0.5.0-0.5.8), with it it equals torch's (fp64 reference from the same logits),
  softcap included (Triton's CPU interpreter cannot run it);
* "mean"/"sum" bit-identical with and without the patch;
* the probe runs on the GPU once CUDA is initialised.

Tolerances: fp32 1e-5 x scale (softmax of <= 4096 classes); bf16: the gradient is stored in the
bf16 logits (8-bit mantissa): 2e-2 x scale. The bug is O(1) x scale.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("liger_kernel")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

import hfpatches  # noqa: E402
from hfpatches import Outcome  # noqa: E402
from hfpatches._engine import run_probe  # noqa: E402
from hfpatches.demos import liger_ce_reduction_none as D  # noqa: E402

PID = "liger_ce_reduction_none"
TOL = {"fp32": 1e-5, "bf16": 2e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = {
    "plain": {},
    "label_smoothing": {"options": {"label_smoothing": 0.1}},
    "z_loss": {"options": {"lse_square_scale": 1e-2}},
    "softcap": {"options": {"softcap": 5.0}},
    "ce_weight": {"options": {"ce_weight": "linspace"}},
    "big": {"shape": {"bt": 1024, "v": 4096, "ignored": (0, 7, 300)}},
}


def _in_range() -> bool:
    import liger_kernel.transformers  # noqa: F401  (else the patch is DEFERRED)

    r = hfpatches.apply(only=[PID])[PID]
    hfpatches.revert([PID])
    return r.outcome != Outcome.NOT_AFFECTED


def _run(case, dtype, path="module"):
    spec = CASES[case]
    opts, shape = dict(spec.get("options", {})), dict(spec.get("shape", {}))
    if opts.get("ce_weight") == "linspace":
        opts["ce_weight"] = torch.linspace(0.5, 1.5, shape.get("v", 16), device="cuda")
    return D.scenario(device="cuda", dtype=DTYPES[dtype], path=path, options=opts, **shape)


def _exact(r, dtype):
    return max(r["loss"], r["z"]) <= TOL[dtype] * max(1.0, r["scale"])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_weighted_none_gradients(case, dtype):
    torch.zeros(1, device="cuda")   # CUDA initialised: the probe runs on the GPU
    affected = _in_range()
    try:
        before = _run(case, dtype)
    except TypeError as e:          # 0.5.0-0.5.2: no class weights
        pytest.skip(f"{case}: {e}")
    assert (before["z"] > 0.1 * before["scale"]) if affected else _exact(before, dtype), before
    rep = hfpatches.apply(only=[PID])[PID]
    try:
        want = "probe found the bug; fix applied and verified"
        assert (rep.outcome, rep.reason) == (Outcome.APPLIED, want) if affected else rep.outcome == Outcome.NOT_AFFECTED
        for path in ("module", "functional", "function"):
            assert _exact(_run(case, dtype, path), dtype), path
    finally:
        hfpatches.revert([PID])


def test_mean_sum_bit_identical():
    torch.zeros(1, device="cuda")
    runs = D.mean_sum_runs(device="cuda", bt=256, v=2048)
    hfpatches.apply(only=[PID])
    try:
        assert D.same(runs, D.mean_sum_runs(device="cuda", bt=256, v=2048))
    finally:
        hfpatches.revert([PID])


def test_probe_runs_on_the_gpu_once_cuda_is_initialised():
    torch.zeros(1, device="cuda")
    if not _in_range():
        pytest.skip("liger-kernel outside the affected range: the probe is not consulted")
    res = run_probe(PID)
    assert res.bug_present is True and res.detail.startswith("ran on cuda:"), res
    hfpatches.apply(only=[PID])
    try:
        res = run_probe(PID)
        assert res.bug_present is False and res.detail.startswith("ran on cuda:"), res
    finally:
        hfpatches.revert([PID])
