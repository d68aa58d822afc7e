"""``flash_attn_bert_prefix``: flash-attn's BERT loads BERT checkpoints strictly, never random weights.

Bug
    ``flash_attn.models.bert.BertPreTrainedModel.from_pretrained`` only remaps ``bert.``-prefixed
    keys and loads with ``strict=False``: ``BertModel`` on a ``bert.`` checkpoint keeps its random
    initialisation silently; a bare ``BertModel`` checkpoint (sentence-transformers, MiniLM) raises
    ``KeyError``.
Affected
    every flash-attn release with ``models/bert.py`` checked (2.5.6 .. 2.8.3.post2); no fix upstream.
Upstream
    Dao-AILab/flash-attention#864 (closed without a fix).
Probe
    two tiny transformers BERTs (with and without ``bert.``) saved to a temp dir and loaded through
    the installed ``from_pretrained``: bug <=> a KeyError or weights that did not arrive.
What changes
    ``from_pretrained`` finds the BERT encoder in the checkpoint (prefix ``""``, ``bert.`` or one
    other), remaps it with flash-attn's own ``remap_state_dict`` and loads it strictly. A
    checkpoint that is not BERT (RoBERTa-style position ids, another ``model_type``) or holds
    several encoders is refused with ``CheckpointError`` naming what was found; a missing or
    misshaped weight is an error, never random init. ``.bin`` files are read with
    ``weights_only=True``. Rationale: docs/patches/flash_attn_bert_prefix.md.
"""
from hfpatches._declare import Patch, Target

PATCH = Patch(
    id="flash_attn_bert_prefix",
    summary="flash-attn BERT from_pretrained: load prefixed and unprefixed checkpoints strictly, never random weights",
    upstream=("Dao-AILab/flash-attention#864",),
    requires=("flash-attn",),      # every release checked has the bug; the probe decides
    fixed_in=None,
    targets=(Target("flash_attn.models.bert", "BertPreTrainedModel.from_pretrained",
                    params=("cls", "model_name", "config")),),
    affected="flash-attn <= 2.8.3.post2 (unfixed upstream)",
)
