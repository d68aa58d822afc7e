"""Opt-in: transformers' ``from_pretrained`` raises instead of warning when backbone weights are
missing or re-initialised because their shapes differ.

The bug
    ``PreTrainedModel.from_pretrained`` loads whatever keys match and initialises the rest at
    random; missing *backbone* weights (a checkpoint of another architecture, PEFT names, a
    ``module.`` prefix from DDP, a truncated conversion) only produce a "Some weights ... were
    newly initialized" warning, easy to miss in a training log. The model trains on random
    weights. With ``ignore_mismatched_sizes=True`` backbone weights of another shape (a longer
    position table, another vocabulary) are re-initialised just as quietly. This is by design
    upstream (new task heads must load), so no release "fixes" it; that is why this patch is off
    by default.

Affected
    Every transformers version we know of (``fixed_in=None``); verified on 4.51.3 and 5.23.0, whose
    loading internals differ completely. The probe, not a version range, decides.

Upstream
    Missing keys are a warning so that new heads can load (transformers#4557 made it a clearer
    warning). Requests for an error: huggingface/transformers#10329 (2021, closed without a flag),
    huggingface/transformers#32067 (2024, open: a DDP-prefixed checkpoint loaded with every key
    unmatched, only a warning); PR huggingface/transformers#48962 (opt-in ``strict=True``) was
    closed unmerged in 2026-09. Related silent-random-weights reports: transformers#34234 (buffers),
    Dao-AILab/flash-attention#864.

Switch on
    ``hfpatches.apply(only=["strict_loads"])``, ``HFPATCHES_STRICT_LOADS=1`` (``hfpatches._env.STRICT_LOADS``)
    or ``HFPATCHES_ONLY=strict_loads``.

What changes
    ``PreTrainedModel.from_pretrained`` is wrapped (``ctx.wrap``: a wrapt FunctionWrapper around the
    classmethod, so every subclass and ``AutoModel*.from_pretrained`` go through it). The wrapper asks
    for the public ``output_loading_info=True`` - the same on 4.x and 5.x, no private internals - and
    classifies it with :meth:`hfpatches.loading.LoadReport.from_loading_info`: missing keys that are
    tied to a loaded key, heads outside the base model (``classifier.``, ``lm_head.``, ``cls.``) and the
    pooler are allowed (new heads); any other missing key, or a backbone weight re-initialised by
    ``ignore_mismatched_sizes=True``, raises :class:`hfpatches.errors.LoadError` whose ``.report``
    explains every key. A head re-initialised by ``ignore_mismatched_sizes=True`` (another
    ``num_labels``) stays allowed. Otherwise the caller gets exactly what it asked for (the model, or
    ``(model, loading_info)`` when it passed ``output_loading_info=True``).
    A shape mismatch without ``ignore_mismatched_sizes`` already raises in transformers itself; that
    error is left as it is. Unexpected checkpoint keys never raise (dropping a head, or loading fewer
    layers on purpose with ``num_hidden_layers=...``, is legitimate).

Probe
    A tiny BERT (1 layer, hidden 8) is written to a temporary directory twice: complete (the control:
    it must load, else the probe itself fails) and without one attention weight. Bug present <=> the
    installed ``BertModel.from_pretrained`` returns a model for the incomplete one. ~0.2 s, no
    download, torch RNG state forked, transformers' logging and progress bars quiet for its duration.

Design decisions
    * Built on ``output_loading_info`` rather than on ``_load_pretrained_model`` / the 5.x weight
      converter, whose signatures change between minor releases.
    * ``pooler`` counts as a head: ``BertForMaskedLM`` checkpoints have none, and loading them into
      ``BertModel`` is routine.
    * Composite loaders that add backbone layers on purpose (``EncoderDecoderModel`` adding
      cross-attention) raise under this patch: that is its point; revert it for such a load
      (``hfpatches.revert(["strict_loads"])``) or use ``hfpatches.patched`` around the rest.
"""
from __future__ import annotations

from .._registry import Patch, ProbeResult, Target

PATCH_ID = "strict_loads"
MODULE = "transformers.modeling_utils"
DROPPED = "encoder.layer.0.attention.self.query.weight"


def _strict_from_pretrained(wrapped, instance, args, kwargs):
    """wrapt wrapper of ``PreTrainedModel.from_pretrained`` (``instance`` is the class)."""
    from ..loading import LoadReport

    want_info = bool(kwargs.get("output_loading_info", False))
    out = wrapped(*args, **{**kwargs, "output_loading_info": True})
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
        return out  # a loading path that does not report (nothing we can check): untouched
    model, info = out
    source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
    report = LoadReport.from_loading_info(model, info, checkpoint=str(source) if source is not None else "state dict")
    if not report.ok:
        from ..errors import LoadError

        raise LoadError(f"strict_loads: {report.error_message()} (hfpatches patch {PATCH_ID!r}: revert it to "
                        "load anyway)", report)
    return (model, info) if want_info else model


def _apply(ctx) -> None:
    mu = ctx.module(MODULE)
    ctx.wrap(mu.PreTrainedModel, "from_pretrained", _strict_from_pretrained)


class _Quiet:
    """transformers' logging at ERROR and its progress bars off, restored afterwards."""

    def __enter__(self):
        from transformers.utils import logging as tlog

        self.tlog = tlog
        self.level = tlog.get_verbosity()
        self.bars = tlog.is_progress_bar_enabled()
        tlog.set_verbosity_error()
        if self.bars:
            tlog.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        self.tlog.set_verbosity(self.level)
        if self.bars:
            self.tlog.enable_progress_bar()


def _probe() -> ProbeResult:
    import os
    import tempfile

    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    with _Quiet(), torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory(prefix="hfpatches-strict-") as tmp:
        cfg = BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=8, max_position_embeddings=8)
        sd = {k: v.contiguous() for k, v in BertModel(cfg).state_dict().items()}
        full, part = os.path.join(tmp, "full"), os.path.join(tmp, "part")
        for d, tensors in ((full, sd), (part, {k: v for k, v in sd.items() if k != DROPPED})):
            cfg.save_pretrained(d)
            save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        BertModel.from_pretrained(full)  # control: a complete checkpoint must load (else: probe fails)
        try:
            BertModel.from_pretrained(part)
        except Exception as e:  # noqa: BLE001 - refusing it is the fixed behaviour, whoever raises
            return ProbeResult(False, f"from_pretrained refuses a checkpoint without {DROPPED} ({type(e).__name__})")
    return ProbeResult(True, f"from_pretrained accepted a checkpoint without {DROPPED} (left random; only a warning)")


PATCH = Patch(
    id=PATCH_ID,
    summary="opt-in: from_pretrained raises LoadError (with a LoadReport) when backbone weights are missing or misshaped",
    upstream=("huggingface/transformers#32067", "huggingface/transformers#10329", "huggingface/transformers#48962"),
    requires=("transformers>=4.40",),
    fixed_in=None,
    targets=(Target(MODULE, "PreTrainedModel.from_pretrained", params=("cls", "pretrained_model_name_or_path")),),
    probe=_probe,
    apply=_apply,
    default_enabled=False,
    enable_env="HFPATCHES_STRICT_LOADS",
    affected="transformers (all versions: missing weights are only a warning, by design)",
    verified_stacks=("affected", "latest"),
)
