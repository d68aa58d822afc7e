"""``liger_flce_reduction_none``: Liger's fused linear cross-entropy, exact gradients with ``reduction="none"``.

Bug
    ``LigerFusedLinearCrossEntropyFunction`` (behind ``LigerFusedLinearCrossEntropyLoss`` and
    ``liger_fused_linear_cross_entropy``) computes the gradients in forward and sums them over
    tokens; backward scales them by ``grad_output[0]``. With ``reduction="none"`` the per-token
    loss is right but any per-token upstream gradient (token weights, masks, RL advantages) gives
    wrong ``grad_input``, ``grad_weight`` and ``grad_bias``, silently.
Affected
    liger-kernel 0.5.3-0.5.8 and 0.6.3-0.8.1 (0.4.x-0.5.2 return the summed loss for "none",
    0.5.9-0.6.2 reject it; fixed in 0.8.2). Table: docs/patches/liger_flce_reduction_none.md.
Upstream
    linkedin/Liger-Kernel#968 (report), linkedin/Liger-Kernel#1298 (fix, released in 0.8.2).
Probe
    Runs the installed Function on 4 tokens with per-token weights and compares grad_input /
    grad_weight with torch -- only where Liger's kernel can run: under Triton's interpreter
    (``TRITON_INTERPRET=1`` set before triton was imported) or on a CUDA device this process has
    already initialised (the probe never initialises one). Elsewhere it says it could not run and
    the version range decides.
What changes
    ``forward``/``backward`` of the Function, for ``reduction="none"`` only: forward returns
    upstream's outputs but keeps (input, weight, target, bias) instead of unusable pre-summed
    gradients; backward recomputes the logits chunk by chunk (Liger's chunk size, Liger's own
    ``cross_entropy_forward`` kernel for the logits gradient), folds the per-token grad_output in
    before the sums over tokens, and never materialises the full logits. "mean"/"sum" calls go
    straight to the original (one comparison).
"""
from hfpatches._declare import Patch, Target

_MODULE = "liger_kernel.ops.fused_linear_cross_entropy"

PATCH = Patch(
    id="liger_flce_reduction_none",
    summary="Liger's fused linear cross-entropy with reduction='none': exact per-token gradients "
            "(token weights / masks after the loss), still chunked",
    upstream=("linkedin/Liger-Kernel#968", "linkedin/Liger-Kernel#1298"),
    # 0.5.9-0.6.2 dropped reduction="none" (module rejects it, Function returns the sum)
    requires=("liger-kernel>=0.5.3,<0.8.2,!=0.5.9,!=0.5.10,!=0.6.0,!=0.6.1,!=0.6.2",),
    fixed_in="liger-kernel>=0.8.2",
    targets=(Target(_MODULE, "LigerFusedLinearCrossEntropyFunction.forward", params=(
                        "ctx", "_input", "weight", "target", "bias", "ce_weight", "ignore_index",
                        "lse_square_scale", "label_smoothing", "reduction", "softcap", "return_z_loss")),
             Target(_MODULE, "LigerFusedLinearCrossEntropyFunction.backward", params=("ctx", "grad_output"))),
    # Also wait for the package: liger-kernel 0.7+ imports the module in the middle of
    # liger_kernel.ops' __init__ (the module's own import hook fires too early); 0.5.x/0.6.x import
    # an empty package first and the module later, when the package does not have it as an
    # attribute yet (so the targets resolve through the module itself).
    waits_for=("liger_kernel.ops",),
)
