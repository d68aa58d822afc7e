"""Implementation of ``liger_flce_reduction_none`` (declared in ``__init__.py``; rationale in docs/patches/)."""
from __future__ import annotations

import sys
from typing import Any

from hfpatches._declare import ProbeResult

from . import PATCH

__all__ = ["chunk_size", "kernel_device"]

PATCH_ID = PATCH.id
OPS = PATCH.waits_for[0]
MODULE = PATCH.targets[0].module
CE_MODULE = "liger_kernel.ops.cross_entropy"
CLASS = "LigerFusedLinearCrossEntropyFunction"
MARK = "__hfpatches_patch__"          # set on our replacement functions (how the probe says "fix live")
SAVED = "_hfpatches_flce_none"        # ctx attribute: the options the deferred backward needs
FORWARD_PARAMS = ("ctx", "_input", "weight", "target", "bias", "ce_weight", "ignore_index",
                  "lse_square_scale", "label_smoothing", "reduction", "softcap", "return_z_loss")
CE_PARAMS = ("_input", "target", "weight", "ignore_index", "lse_square_scale", "label_smoothing",
             "reduction", "softcap", "return_z_loss")
# the options the backward replays (absent ones: the version does not have them)
KEPT = ("ce_weight", "ignore_index", "lse_square_scale", "label_smoothing", "softcap",
        "accum_dtype", "use_token_scaling")


