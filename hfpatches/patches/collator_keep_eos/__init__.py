"""``collator_keep_eos`` (opt-in): causal-LM collation keeps the labels of real EOS tokens when pad == eos.

Bug
    ``DataCollatorForLanguageModeling(mlm=False)`` builds labels as ``input_ids`` with every
    ``pad_token_id`` set to -100. Many causal LMs have no pad token and users set
    ``pad_token = eos_token``; then every real EOS is masked too and the model never learns to
    stop. Silent: the loss looks normal.
Affected
    transformers (4.40.0 to 5.23.0 measured; declared from 4.40, the oldest the lab ran, the
    behaviour is older); upstream keeps it by design, so this patch is opt-in. Table:
    docs/patches/collator_keep_eos.md.
Upstream
    huggingface/transformers#23530 (open).
Probe
    A tiny in-memory tokenizer with pad == eos, two examples ending in EOS collated to different
    lengths (torch): the bug is a real EOS labelled -100.
What changes
    ``torch_call``/``numpy_call`` of the collator, only when ``mlm=False`` and
    ``pad_token_id == eos_token_id``: positions the collator padded (and positions an example's
    own ``attention_mask`` marks as padding) keep -100; real EOS tokens get their label back.
    Everything else is upstream's result, untouched; a distinct pad token, MLM and the TF path are
    not touched at all. Opt in: ``apply(only=["collator_keep_eos"])`` or
    ``HFPATCHES_COLLATOR_KEEP_EOS=1``.
"""
from hfpatches._declare import Patch, Target
from hfpatches._env import COLLATOR_KEEP_EOS

_MODULE = "transformers.data.data_collator"

PATCH = Patch(
    id="collator_keep_eos",
    summary="opt-in: DataCollatorForLanguageModeling(mlm=False) with pad == eos masks only the padding "
            "it added, real EOS tokens keep their labels",
    upstream=("huggingface/transformers#23530",),
    requires=("transformers>=4.40",),
    fixed_in=None,
    targets=(Target(_MODULE, "DataCollatorForLanguageModeling.torch_call", params=("self", "examples")),
             Target(_MODULE, "DataCollatorForLanguageModeling.numpy_call", params=("self", "examples"))),
    # transformers.data imports the module inside its own __init__: wait for the package too
    waits_for=("transformers.data",),
    default_enabled=False,
    enable_env=COLLATOR_KEEP_EOS,
    affected="transformers (all versions checked: by design upstream)",
)
