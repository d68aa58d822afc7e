"""Demo: Liger's cross-entropy with ``reduction="none"`` and per-token weights -- every token's
gradient scaled by the first token's weight without hfpatches, torch's gradients with it.

The kernel part runs in a child process (``sys.executable``): with ``TRITON_INTERPRET=1`` on the
CPU, or on the GPU when CUDA is there (as the liger_flce_reduction_none demo). Also the scenario
helpers used by the tests, the GPU tests and the version lab.
"""
from __future__ import annotations

import json
import os

from . import _common

PID = "liger_ce_reduction_none"


# ----------------------------------------------------------------------------- scenario
def inputs(*, bt=8, v=16, seed=0, device="cpu", dtype=None, ignored=(3,)):
    """Logits ``(bt, v)``, targets with ``ignored`` positions at -100, per-token weights in
    [0, 1) with one exact zero."""
    import torch

    g = torch.Generator().manual_seed(seed)
    z = torch.randn(bt, v, generator=g) * 2
    y = torch.randint(0, v, (bt,), generator=g)
    for i in ignored:
        if i < bt:
            y[i] = -100
    tw = torch.rand(bt, generator=g)
    tw[min(1, bt - 1)] = 0.0
    return z.to(device=device, dtype=dtype or torch.float32), y.to(device), tw.to(device)


def torch_reference(z, y, tw, *, label_smoothing=0.0, lse_square_scale=0.0, ce_weight=None,
                    ignore_index=-100, softcap=None):
    """Per-token loss and logits gradient of ``sum(loss * tw)``, plain torch in float64 on the CPU."""
    import torch
    import torch.nn.functional as F

    zr = z.detach().double().cpu().requires_grad_()
    yr = y.cpu()
    with torch.enable_grad():
        logits = zr if softcap is None else softcap * torch.tanh(zr / softcap)
        cw = None if ce_weight is None else ce_weight.double().cpu()
        loss = F.cross_entropy(logits, yr, weight=cw, reduction="none", ignore_index=ignore_index,
                               label_smoothing=label_smoothing)
        if lse_square_scale:
            zl = lse_square_scale * torch.logsumexp(logits, dim=-1) ** 2
            loss = loss + torch.where(yr != ignore_index, zl, torch.zeros_like(zl))
        (loss * tw.double().cpu()).sum().backward()
    return {"loss": loss.detach(), "z": zr.grad}


def liger_run(z, y, tw, *, path="module", reduction="none", label_smoothing=0.0, lse_square_scale=0.0,
              ce_weight=None, ignore_index=-100, softcap=None):
    """Liger's loss through ``path`` ("module": ``LigerCrossEntropyLoss``, "functional":
    ``liger_cross_entropy``, "function": the autograd Function) and the logits gradient of
    ``sum(loss * tw)`` (``reduction="none"``) or of the loss itself."""
    import torch

    zl = z.detach().clone().requires_grad_()
    with torch.enable_grad():
        inp = zl * 1.0    # Liger writes the gradient into its input: keep the leaf intact
        if path == "module":
            from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

            kw = {"weight": ce_weight} if ce_weight is not None else {}
            out = LigerCrossEntropyLoss(ignore_index=ignore_index, lse_square_scale=lse_square_scale,
                                        label_smoothing=label_smoothing, reduction=reduction,
                                        softcap=softcap, **kw)(inp, y)
        elif path == "functional":
            from liger_kernel.transformers.functional import liger_cross_entropy

            out = liger_cross_entropy(inp, y, ce_weight, ignore_index=ignore_index,
                                      lse_square_scale=lse_square_scale, label_smoothing=label_smoothing,
                                      reduction=reduction, softcap=softcap)
        else:
            from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction

            from ..patches.liger_ce_reduction_none.impl import function_args

            given = dict(ignore_index=ignore_index, lse_square_scale=lse_square_scale, label_smoothing=label_smoothing,
                         reduction=reduction, softcap=softcap, weight=ce_weight)
            unset = {"ignore_index": -100, "lse_square_scale": 0.0, "label_smoothing": 0.0, "softcap": None,
                     "weight": None}
            # only what is set: older releases lack some parameters (0.4.x: no z-loss, softcap, weight)
            opts = {k: v for k, v in given.items() if k not in unset or v != unset[k]}
            out = LigerCrossEntropyFunction.apply(*function_args(LigerCrossEntropyFunction, inp, y, **opts))
        loss = out[0] if isinstance(out, tuple) else out
        (loss * tw if reduction == "none" else loss).sum().backward()
    return {"loss": loss.detach(), "z": zl.grad}


