"""Implementation of ``liger_ce_reduction_none`` (declared in ``__init__.py``; rationale in
docs/patches/liger_ce_reduction_none.md)."""
from __future__ import annotations

from typing import Any

from hfpatches._declare import ProbeResult

from . import PATCH

PATCH_ID = PATCH.id
MODULE = "liger_kernel.ops.cross_entropy"
CLASS = "LigerCrossEntropyFunction"
MARK = "__hfpatches_patch__"        # set on our replacement (how tests tell the fix is live)
DONE = "_hfpatches_ce_none_done"     # ctx attribute: this graph's logits gradient is already scaled


def _make_backward(original: Any) -> Any:
    """Replacement of ``backward``: the original for a scalar ``grad_output`` ("mean"/"sum")."""

    def backward(ctx: Any, grad_output: Any, *more: Any) -> Any:
        if grad_output is None or grad_output.dim() == 0:
            return original(ctx, grad_output, *more)
        # reduction="none": grad_output is one value per token (BT,). Forward left the logits
        # gradient of each token in the saved tensor (Liger's in-place trick); scale row i by
        # grad_output[i] in place, as upstream's element_mul_kernel does with grad_output[0].
        (grad,) = ctx.saved_tensors
        if getattr(ctx, DONE, False):
            raise RuntimeError(
                "hfpatches liger_ce_reduction_none: backward ran twice through the same "
                "LigerCrossEntropyFunction(reduction='none') graph (retain_graph=True); Liger keeps "
                "one in-place logits gradient, already scaled by the first backward's grad_output. "
                "Recompute the loss for each backward.")
        if grad_output.shape != grad.shape[:1]:
            raise RuntimeError(f"hfpatches liger_ce_reduction_none: grad_output has shape "
                               f"{tuple(grad_output.shape)}, expected ({grad.shape[0]},) for reduction='none'")
        # .data: a Triton write (what upstream does) does not bump the tensor's version counter;
        # an in-place torch op on the tensor itself would (and break autograd's checks upstream
        # of the logits, e.g. a softcap tanh that saved its output).
        grad.data.mul_(grad_output.unsqueeze(-1))
        setattr(ctx, DONE, True)
        return (grad,) + (None,) * (len(ctx.needs_input_grad) - 1)

    setattr(backward, MARK, PATCH_ID)
    backward.__wrapped__ = original  # type: ignore[attr-defined]
    backward.__doc__ = f"hfpatches {PATCH_ID}: {CLASS}.backward; per-token grad_output for reduction='none'."
    return backward


def apply(ctx: Any) -> None:
    cls = getattr(ctx.module(MODULE), CLASS)
    ctx.replace(cls, "backward", staticmethod(_make_backward(vars(cls)["backward"].__func__)))


# ----------------------------------------------------------------------------- probe
def function_args(cls: Any, logits: Any, target: Any, **options: Any) -> tuple:
    """Positional arguments of ``cls.apply`` for this release (0.5.0-0.5.2 have no class
    ``weight`` parameter): ``options`` by name, the release's defaults for the rest."""
    import inspect

    params = list(inspect.signature(vars(cls)["forward"].__func__).parameters.values())[1:]
    given = {"_input": logits, "target": target, "weight": None, **options}
    unknown = set(options) - {p.name for p in params}
    if unknown:
        raise TypeError(f"{CLASS}.forward has no parameter {sorted(unknown)}")
    return tuple(given[p.name] if p.name in given else p.default for p in params)


def probe(ctx: Any) -> ProbeResult:
    import torch

    from hfpatches.patches.liger_flce_reduction_none.impl import kernel_device

    cls = getattr(ctx.module(MODULE), CLASS)
    device, how = kernel_device(torch)
    if device is None:
        return ProbeResult(None, how)
    # 4 tokens (one ignored), V=8; fixed values (no RNG: the user's random stream is untouched)
    f64 = torch.float64
    z = ((torch.arange(32, dtype=f64).reshape(4, 8) * 5 % 11) - 5) / 4
    y = torch.tensor([1, 5, -100, 2])
    g = torch.tensor([1.0, 0.0, 1.0, 0.5], dtype=f64)
    zr = z.clone().requires_grad_()
    with torch.enable_grad():
        ref = torch.nn.functional.cross_entropy(zr, y, reduction="none")
        ref.backward(g)
        zd = z.to(device, torch.float32).requires_grad_()
        with torch.autocast(device.type, enabled=False):
            out = cls.apply(*function_args(cls, zd * 1.0, y.to(device), reduction="none"))
        loss = out[0] if isinstance(out, tuple) else out
        if loss.dim() != 1:
            return ProbeResult(False, f"reduction='none' returns a {loss.dim()}-D loss here (no per-token loss)")
        loss.backward(g.to(device, torch.float32))
    assert zr.grad is not None and zd.grad is not None
    scale = zr.grad.abs().max().item()
    d = (zd.grad.double().cpu() - zr.grad).abs().max().item()
    bad = d > 1e-3 * scale   # fp32 vs fp64: ~1e-7 rel; the bug: ~1 rel
    return ProbeResult(bad, f"ran on {how}: max |d grad_logits| {d:.2g} vs torch (scale {scale:.2g})")
