"""flash-attn's BERT ``from_pretrained`` loads random weights or crashes, depending on the prefix.

Bug
    ``flash_attn.models.bert.BertPreTrainedModel.from_pretrained`` remaps only ``bert.``-prefixed keys
    and loads with ``strict=False``: ``BertModel`` from a ``bert.`` checkpoint keeps its random init
    (silently); a bare-``BertModel`` checkpoint (sentence-transformers) raises ``KeyError: 'bert.encoder
    .layers.0.attention.self.query.weight'``. flash-attn <= 2.8.3 also unpickles ``.bin`` without
    ``weights_only=True``.
Affected
    Every flash-attn release with ``flash_attn/models/bert.py`` checked (2.5.6 .. 2.8.3.post2, 2026-08
    HEAD); no fixed release (``fixed_in=None``): the probe decides.
Upstream
    Dao-AILab/flash-attention#864 (closed without a fix).
Probe
    A tiny transformers BERT saved as safetensors without and with ``bert.``, loaded into
    ``BertModel``: bug <=> KeyError or the weights did not arrive. ~0.1 s, torch RNG untouched.
What changes
    ``from_pretrained`` (wrapped, signature kept) loads BERT checkpoints with any of '' / ``bert.``
    into any BERT class through flash-attn's own remap, strictly: a missing or misshaped backbone
    weight raises ``CheckpointError``; missing heads are one WARNING. Refused with the file, what was
    found, what was expected and the fix: non-BERT checkpoints (config.json ``model_type``, a
    ``roberta.``-style prefix, a RoBERTa padding row in the position table), two encoders in one file
    (choose with ``checkpoint_prefix=``), any other prefix unless chosen. ``.bin`` is read with
    ``weights_only=True`` and never memory-mapped. Design: docs/patches/flash_attn_bert_prefix.md.
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
    affected="every release checked: 2.5.6 .. 2.8.3.post2",
)
