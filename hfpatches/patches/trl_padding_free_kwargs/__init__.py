"""``trl_padding_free_kwargs``: TRL's padding-free batches reach FlashAttention-2 in its form.

Bug
    TRL 0.16-0.19's ``DataCollatorForCompletionOnlyLM(..., padding_free=True)`` emits
    ``cu_seq_lens_q``/``cu_seq_lens_k`` of shape (1, n+1) and ``max_length_q``/``max_length_k`` as
    1-element tensors. transformers hands them unchanged to ``flash_attn_varlen_func``, which
    raises "cu_seqlens_q must have shape (batch_size + 1)": padding-free training with
    ``attn_implementation="flash_attention_2"`` crashes in the first layer, in ``SFTTrainer`` and
    in a custom loop (``model(**batch)``) alike.
Affected
    trl 0.16.0-0.19.1 (0.14/0.15 emitted the documented form; the collator was removed in 0.20),
    with transformers >= 4.48 (the attention-interface models). docs/patches/trl_padding_free_kwargs.md.
Upstream
    huggingface/trl#3243 (open; never fixed: the collator was removed in 0.20).
Probe
    The installed collator packs three tiny examples (its own warnings recorded, not emitted);
    its keys go through transformers' FlashAttention-2 entry as it is live (a copy whose kernel
    is a recorder): bug <=> the varlen kernel gets a (1, n+1) ``cu_seqlens_q`` or a tensor maximum.
What changes
    ``transformers.integrations.flash_attention._flash_attention_forward`` (what every
    attention-interface model's FlashAttention-2 calls) is wrapped. Only TRL's exact form is
    converted (int32 (1, n+1) ``cu_seq_lens``, (1,) maxima, one packed row, no padding mask) and
    only when the values say what transformers would derive itself from ``position_ids``
    (boundaries where they restart at 0, ending at the row's length, maxima = longest sequence;
    checked once per batch): ``cu_seq_lens_*`` -> 1-D int32 view, maxima -> int. The batch, the
    collator, ``Trainer`` and every other attention path are left as they are.
"""
from hfpatches._declare import Patch, Target

PATCH = Patch(
    id="trl_padding_free_kwargs",
    summary="TRL 0.16-0.19's padding-free collator: its (1, n+1) cu_seq_lens / tensor max_length are "
            "converted where transformers hands them to FlashAttention-2, so padding-free training with "
            "flash_attention_2 runs (SFTTrainer and custom loops) instead of raising",
    upstream=("huggingface/trl#3243",),
    requires=("trl>=0.16.0,<0.20",),
    fixed_in="trl>=0.20",   # not fixed: the collator was removed in 0.20 (trl#3704)
    fix_word="removed",
    targets=(Target("trl.trainer.utils", "DataCollatorForCompletionOnlyLM.torch_call", params=("self", "examples")),
             Target("transformers.integrations.flash_attention", "_flash_attention_forward",
                    params=("query_states", "key_states", "value_states", "attention_mask", "query_length",
                            "is_causal", "dropout", "position_ids"))),
)
