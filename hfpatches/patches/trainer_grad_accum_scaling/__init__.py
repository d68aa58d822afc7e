"""``trainer_grad_accum_scaling``: gradient accumulation no longer multiplies the update by GA.

Bug
    ``Trainer.training_step`` divides the loss by ``gradient_accumulation_steps`` only when
    ``not self.model_accepts_loss_kwargs``; ``num_items_in_batch`` exists only when batches carry
    ``labels``. A model taking ``**kwargs`` (Llama, Qwen2, GPT-2...) with ``num_items_in_batch``
    None -- an own ``compute_loss`` on batches without ``labels``, TRL 0.17's ``ORPOTrainer`` --
    gets GA x the gradient and GA x the logged loss, silently (GA=4 x 1 vs GA=1 x 4: update 4.000x).
Affected
    transformers 4.48.1-4.52.4 (fixed in 4.53.0). Table, and the related variants this patch does
    not fix (4.46.0-4.48.0, the last incomplete window up to 4.54.1): docs/patches/trainer_grad_accum_scaling.md.
Upstream
    huggingface/transformers#35651 (4.48.1: the condition that misses this case); 4.53.0 adds
    ``or num_items_in_batch is None``. Also #37766. The related variants are advisories
    (``tf_ga_no_kwargs_models``, ``tf_ga_last_window``).
Probe
    The installed ``Trainer.training_step`` on a stand-in trainer (GA=2, model accepting loss
    kwargs, ``num_items_in_batch=None``, loss 1.0): bug <=> backward is not handed 0.5.
What changes
    ``Trainer.training_step`` is wrapped. In exactly that case (loss kwargs accepted, no
    ``num_items_in_batch``, no ``compute_loss_func``) the installed function runs on a view of the
    trainer whose ``model_accepts_loss_kwargs`` reads False (the trainer is not modified), so it
    divides by GA as 4.53.0 does, logged loss included. Any other call is the original call, bit
    for bit. Which TRL trainers this covers: the docs page.
"""
from hfpatches._declare import Patch, Target

PATCH = Patch(
    id="trainer_grad_accum_scaling",
    summary="Trainer with gradient accumulation and no num_items_in_batch (own compute_loss without "
            "labels, TRL ORPO) on a model taking **kwargs: the loss is divided by GA again (update "
            "and logged loss were GA x too large)",
    upstream=("huggingface/transformers#35651", "huggingface/transformers#37766"),
    requires=("transformers>=4.48.1,<4.53",),
    fixed_in="transformers>=4.53",
    targets=(Target("transformers.trainer", "Trainer.training_step",
                    params=("self", "model", "inputs", "num_items_in_batch")),),
)
