"""Demo: Liger's fused linear cross-entropy with ``reduction="none"`` and per-token weights --
wrong gradients without hfpatches, torch's gradients with it.

Where the Triton kernel runs: as in the liger_flash_kwargs demo, the kernel part runs in a child
process (``sys.executable``): with ``TRITON_INTERPRET=1`` on the CPU, or on the GPU when CUDA is
there. The demo process itself never sets the variable (it only acts before triton is imported,
and then for the whole process).

Also the shared scenario helpers (the per-token weighted loss against torch, the mean/sum
identity check, the tiny-Llama training step) used by the tests, GPU tests and the benchmark.
"""
from __future__ import annotations

import json
import os

from . import _common

PID = "liger_flce_reduction_none"


# ----------------------------------------------------------------------------- scenario
def inputs(*, bt=8, h=8, v=16, bias=True, seed=0, device="cpu", dtype=None, ignored=(3,)):
    """Hidden states ``x`` (bt, h), ``weight`` (v, h), ``bias`` (v) or None, targets with
    ``ignored`` positions set to -100, and per-token weights in [0, 1) with one exact zero."""
    import torch

    dtype = dtype or torch.float32
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bt, h, generator=g)
    w = torch.randn(v, h, generator=g) / h ** 0.5 * 2
    b = torch.randn(v, generator=g) if bias else None
    y = torch.randint(0, v, (bt,), generator=g)
    for i in ignored:
        if i < bt:
            y[i] = -100
    tw = torch.rand(bt, generator=g)
    tw[min(1, bt - 1)] = 0.0
    to = dict(device=device, dtype=dtype)
    return (x.to(**to), w.to(**to), None if b is None else b.to(**to), y.to(device), tw.to(device))