def compare(got: dict, ref: dict) -> dict:
    """Max |difference| of the loss and the logits gradient, and the reference gradient's scale."""
    out = {}
    for k in ("loss", "z"):
        out[k] = (float("inf") if got[k] is None or got[k].shape != ref[k].shape
                  else float((got[k].double().cpu() - ref[k]).abs().max()))
    out["scale"] = float(ref["z"].abs().max())
    return out


def scenario(*, device="cpu", dtype=None, path="module", options=None, **shape) -> dict:
    """Liger (``reduction="none"``, per-token weights) against torch: max errors."""
    options = options or {}
    z, y, tw = inputs(device=device, dtype=dtype, **shape)
    return compare(liger_run(z, y, tw, path=path, **options), torch_reference(z, y, tw, **options))


def mean_sum_runs(*, device="cpu", **shape) -> dict:
    """Run "mean" and "sum" now; for an exact comparison with another run (``same``)."""
    z, y, tw = inputs(device=device, **shape)
    return {red: liger_run(z, y, tw, reduction=red) for red in ("mean", "sum")}


def same(a: dict, b: dict) -> bool:
    import torch

    return all(torch.equal(a[r][k], b[r][k]) for r in a for k in a[r])


# ----------------------------------------------------------------------------- the demo
def _child() -> None:
    """The kernel part (TRITON_INTERPRET=1 on a CPU, or CUDA): SAY lines, then RESULT json."""
    import torch

    import hfpatches

    def say(line: str) -> None:
        print(f"SAY {line}", flush=True)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    where = "CUDA" if device == "cuda" else "the CPU (Triton interpreter)"
    say(f"LigerCrossEntropyLoss(reduction='none') on {where}: 8 tokens (one ignore_index), V=16; "
        "loss = sum(per-token loss * w), w in [0, 1) with one w = 0")
    res: dict = {}
    hfpatches.revert([PID])
    before = scenario(device=device)
    say(f"without hfpatches: max |grad_logits - torch| {before['z']:.3g} (largest gradient "
        f"{before['scale']:.3g}); |per-token loss - torch| {before['loss']:.2g}")
    rep = hfpatches.apply(only=[PID])[PID]
    res["outcome"], res["reason"] = rep.outcome.value, rep.reason
    say(f"hfpatches.apply(): {rep.outcome.value} ({rep.reason})")
    after = scenario(device=device)
    say(f"with hfpatches:    max |grad_logits - torch| {after['z']:.3g}; |per-token loss - torch| {after['loss']:.2g}")
    hfpatches.revert([PID])
    res["ok"] = max(after["z"], after["loss"]) <= 1e-4 * max(1.0, after["scale"])
    res["bug_before"] = before["z"] > 1e-2 * before["scale"]
    res["before"], res["after"] = before, after
    print("RESULT " + json.dumps(res), flush=True)


def run(say) -> bool:
    import importlib.util

    import hfpatches

    if importlib.util.find_spec("liger_kernel") is None:
        r = hfpatches.apply(only=[PID])[PID]
        say(f"{r.outcome.value}: {r.reason}")
        return True
    say("the kernel part runs in a child process (Triton interpreter on a CPU) ...")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    import torch

    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    res = _common.run_child(say, "hfpatches.demos.liger_ce_reduction_none", env, timeout=600)
    if res is None:
        return False
    if res["outcome"] == "APPLIED":
        return bool(res["ok"]) and bool(res["bug_before"])
    return bool(res["ok"]) and not res["bug_before"]   # NOT_AFFECTED (fixed upstream): still right
