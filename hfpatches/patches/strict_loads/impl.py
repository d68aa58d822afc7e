"""Implementation of ``strict_loads`` (declared in ``__init__.py``; rationale in docs/patches/strict_loads.md)."""
from __future__ import annotations

import sys
from typing import Any

from hfpatches._declare import ProbeResult

from . import PATCH

PATCH_ID = PATCH.id
MODULE = PATCH.modules[0]
DROPPED = "layer.weight"


def _strict_from_pretrained(wrapped, instance, args, kwargs):
    """wrapt wrapper of ``PreTrainedModel.from_pretrained`` (``instance`` is the class)."""
    from hfpatches.loading import LoadReport

    want_info = bool(kwargs.get("output_loading_info", False))
    out = wrapped(*args, **{**kwargs, "output_loading_info": True})
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
        return out  # a loading path that does not report (nothing we can check): untouched
    model, info = out
    source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
    report = LoadReport.from_loading_info(model, info, checkpoint=str(source) if source is not None else "state dict")
    if not report.ok:
        from hfpatches.errors import LoadError

        raise LoadError(f"strict_loads: {report.error_message()} (hfpatches patch {PATCH_ID!r}: revert it to "
                        "load anyway)", report)
    return (model, info) if want_info else model


def apply(ctx: Any) -> None:
    mu = ctx.module(MODULE)
    ctx.wrap(mu.PreTrainedModel, "from_pretrained", _strict_from_pretrained)


def probe(ctx: Any) -> ProbeResult:
    """A tiny model class built here from ``PreTrainedModel`` / ``PretrainedConfig`` only: those
    modules are complete whenever this runs, while a model module such as ``modeling_bert`` may
    be half-imported (the user's first import can be ``from transformers import BertModel``)."""
    import os
    import tempfile

    import torch
    from safetensors.torch import save_file

    from hfpatches._quiet import Quiet

    mu = sys.modules[MODULE]
    from transformers.configuration_utils import PretrainedConfig

    class ProbeConfig(PretrainedConfig):
        model_type = "hfpatches_strict_probe"

    base: Any = mu.PreTrainedModel

    class ProbeModel(base):  # type: ignore[valid-type,misc]
        config_class = ProbeConfig
        base_model_prefix = "probe"

        def __init__(self, config):
            super().__init__(config)
            self.body = torch.nn.Linear(4, 4)
            self.layer = torch.nn.Linear(4, 4)
            self.post_init()

        def _init_weights(self, module):
            pass

    with Quiet(rng=True), tempfile.TemporaryDirectory(prefix="hfpatches-strict-") as tmp:
        cfg = ProbeConfig()
        sd = {k: v.contiguous() for k, v in ProbeModel(cfg).state_dict().items()}
        full, part = os.path.join(tmp, "full"), os.path.join(tmp, "part")
        for d, tensors in ((full, sd), (part, {k: v for k, v in sd.items() if k != DROPPED})):
            cfg.save_pretrained(d)
            save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        ProbeModel.from_pretrained(full)  # control: a complete checkpoint must load (else: probe fails)
        try:
            ProbeModel.from_pretrained(part)
        except Exception as e:  # noqa: BLE001 - refusing it is the fixed behaviour, whoever raises
            return ProbeResult(False, f"from_pretrained refuses a checkpoint without {DROPPED} ({type(e).__name__})")
    return ProbeResult(True, f"from_pretrained accepted a checkpoint without {DROPPED} (left random; only a warning)")
