"""``liger_ce_reduction_none``: Liger's cross-entropy, per-token gradients with ``reduction="none"``.

Bug
    ``LigerCrossEntropyFunction`` (behind ``LigerCrossEntropyLoss`` and ``liger_cross_entropy``)
    writes the logits gradient during forward; its backward scales it with ``element_mul_kernel``,
    which loads ``grad_output[0]`` only. With ``reduction="none"`` the per-token loss is right but
    every row of the logits gradient is scaled by the *first* token's upstream gradient: token
    weights, masks or RL advantages applied after the loss give wrong gradients, silently.
Affected
    liger-kernel 0.5.0 (the first per-token loss) - 0.5.8; fixed in 0.5.9. Table:
    docs/patches/liger_ce_reduction_none.md.
Upstream
    linkedin/Liger-Kernel#678 (report), linkedin/Liger-Kernel#680 (fix, released in 0.5.9).
Probe
    Runs the installed Function on 4 tokens with per-token weights and compares the logits
    gradient with torch -- only where Liger's kernel can run: under Triton's interpreter
    (``TRITON_INTERPRET=1`` before triton was imported) or on a CUDA device this process has
    already initialised (never initialises one). Elsewhere it says it could not run and the
    version range decides.
What changes
    ``LigerCrossEntropyFunction.backward`` only: a per-token ``grad_output`` (``reduction="none"``)
    scales each row of the stored logits gradient by its own value, in place (no memory beyond
    what the caller passed). A scalar ``grad_output`` ("mean"/"sum") goes to the original
    (bit-identical). A second backward through the same graph raises instead of scaling twice.
"""
from hfpatches._declare import Patch, Target

_MODULE = "liger_kernel.ops.cross_entropy"

PATCH = Patch(
    id="liger_ce_reduction_none",
    summary="Liger's cross-entropy with reduction='none': each token's gradient scaled by its own "
            "upstream gradient (token weights / masks after the loss)",
    upstream=("linkedin/Liger-Kernel#678", "linkedin/Liger-Kernel#680"),
    requires=("liger-kernel>=0.5.0,<0.5.9",),
    fixed_in="liger-kernel>=0.5.9",
    targets=(Target(_MODULE, "LigerCrossEntropyFunction.backward", params=("ctx", "grad_output")),),
    # as liger_flce_reduction_none: liger-kernel imports its ops modules in the middle of
    # liger_kernel.ops' __init__ in some releases; wait for the package too
    waits_for=("liger_kernel.ops",),
)
