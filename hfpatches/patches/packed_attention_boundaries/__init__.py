"""``packed_attention_boundaries``: packed sequences attend only within themselves (eager/sdpa).

Bug
    A padding-free batch (``DataCollatorWithFlattening``, TRL's ``padding_free=True``) is one row
    whose ``position_ids`` restart at 0 for each sequence, without an attention mask. With
    ``eager``/``sdpa`` the causal mask spans the whole row: every sequence attends to the ones
    packed before it (tiny Llama: max |logit diff| 1.85e-1), in training and evaluation.
    transformers >= 4.53.1 detects packing only when ``past_key_values is None``; the model makes
    a ``DynamicCache`` whenever ``use_cache`` is on (the config default), so ``model(**batch)``
    still leaks on 5.x (the ``Trainer`` sets ``use_cache=False``).
Affected
    transformers 4.41.0 up to the newest checked (5.23.0; 4.53.1+ only with ``use_cache`` on).
    4.40 has the bug too but its ``_update_causal_mask`` takes ``past_seen_tokens``: not covered.
    Covered: Llama, Qwen2, Qwen3, Mistral, Gemma, Gemma2, Phi3. 4.53.0 is refused (TARGET_CHANGED).
    Table and method: docs/patches/packed_attention_boundaries.md.
Upstream
    huggingface/transformers#39194 (packing detection, 4.53.1; not with a cache).
Probe
    Two tiny sequences packed into one row of a tiny Llama (Qwen2 while Llama is mid-import; eager
    and sdpa, use_cache on and off) against each run alone: bug <=> the second differs by > 1e-4.
What changes
    The decoder's ``forward`` (``LlamaModel.forward`` ...) notes the sequences of a packed batch
    (restarting ``position_ids`` or ``cu_seq_lens_q``) when the caller passed no attention mask and
    no cache; the causal mask is then made block-diagonal (4.41-4.52: ``_update_causal_mask``; 4.53.1+:
    ``masking_utils._preprocess_mask_arguments`` gets the packing it skipped for the model's own
    empty cache). A cache with content or given by the caller, padding masks, FlashAttention:
    untouched. ``PreTrainedModel.post_init`` attaches architectures imported mid-apply.
"""
from hfpatches._declare import Patch, Target

PATCH = Patch(
    id="packed_attention_boundaries",
    summary="Padding-free (packed) batches: eager/sdpa attention stays within each packed sequence "
            "(also with use_cache on 5.x); FlashAttention and generation untouched",
    upstream=("huggingface/transformers#39194",),
    requires=("transformers>=4.41",),
    fixed_in=None,
    # the decoders of ARCHS (impl.py) are wrapped as their modules are imported; the one fixed
    # target catches an architecture whose module was still importing when apply() ran
    targets=(Target("transformers.modeling_utils", "PreTrainedModel.post_init"),),
    affected="4.53.1+: only with use_cache on; 4.53.0 refused; 4.40 has the bug, not covered",
)
