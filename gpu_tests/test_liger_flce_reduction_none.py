"""liger_flce_reduction_none on CUDA: Liger's real Triton kernels (no interpreter), fp32 and bf16.

* per-token weighted ``reduction="none"`` loss: without the patch the gradients are wrong
  (liger-kernel 0.5.3-0.8.1), with it they equal torch's (fp64 reference from the same inputs),
  including softcap and class weights, which Triton's CPU interpreter cannot run;
* the probe runs on the GPU once CUDA is initialised, and says it could not run (without
  initialising CUDA) in a fresh process where it is not;
* memory: the patched ``none`` path never holds the full B*T x V logits;
* model level: tiny Llama with every default Liger kernel, one weighted SGD step equals
  transformers' (fp32).

Tolerances: fp32 -- Liger's logits come from cuBLAS (no TF32 unless the user enables it), sums of
<= 1024 products: 1e-4 x scale. bf16 -- inputs, logits and gradients are bf16 (8-bit mantissa,
~4e-3 relative per rounding, several roundings): 3e-2 x scale; the bug is O(1) x scale.
"""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
pytest.importorskip("liger_kernel")

from hfpatches._engine import run_check, run_probe  # noqa: E402,F401
import hfpatches  # noqa: E402
from hfpatches import Outcome  # noqa: E402
from hfpatches.demos import liger_flce_reduction_none as D  # noqa: E402
from hfpatches.patches.liger_flce_reduction_none import impl as P  # noqa: E402

PID = P.PATCH_ID
TOL = {"fp32": 1e-4, "bf16": 3e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = {
    "plain": {},
    "no_bias": {"shape": {"bias": False}},
    "label_smoothing": {"options": {"label_smoothing": 0.1}},
    "softcap": {"options": {"softcap": 5.0}},
    "z_loss": {"options": {"lse_square_scale": 1e-2}},
    "ce_weight": {"options": {"ce_weight": "linspace"}},
    "chunked": {"shape": {"bt": 512, "h": 64, "v": 1024, "ignored": (0, 7, 300)}},   # 16 chunks
}


def _in_range() -> bool:
    import liger_kernel.transformers  # noqa: F401  (else the patch is DEFERRED)

    r = hfpatches.apply(only=[PID])[PID]
    hfpatches.revert([PID])
    return r.outcome != Outcome.NOT_AFFECTED


def _run(case, dtype, path="module"):
    spec = CASES[case]
    opts = dict(spec.get("options", {}))
    shape = dict(spec.get("shape", {}))
    if opts.get("ce_weight") == "linspace":
        opts["ce_weight"] = torch.linspace(0.5, 1.5, shape.get("v", 16), device="cuda")
    return D.scenario(device="cuda", dtype=DTYPES[dtype], path=path, options=opts, **shape)


def _exact(r, dtype):
    tol = TOL[dtype] * max(1.0, r["scale"])
    return all(r[k] <= tol for k in ("loss", "x", "w", "b") if k in r)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_weighted_none_gradients(case, dtype):
    torch.zeros(1, device="cuda")   # CUDA initialised: the probe runs on the GPU
    affected = _in_range()
    hfpatches.revert([PID])
    before = _run(case, dtype)
    if affected:
        assert max(before["x"], before["w"]) > 0.1 * before["scale"], before
    else:
        assert _exact(before, dtype), before
    rep = hfpatches.apply(only=[PID])[PID]
    if affected:
        assert rep.outcome == Outcome.APPLIED and rep.reason == "probe found the bug; fix applied and verified", rep
    else:
        assert rep.outcome == Outcome.NOT_AFFECTED, rep
    for path in ("module", "functional") + (("function",) if case != "ce_weight" else ()):
        after = _run(case, dtype, path)
        assert _exact(after, dtype), (path, after)


def test_probe_runs_on_the_gpu_once_cuda_is_initialised():
    torch.zeros(1, device="cuda")
    if not _in_range():
        pytest.skip("liger-kernel outside the affected range: the probe is not consulted")
    res = run_probe(PID)
    assert res.bug_present is True and res.detail.startswith("ran on cuda:"), res
    hfpatches.apply(only=[PID])
    res = run_probe(PID)
    assert res.bug_present is False and res.detail.startswith("ran on cuda:"), res


FRESH = r'''
import json, torch
import hfpatches
import liger_kernel.transformers  # noqa: F401
from hfpatches.patches.liger_flce_reduction_none import impl as P
from hfpatches._engine import run_probe
res = run_probe(P.PATCH_ID)
rep = hfpatches.apply(only=[P.PATCH_ID])[P.PATCH_ID]
print("RESULT " + json.dumps({"probe": [res.bug_present, res.detail], "outcome": rep.outcome.value,
                              "reason": rep.reason, "cuda_initialised": torch.cuda.is_initialized()}))
'''


def test_probe_never_initialises_cuda():
    """A fresh process where nothing touched CUDA yet (``import hfpatches; apply()`` first in a
    training script): the probe says it could not run, the patch applies on the version range,
    and CUDA is still uninitialised afterwards (no context on the default GPU of every rank)."""
    from conftest import run_py  # tests/conftest.py (gpu_tests/conftest.py puts tests/ on sys.path)

    proc = run_py(FRESH, env={"TRITON_INTERPRET": None})
    out = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    assert out["cuda_initialised"] is False, out
    if out["outcome"] == "NOT_AFFECTED":
        return
    assert out["probe"][0] is None and "CUDA is not initialised" in out["probe"][1], out
    assert out["outcome"] == "APPLIED" and out["reason"].startswith("probe could not run (CUDA is not"), out


def _peak(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_none_path_stays_chunked():
    """B*T=4096, H=1024, V=32000, bf16: the full logits are 250 MiB (bf16; their fp32 softmax
    twice that in torch). The patched none path's extra peak stays below half of them, close to
    Liger's mean path."""
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    bt, h, v = 4096, 1024, 32000
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(bt, h, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    w = (torch.randn(v, h, device="cuda", dtype=torch.bfloat16, generator=g) / 32).requires_grad_()
    y = torch.randint(0, v, (bt,), device="cuda", generator=g)
    tw = torch.rand(bt, device="cuda", generator=g)
    hfpatches.apply(only=[PID])

    def none():
        (LigerFusedLinearCrossEntropyLoss(reduction="none")(w, x, y) * tw).sum().backward()
        x.grad = w.grad = None

    def mean():
        LigerFusedLinearCrossEntropyLoss()(w, x, y).backward()
        x.grad = w.grad = None

    logits = bt * v * 2
    grads = (bt * h + v * h) * 2
    p_none, p_mean = _peak(none), _peak(mean)
    assert p_none - grads < logits / 2, (p_none, p_mean, logits)
    assert p_none <= p_mean + logits / 4, (p_none, p_mean)


@pytest.mark.parametrize("flce_only", [True, False], ids=["flce_only", "all_kernels"])
def test_model_level_weighted_step(flce_only):
    ref = D.weighted_llama_step(liger=False, device="cuda")
    hfpatches.apply(only=[PID])
    got = D.weighted_llama_step(liger=True, device="cuda", flce_only=flce_only)
    scale = max(float(g.abs().max()) for g in ref["grads"].values())
    # all_kernels: Liger's RMSNorm/RoPE/SwiGLU round differently from transformers' (fp32)
    tol = (1e-4 if flce_only else 1e-3) * max(1.0, scale)
    assert D.max_diff(got["grads"], ref["grads"]) <= tol
    assert float((got["loss"] - ref["loss"]).abs().max()) <= tol