# ----------------------------------------------------------------------------- the fix
def chunk_size(bt: int, h: int, v: int) -> int:
    """Liger's chunk of tokens (0.5.3-0.8.1): next power of two of ceil(BT / ceil(V / H)), so one
    chunk of logits holds about BT x H elements."""
    inc = max(1, -(-v // max(h, 1)))
    n = max(1, -(-bt // inc))
    return 1 << (n - 1).bit_length()


def _make_forward(original, names: tuple, defaults: dict):
    """Replacement of ``forward``: ``original`` (the decorated staticmethod's function) for every
    reduction but "none"."""
    at = names.index("reduction")            # position counting ctx
    default_reduction = defaults.get("reduction", "mean")

    def forward(ctx, *args, **kwargs):
        reduction = args[at - 1] if len(args) >= at else kwargs.get("reduction", default_reduction)
        if reduction != "none":
            return original(ctx, *args, **kwargs)
        values = {**defaults, **dict(zip(names[1:], args)), **kwargs}
        x, w, b = values["_input"], values["weight"], values.get("bias")
        if not (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
            return original(ctx, *args, **kwargs)     # no backward will run: outputs are exact
        # Upstream's forward for the outputs (loss, z_loss, accuracy, ...). The weight goes in
        # detached: no V x H grad_weight is allocated or summed (it could not be used). The input
        # cannot: 0.6.3-0.8.1 gate all of their forward on its requires_grad (and crash without
        # it when a bias is given), so grad_input is computed and dropped. Then keep what
        # backward needs instead of the pre-summed gradients.
        out = original(ctx, **{**values, "weight": w.detach()})
        ctx.save_for_backward(x.detach(), w.detach(), values["target"], None if b is None else b.detach())
        setattr(ctx, SAVED, {k: values[k] for k in KEPT if k in values})
        return out

    setattr(forward, MARK, PATCH_ID)
    forward.__wrapped__ = original  # type: ignore[attr-defined]
    forward.__doc__ = f"hfpatches {PATCH_ID}: {CLASS}.forward; reduction='none' defers the gradients to backward."
    return forward


def _backward_none(ce_forward):
    """The reduction="none" backward: Liger's chunked recomputation with the per-token upstream
    gradient folded into each logits-gradient row before the projections sum over tokens."""
    import torch

    def backward_none(ctx, grad_output, *unused):
        x, w, target, b = ctx.saved_tensors
        opt = getattr(ctx, SAVED)
        needs = ctx.needs_input_grad
        bt, h = x.shape
        v = w.shape[0]
        acc = opt.get("accum_dtype")
        softcap = opt.get("softcap")
        ignore_index = opt.get("ignore_index", -100)
        scaling = opt.get("use_token_scaling", False)
        gx = torch.zeros_like(x) if needs[0] else None
        gw = torch.zeros_like(w, dtype=acc or w.dtype) if needs[1] else None
        gb = torch.zeros_like(b, dtype=acc or b.dtype) if b is not None and needs[3] else None
        step = chunk_size(bt, h, v)
        for s in range(0, bt, step):
            e = min(s + step, bt)
            xc = x[s:e]
            logits = xc @ w.t()
            if b is not None:
                logits = logits + b
            logits = logits.contiguous().requires_grad_(True)   # 0.6.3+: HAS_GRADIENTS=requires_grad
            yc = target[s:e].contiguous()
            if scaling:   # as upstream: loss_i * p_i(target) (detached), so grad rows * p_i
                with torch.no_grad():
                    lf = logits.detach()
                    if softcap is not None:
                        lf = softcap * torch.tanh(lf / softcap)
                    probs = torch.softmax(lf, dim=-1)
                    valid = yc != ignore_index
                    p = probs.gather(-1, torch.where(valid, yc, 0).unsqueeze(-1)).squeeze(-1)
                    factor = torch.where(valid, p, torch.zeros_like(p))
                    del lf, probs
            out = ce_forward(logits, yc, opt.get("ce_weight"), ignore_index, opt.get("lse_square_scale", 0.0),
                             opt.get("label_smoothing", 0.0), "none", softcap, False)
            gl = out[-1].detach()      # the logits gradient, written in place by Liger's kernel
            del out, logits
            with torch.no_grad():
                if scaling:
                    gl.mul_(factor.unsqueeze(-1))
                gl.mul_(grad_output[s:e].unsqueeze(-1))
                if gx is not None:
                    gx[s:e] = gl @ w
                if gw is not None:
                    glt = gl.t().to(xc.dtype)
                    if gw.dtype == xc.dtype and not torch.is_autocast_enabled():
                        torch.addmm(gw, glt, xc, out=gw)
                    else:
                        gw += torch.mm(glt, xc).to(gw.dtype)
                if gb is not None:
                    gb += gl.sum(dim=0).to(gb.dtype)
            del gl, xc
        if gw is not None and gw.dtype != w.dtype:
            gw = gw.to(w.dtype)
        if gb is not None and gb.dtype != b.dtype:
            gb = gb.to(b.dtype)
        return (gx, gw, None, gb) + (None,) * (len(needs) - 4)

    return backward_none


def _make_backward(original, none_path):
    def backward(ctx, grad_output, *more):
        if SAVED not in vars(ctx):
            return original(ctx, grad_output, *more)
        return none_path(ctx, grad_output, *more)

    setattr(backward, MARK, PATCH_ID)
    backward.__wrapped__ = original
    backward.__doc__ = f"hfpatches {PATCH_ID}: {CLASS}.backward; exact per-token gradients for reduction='none'."
    return backward


def apply(ctx: Any) -> None:
    import inspect

    mod = ctx.module(MODULE)
    ce = ctx.module(CE_MODULE)
    cls = getattr(mod, CLASS)
    fwd = vars(cls)["forward"].__func__
    bwd = vars(cls)["backward"].__func__
    params = inspect.signature(fwd).parameters
    names = tuple(params)
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    # the version's own autocast decorator, so backward runs under forward's autocast state
    none_path = mod.amp_custom_bwd(_backward_none(ce.cross_entropy_forward))
    ctx.replace(cls, "forward", staticmethod(_make_forward(fwd, names, defaults)))
    ctx.replace(cls, "backward", staticmethod(_make_backward(bwd, none_path)))


def check(ctx: Any) -> str | None:
    import inspect

    mod = sys.modules[MODULE]
    ce = sys.modules.get(CE_MODULE)
    cef = getattr(ce, "cross_entropy_forward", None)
    try:
        names = tuple(inspect.signature(cef).parameters)  # type: ignore[arg-type]  # None: TypeError
    except (TypeError, ValueError):
        return f"{CE_MODULE}.cross_entropy_forward not found"
    if names[:len(CE_PARAMS)] != CE_PARAMS:
        return f"{CE_MODULE}.cross_entropy_forward is ({', '.join(names)}), expected it to start with " \
               f"({', '.join(CE_PARAMS)})"
    if not callable(getattr(mod, "amp_custom_bwd", None)):
        return f"{MODULE} has no amp_custom_bwd (the decorator its backward runs under)"
    exported = getattr(sys.modules.get(OPS), CLASS, None)
    if exported is not None and exported is not getattr(mod, CLASS):
        return f"{OPS}.{CLASS} is {exported.__module__}.{exported.__qualname__} (another backend), not the class patched"
    return None


# ----------------------------------------------------------------------------- probe
def kernel_device(torch):
    """``(device, how)`` where Liger's Triton kernel can run in this process now, or
    ``(None, why not)``. Never initialises CUDA."""
    ce = sys.modules.get(CE_MODULE)
    kernel = getattr(ce, "liger_cross_entropy_kernel", None)
    if type(kernel).__module__.startswith("triton.runtime.interpreter"):
        return torch.device("cpu"), "Triton interpreter"
    if not torch.cuda.is_available():
        return None, ("Liger's Triton kernel cannot run in this process: no CUDA device, and Triton's "
                      "interpreter is off (TRITON_INTERPRET=1 must be set before triton is imported)")
    if not torch.cuda.is_initialized():
        return None, ("CUDA is not initialised in this process yet and the probe does not initialise it "
                      "(it would create a context on the default GPU in every rank)")
    return torch.device("cuda", torch.cuda.current_device()), f"cuda:{torch.cuda.current_device()}"


def probe(ctx: Any) -> ProbeResult:
    import torch

    mod = sys.modules[MODULE]
    device, how = kernel_device(torch)
    if device is None:
        return ProbeResult(None, how)
    # 4 tokens (one ignored), H=4, V=8; fixed values (no RNG: the user's random stream is untouched)
    f64 = torch.float64
    x = ((torch.arange(16, dtype=f64).reshape(4, 4) * 3 % 7) - 3) / 4
    w = ((torch.arange(32, dtype=f64).reshape(8, 4) * 5 % 11) - 5) / 8
    y = torch.tensor([1, 5, -100, 2])
    g = torch.tensor([1.0, 0.0, 1.0, 0.5], dtype=f64)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.enable_grad():
        ref = torch.nn.functional.cross_entropy(xr @ wr.t(), y, reduction="none")
        ref.backward(g)
        xd = x.to(device, torch.float32).requires_grad_()
        wd = w.to(device, torch.float32).requires_grad_()
        with torch.autocast(device.type, enabled=False):
            out = getattr(mod, CLASS).apply(xd, wd, y.to(device), None, None, -100, 0.0, 0.0, "none")
        loss = out[0] if isinstance(out, tuple) else out
        if loss.dim() != 1:
            return ProbeResult(False, f"reduction='none' returns a {loss.dim()}-D loss here (no per-token loss)")
        loss.backward(g.to(device, torch.float32))
    gxr, gwr, gxd, gwd = (t.grad for t in (xr, wr, xd, wd))
    assert gxr is not None and gwr is not None and gxd is not None and gwd is not None
    scale = max(gxr.abs().max().item(), gwr.abs().max().item())
    dx = (gxd.double().cpu() - gxr).abs().max().item()
    dw = (gwd.double().cpu() - gwr).abs().max().item()
    bad = max(dx, dw) > 1e-2 * scale   # fp32 (TF32 at worst) vs fp64: ~1e-3 rel; the bug: ~1 rel
    return ProbeResult(bad, f"ran on {how}: max |d grad_input| {dx:.2g}, |d grad_weight| {dw:.2g} "
                            f"vs torch (scale {scale:.2g})")
