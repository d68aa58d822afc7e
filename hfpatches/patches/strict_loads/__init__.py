"""``strict_loads`` (opt-in): ``from_pretrained`` refuses a checkpoint that leaves backbone weights random.

Bug
    transformers' ``from_pretrained`` loads a checkpoint with missing or misshaped backbone
    weights with only a log warning (by design): the model trains from random weights there.
Affected
    transformers, all versions (a design choice, not a regression).
Upstream
    huggingface/transformers#32067, #10329, #48962.
Probe
    a tiny model class built from ``PreTrainedModel`` itself (nothing that may be mid-import) is
    saved twice, complete and without one weight: bug <=> the incomplete one loads.
What changes
    ``PreTrainedModel.from_pretrained`` raises ``LoadError`` (with a ``LoadReport`` naming every
    missing/misshaped key and the fix) when backbone weights are missing or misshaped; new heads
    stay allowed. Opt in: ``apply(only=["strict_loads"])`` or ``HFPATCHES_STRICT_LOADS=1``.
    Rationale: docs/patches/strict_loads.md.
"""
from hfpatches._declare import Patch, Target
from hfpatches._env import STRICT_LOADS

PATCH = Patch(
    id="strict_loads",
    summary="opt-in: from_pretrained raises LoadError (with a LoadReport) when backbone weights are missing or misshaped",
    upstream=("huggingface/transformers#32067", "huggingface/transformers#10329", "huggingface/transformers#48962"),
    requires=("transformers>=4.40",),
    fixed_in=None,
    targets=(Target("transformers.modeling_utils", "PreTrainedModel.from_pretrained",
                    params=("cls", "pretrained_model_name_or_path")),),
    default_enabled=False,
    enable_env=STRICT_LOADS,
    affected="by design: missing weights are only a warning",
)
