"""``trl_padding_free_kwargs``: TRL's padding-free batches reach the model in FlashAttention's form.

Bug
    TRL 0.16-0.19's ``DataCollatorForCompletionOnlyLM(..., padding_free=True)`` emits
    ``cu_seq_lens_q``/``cu_seq_lens_k`` of shape (1, n+1) and ``max_length_q``/``max_length_k`` as
    1-element tensors. transformers' ``FlashAttentionKwargs`` are 1-D int32 cumulative lengths and
    int maxima; ``flash_attn_varlen_func`` raises "cu_seqlens_q must have shape (batch_size + 1)",
    so padding-free SFT with ``attn_implementation="flash_attention_2"`` crashes in every layer.
Affected
    trl 0.16.0-0.19.1 (0.14/0.15 emitted the documented form; 0.20 removed the collator).
    Table and method: docs/patches/trl_padding_free_kwargs.md.
Upstream
    huggingface/trl#3243 (open; never fixed, the collator was removed in 0.20).
Probe
    The installed collator packs three tiny examples (a word-level tokenizer built in memory),
    the batch goes through the installed ``Trainer._prepare_inputs`` (a stand-in trainer):
    bug <=> a FlashAttention key leaves it in TRL's batch-dimensioned form.
What changes
    ``transformers.Trainer._prepare_inputs`` (wrapped; after accelerate has sliced/dispatched the
    batch and moved it to the device) turns exactly TRL's form into the documented one:
    ``cu_seq_lens_*`` (1, n+1) -> its 1-D int32 view (the same boundaries; ``_k`` stays the same
    object as ``_q``), 1-element ``max_length_*`` -> int. Everything else the batch carries is the
    same object; a batch without that form is returned as it is. The collator itself is left
    alone: accelerate's ``dispatch_batches`` concatenates and slices the collator's output along
    dim 0 -- a Python int raises TypeError there and a 1-D ``cu_seq_lens`` is silently cut to its
    first element. With ``liger_flash_kwargs`` live, Liger's forward then hands the keys on.
"""
from hfpatches._declare import Patch, Target

PATCH = Patch(
    id="trl_padding_free_kwargs",
    summary="TRL's padding-free collator: FlashAttention kwargs reach the model in transformers' "
            "documented form (1-D int32 cu_seq_lens, int max_length); FlashAttention-2 no longer "
            "rejects them",
    upstream=("huggingface/trl#3243",),
    requires=("trl>=0.16.0,<0.20",),
    fixed_in="trl>=0.20",   # not fixed: 0.20 removed the collator (trl#3704)
    fix_word="removed",
    targets=(Target("trl.trainer.utils", "DataCollatorForCompletionOnlyLM.torch_call", params=("self", "examples")),
             Target("transformers.trainer", "Trainer._prepare_inputs", params=("self", "inputs"))),
)
