"""``peft_merge_untie``: ``merge_and_unload()`` unties the config when it leaves the embeddings different.

Bug
    On a model with ``tie_word_embeddings=True``, ``modules_to_save=["lm_head"]`` (or
    ``["embed_tokens"]``) trains a separate copy of one of the tied matrices. ``merge_and_unload()``
    puts the trained copy in place, so input and output embeddings now differ, but the config still
    says tied. ``save_pretrained`` writes both tensors; ``from_pretrained`` re-ties them and the
    trained head (or embedding) is silently replaced. No warning.
Affected
    peft <= 0.18.1 (0.11.1-0.18.1 measured, transformers 4.51.3); fixed in 0.19.0. Table:
    docs/patches/peft_merge_untie.md.
Upstream
    huggingface/peft#2777 (report), huggingface/peft#3126 (fix, released in 0.19.0);
    huggingface/transformers#45127.
Probe
    A tiny tied Llama built in-process (RNG and logging restored, no warning under any filter):
    a modules_to_save copy of ``lm_head`` made different, ``merge_and_unload()``; the bug is a
    config still tied while the two embedding weights differ (peft >= 0.19's own untie is caught
    at the config, before the warning that follows it).
What changes
    Every tuner's ``_unload_and_optionally_merge`` is wrapped: after a *merge* that leaves the input
    and output embedding weights as different tensors with different values, the config (and its
    text sub-config) gets ``tie_word_embeddings=False`` and one warning says so. Still the same
    tensor, or equal values: nothing changes. ``unload()`` and ``merge_adapter()`` are left as
    upstream leaves them (0.19 too).
"""
from hfpatches._declare import Patch, Target

PATCH = Patch(
    id="peft_merge_untie",
    summary="PEFT merge_and_unload() on tied embeddings with a trained lm_head/embed_tokens copy: "
            "untie the config so a save/load round trip keeps the trained weights",
    upstream=("huggingface/peft#2777", "huggingface/peft#3126", "huggingface/transformers#45127"),
    requires=("peft<0.19.0",),
    fixed_in="peft>=0.19.0",
    # LoRA's method is the one declared (and checked); every other tuner class that defines its own
    # ``_unload_and_optionally_merge`` (IA3, OFT, ...) is wrapped the same way at apply
    targets=(Target("peft.tuners.lora.model", "LoraModel._unload_and_optionally_merge"),),
    # every tuner module (LoRA, IA3, ...) must be imported before the classes are walked
    waits_for=("peft", "peft.tuners.tuners_utils"),
)
