"""Advisories: verified bugs of the stack that hfpatches does not fix in place (data only).

Each entry is an :class:`~hfpatches._declare.Advisory`: where the bug is (``requires``, judged
like a patch's by ``hfpatches._ranges``), where upstream fixed it, what to do instead, and how it
was verified (``evidence``: the releases whose source was read or whose reproduction ran).
``doctor`` lists the ones that hold for the installed versions, ``audit`` judges them on a pin
set, ``scripts/matrix.py`` writes the README table. Not read at start-up.

To add one: append an ``Advisory`` below (ids in snake_case, unique), then ``make matrix``.
"""
from hfpatches._declare import Advisory

ADVISORIES = (
    Advisory(
        id="tf_ddp_no_sync_inverted",
        summary="Trainer with gradient accumulation under DDP skips the gradient all-reduce on the "
                "last micro-batch of each window (no_sync condition inverted): ranks' weights diverge",
        upstream=("huggingface/transformers#34645",),
        requires=("transformers==4.46.2",),
        fixed_in="transformers>=4.46.3",
        workaround="upgrade to transformers>=4.46.3 (or pin 4.46.1); with 4.46.2 train with "
                   "gradient_accumulation_steps=1 under DDP",
        severity="silent wrong results",
        evidence="reproduced: scripts/lab/advisories/tf_ddp_no_sync_inverted.py (torchrun, 2 CPU ranks, gloo, "
                 "gradient_accumulation_steps=2, one SGD step, different data per rank): the ranks' weights differ "
                 "by 0.262 on 4.46.2 and are identical on 4.46.1, 4.46.3 and 4.47.1. Source: 4.46.2 enters "
                 "accelerator.no_sync when `i == len(batch_samples) - 1`, 4.46.3 when `i != ...`.",
    ),
    Advisory(
        id="tf_ga_no_kwargs_models",
        summary="Trainer with gradient_accumulation_steps > 1: a model whose forward takes no **kwargs "
                "gets the sum of the micro-batch losses, not their mean (gradients x GA)",
        upstream=("huggingface/transformers#35438", "huggingface/transformers#37766"),
        requires=("transformers>=4.46.0,<4.48.0",),
        fixed_in="transformers>=4.48.0",
        workaround="upgrade to transformers>=4.48.0; or give the model's forward **kwargs and use the "
                   "num_items_in_batch it receives; or divide the learning rate by gradient_accumulation_steps",
        severity="silent wrong results",
        evidence="reproduced: scripts/lab/advisories/tf_ga_division.py (a model whose forward has no **kwargs, "
                 "2 samples, gradient_accumulation_steps=2, batch 1, no clipping, vs one batch of 2): update norm "
                 "ratio 2.0 on 4.46.0, 4.46.2, 4.47.1; 1.0 on 4.48.0, 4.48.1, 4.50.3, 4.51.3 .. 4.55.0. Source: "
                 "training_step calls accelerator.backward(loss) with the Trainer's Accelerator at 1 accumulation "
                 "step. Releases before 4.46.0 not run.",
    ),
    Advisory(
        id="tf_ga_last_window",
        summary="Trainer: when the epoch's steps are not a multiple of gradient_accumulation_steps, the "
                "last, shorter window is still divided by the full gradient_accumulation_steps "
                "(models without loss kwargs): its update is too small",
        upstream=("huggingface/transformers#38837", "huggingface/transformers#39659"),
        requires=("transformers>=4.48.0,<4.55.0",),
        fixed_in="transformers>=4.55.0",
        workaround="upgrade to transformers>=4.55.0, or make the steps per epoch a multiple of "
                   "gradient_accumulation_steps (dataloader_drop_last / dataset size)",
        severity="silent wrong results",
        evidence="reproduced: scripts/lab/advisories/tf_ga_division.py (1 sample, gradient_accumulation_steps=2: "
                 "the epoch's only window is one batch) vs gradient_accumulation_steps=1: update ratio 0.5 on "
                 "4.48.0, 4.48.1, 4.50.3, 4.51.3, 4.52.4, 4.53.1, 4.54.1; 1.0 on 4.55.0 (divides by "
                 "current_gradient_accumulation_steps = len(batch_samples)) and on 4.46.0 .. 4.47.1 (no division "
                 "at all there: tf_ga_no_kwargs_models).",
    ),
    Advisory(
        id="tf_average_tokens_default_off",
        summary="Trainer under DDP with gradient accumulation: average_tokens_across_devices defaults to "
                "False, so each rank normalises its loss by its own token count, not the global one",
        upstream=("huggingface/transformers#34242", "huggingface/transformers#34373", "huggingface/transformers#39395"),
        requires=("transformers>=4.46.2,<4.54.0",),
        fixed_in="transformers>=4.54.0",
        workaround="pass TrainingArguments(average_tokens_across_devices=True), or upgrade to "
                   "transformers>=4.54.0 (default True)",
        severity="degraded",
        evidence="TrainingArguments in the installed releases: no such field in 4.46.0/4.46.1; "
                 "default=False in 4.46.2 .. 4.53.1 (10 releases read); default=True in 4.54.0, 4.54.1, "
                 "4.55.0, 4.57.6 (the issue said 4.55: it is 4.54.0).",
    ),
    Advisory(
        id="tf_fa2_posids_not_from_zero",
        summary="attn_implementation='flash_attention_2' with position_ids that do not start at 0 and "
                "no attention_mask (a continued/chunked sequence) raises in _prepare_from_posids: "
                "every such forward is treated as a packed batch",
        upstream=("huggingface/transformers#39814", "huggingface/transformers#40002"),
        requires=("transformers>=4.54.0,<4.56.0",),
        fixed_in="transformers>=4.56.0",
        workaround="upgrade to transformers>=4.56.0, or pass an attention_mask (or position_ids from 0)",
        severity="crash",
        evidence="FlashAttention-2 only: needs CUDA and flash-attn, cannot run here. Source of the installed "
                 "releases: 4.54.0, 4.54.1, 4.55.0 take the position_ids path whenever position_ids is given and "
                 "compute max_length as cu_seq_lens.diff().max() (empty without a 0 position); 4.53.1 used "
                 "position_ids.max()+1 behind a packed-sequence check; 4.56.0 and 4.57.6 check "
                 "_is_packed_sequence first.",
    ),
)