def torch_reference(x, w, b, y, tw, *, label_smoothing=0.0, softcap=None, lse_square_scale=0.0,
                    ce_weight=None, ignore_index=-100, use_token_scaling=False, accum_dtype=None):
    """Per-token loss and gradients of ``sum(loss * tw)`` by plain torch in float64 on the CPU
    (unfused: the full logits). ``use_token_scaling``: Liger's option (0.6.3+), each token's loss
    times its predicted probability of the target (detached)."""
    import torch
    import torch.nn.functional as F

    xr = x.detach().double().cpu().requires_grad_()
    wr = w.detach().double().cpu().requires_grad_()
    br = None if b is None else b.detach().double().cpu().requires_grad_()
    yr = y.cpu()
    with torch.enable_grad():
        logits = xr @ wr.t()
        if br is not None:
            logits = logits + br
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        cw = None if ce_weight is None else ce_weight.double().cpu()
        loss = F.cross_entropy(logits, yr, weight=cw, reduction="none", ignore_index=ignore_index,
                               label_smoothing=label_smoothing)
        if lse_square_scale:
            z = lse_square_scale * torch.logsumexp(logits, dim=-1) ** 2
            loss = loss + torch.where(yr != ignore_index, z, torch.zeros_like(z))
        if use_token_scaling:
            p = torch.softmax(logits.detach(), dim=-1).gather(-1, yr.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            loss = loss * torch.where(yr != ignore_index, p, torch.zeros_like(p))
        (loss * tw.double().cpu()).sum().backward()
    return {"loss": loss.detach(), "x": xr.grad, "w": wr.grad, "b": None if br is None else br.grad}


def liger_run(x, w, b, y, tw, *, path="module", reduction="none", label_smoothing=0.0,
              softcap=None, lse_square_scale=0.0, ce_weight=None, ignore_index=-100, **newer):
    """Liger's loss through ``path`` ("module": ``LigerFusedLinearCrossEntropyLoss``,
    "functional": ``liger_fused_linear_cross_entropy``, "function": the autograd Function) and the
    gradients of ``sum(loss * tw)`` (``reduction="none"``) or of the loss itself. ``newer``: options
    of later versions (``use_token_scaling``, ``accum_dtype``), module and functional paths only."""
    import torch

    xl = x.detach().clone().requires_grad_()
    wl = w.detach().clone().requires_grad_()
    bl = None if b is None else b.detach().clone().requires_grad_()
    kw = dict(ignore_index=ignore_index, lse_square_scale=lse_square_scale,
              label_smoothing=label_smoothing, reduction=reduction, softcap=softcap, **newer)
    with torch.enable_grad():
        if path == "module":
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

            out = LigerFusedLinearCrossEntropyLoss(ce_weight=ce_weight, **kw)(wl, xl, y, bl)
        elif path == "functional":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            out = liger_fused_linear_cross_entropy(xl, wl, y, bl, ce_weight, **kw)
        else:
            from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

            out = LigerFusedLinearCrossEntropyFunction.apply(
                xl, wl, y, bl, ce_weight, ignore_index, lse_square_scale, label_smoothing, reduction, softcap)
        loss = out[0] if isinstance(out, tuple) else getattr(out, "loss", out)
        (loss * tw if reduction == "none" else loss).sum().backward()
    return {"loss": loss.detach(), "x": xl.grad, "w": wl.grad, "b": None if bl is None else bl.grad}


def compare(got: dict, ref: dict) -> dict:
    """Max |difference| per quantity (loss, x, w, b) and the reference's scale."""
    out = {}
    for k in ("loss", "x", "w", "b"):
        if ref[k] is None:
            continue
        if got[k] is None or got[k].shape != ref[k].shape:
            out[k] = float("inf")
            continue
        out[k] = float((got[k].double().cpu() - ref[k]).abs().max())
    out["scale"] = max(float(ref[k].abs().max()) for k in ("x", "w") if ref[k] is not None)
    return out


def scenario(*, device="cpu", dtype=None, path="module", options=None, **shape) -> dict:
    """Liger (``reduction="none"``, per-token weights) against torch: max errors per quantity."""
    options = options or {}
    x, w, b, y, tw = inputs(device=device, dtype=dtype, **shape)
    ref = torch_reference(x, w, b, y, tw, **options)
    return compare(liger_run(x, w, b, y, tw, path=path, **options), ref)


def mean_sum_identical(*, device="cpu", **shape) -> dict:
    """Run "mean" and "sum" now; return the results for an exact comparison with another run."""
    x, w, b, y, tw = inputs(device=device, **shape)
    return {red: liger_run(x, w, b, y, tw, reduction=red) for red in ("mean", "sum")}


def same(a: dict, b: dict) -> bool:
    import torch

    return all((a[k] is None and b[k] is None) or torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- model level
def weighted_llama_step(*, liger: bool, device="cpu", dtype=None, lr=0.1, seed=0, flce_only=True) -> dict:
    """One SGD step of a tiny Llama on a per-token weighted next-token loss.

    ``liger``: ``apply_liger_kernel_to_llama()`` (``flce_only``: fused linear cross-entropy only --
    Triton's CPU interpreter cannot run Liger's RMSNorm/RoPE/SwiGLU kernels; on a GPU pass False),
    and the loss is
    ``LigerFusedLinearCrossEntropyLoss(reduction="none")`` on the decoder's hidden states and
    ``lm_head.weight`` -- Liger's model path (``LigerForCausalLMLoss``) always reduces with
    "mean" or "sum", so per-token weights go through the module. Otherwise: plain transformers'
    logits and ``F.cross_entropy(reduction="none")``. Returns the per-token loss, the gradients
    and the parameters after the step."""
    import torch
    import torch.nn.functional as F

    from .liger_flash_kwargs import liger_forward, tiny_model

    vocab = 64
    model = tiny_model("llama", vocab, seed=seed, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, vocab, (2, 6), generator=g).to(device)
    labels = ids.clone()
    labels[0, :2] = -100                         # a prompt that is not trained on
    tw = torch.rand(2, 5, generator=g).to(device)  # per-token weights (e.g. advantages)
    target = labels[:, 1:].reshape(-1)
    weights = tw.reshape(-1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt.zero_grad(set_to_none=True)

    def run():
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, model.config.hidden_size)
        if liger:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

            per_token = LigerFusedLinearCrossEntropyLoss(reduction="none")(model.lm_head.weight, hidden, target)
            per_token = per_token[0] if isinstance(per_token, tuple) else per_token
        else:
            per_token = F.cross_entropy(model.lm_head(hidden).float(), target, reduction="none")
        ((per_token * weights).sum() / weights.sum()).backward()
        return per_token.detach()

    if liger:
        with liger_forward("llama", flce_only=flce_only, model=None if flce_only else model):
            per_token = run()
    else:
        per_token = run()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"loss": per_token, "grads": grads, "params": params}


def max_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# ----------------------------------------------------------------------------- the demo
def _child() -> None:
    """The kernel part (TRITON_INTERPRET=1 on a CPU, or CUDA): SAY lines, then RESULT json."""
    import torch

    import hfpatches

    def say(line: str) -> None:
        print(f"SAY {line}", flush=True)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    where = "CUDA" if device == "cuda" else "the CPU (Triton interpreter)"
    say(f"Liger's real kernel on {where}; B*T=8 tokens (one ignore_index), H=8, V=16, bias; "
        "loss = sum(per-token loss * w) with w in [0, 1), one w = 0")
    res: dict = {}
    hfpatches.revert([PID])
    before = scenario(device=device)
    res["before"] = before
    say(f"without hfpatches: max |grad_input - torch| {before['x']:.3g}, |grad_weight - torch| "
        f"{before['w']:.3g}, |grad_bias - torch| {before['b']:.3g}; |per-token loss - torch| {before['loss']:.2g}")
    rep = hfpatches.apply(only=[PID])[PID]
    res["outcome"], res["reason"] = rep.outcome.value, rep.reason
    say(f"hfpatches.apply(): {rep.outcome.value} ({rep.reason})")
    after = scenario(device=device)
    res["after"] = after
    say(f"with hfpatches:    max |grad_input - torch| {after['x']:.3g}, |grad_weight - torch| "
        f"{after['w']:.3g}, |grad_bias - torch| {after['b']:.3g}; |per-token loss - torch| {after['loss']:.2g}")
    hfpatches.revert([PID])
    tol = 1e-4 * max(1.0, after["scale"])
    res["ok"] = all(after[k] <= tol for k in ("loss", "x", "w", "b"))
    res["bug_before"] = max(before["x"], before["w"]) > 1e-2 * before["scale"]
    print("RESULT " + json.dumps(res), flush=True)


def run_child(say, *, timeout: int = 600) -> dict | None:
    import importlib.util

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:
        env["TRITON_INTERPRET"] = "1"
    return _common.run_child(say, "hfpatches.demos.liger_flce_reduction_none", env, timeout=timeout)


def run(say) -> bool:
    import importlib.util

    import hfpatches

    if importlib.util.find_spec("liger_kernel") is None:
        r = hfpatches.apply(only=[PID])[PID]
        say(f"{r.outcome.value}: {r.reason}")
        return True
    say("the kernel part runs in a child process (Triton interpreter on a CPU; ~15 s) ...")
    res = run_child(say)
    if res is None:
        return False
    if res["outcome"] == "APPLIED":
        return bool(res["ok"]) and bool(res["bug_before"])
    # NOT_AFFECTED (fixed upstream): the scenario must still be right
    return bool(res["ok"]) and not res["bug_before"]
