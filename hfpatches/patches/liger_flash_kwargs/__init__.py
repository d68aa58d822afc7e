"""``liger_flash_kwargs``: padding-free batches train with Liger's fused linear cross-entropy.

Bug
    liger-kernel 0.5.6 routes every model's ``lce_forward`` through ``loss_utils``, which hands all
    loss kwargs to ``liger_fused_linear_cross_entropy``: a padding-free batch (FlashAttention's
    ``cu_seq_lens_*`` / ``max_length_*``) raises ``TypeError: unexpected keyword argument
    'cu_seq_lens_q'`` in ``train()``; and the decoder never receives those keys. liger-kernel
    0.6.3 passes ``**kwargs`` from ``fixed_fused_linear_cross_entropy`` to the functional again:
    the same TypeError (its forward does hand the keys to the decoder).
Affected
    liger-kernel 0.5.6 (0.5.5 had no loss_utils; fixed in 0.5.7, decoder hand-off in 0.6.0), and
    0.6.3-0.6.4 (regressed; fixed for good in 0.6.5, which filters the keys in
    ``LigerForCausalLMLoss``). Measured on transformers 4.51.3 and 4.56.2.
Upstream
    linkedin/Liger-Kernel#650, fixed by #651; #708.
Probe
    calls the installed ``LigerForCausalLMLoss`` with ``cu_seq_lens_q`` on tiny CPU tensors and
    stops at the fused functional's entry (``sys.settrace``): no Triton kernel runs.
What changes
    ``loss_utils.fixed_fused_linear_cross_entropy`` drops the keywords the fused loss does not
    take; Liger's ``lce_forward`` hands FlashAttention keys in the documented form to the decoder
    for that call. A dropped key that would change the loss is never dropped silently.
    Rationale: docs/patches/liger_flash_kwargs.md.
"""
from hfpatches._declare import Patch, Target

PATCH = Patch(
    id="liger_flash_kwargs",
    summary="Liger's fused linear cross-entropy: padding-free batches (FlashAttention kwargs) no "
            "longer raise TypeError in train(); the kwargs reach the decoder",
    upstream=("linkedin/Liger-Kernel#650", "linkedin/Liger-Kernel#651", "linkedin/Liger-Kernel#708"),
    # one line (every requires line must hold): 0.5.6, and 0.6.3-0.6.4 where the pass-through came
    # back; the releases between them were measured without the bug (docs table)
    requires=("liger-kernel>=0.5.6,!=0.5.7,!=0.5.8,!=0.5.9,!=0.5.10,!=0.6.0,!=0.6.1,!=0.6.2,<0.6.5",),
    fixed_in="liger-kernel>=0.6.5",
    # Declared on loss_utils, and waits for the whole package: up to 0.5.x importing the package
    # imports loss_utils in its middle (whichever module the user names), so the patch attaches once
    # the package has finished; from 0.6 the package is lazy and loss_utils comes later (with
    # monkey_patch or a model module), so the patch attaches when loss_utils has.
    targets=(Target("liger_kernel.transformers.model.loss_utils", "fixed_fused_linear_cross_entropy",
                    params=("hidden_states", "lm_head_weight", "target")),),
    waits_for=("liger_kernel.transformers",),
)
