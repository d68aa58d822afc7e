"""Implementation of ``flash_attn_bert_prefix`` (declared in ``__init__.py``; rationale in docs/patches/*.md)."""
from __future__ import annotations

import os
import sys
from typing import Any

from hfpatches._bert_checkpoint import (
    ANCHOR,
    MODULE,
    POSITION_ROWS,
    Plan,
    check_bert_checkpoint,
    checkpoint_config,
    likely_cause,
    load_error,
    remap_checkpoint,
    show,
    where,
)
from hfpatches._declare import ProbeResult

from . import PATCH

# ----------------------------------------------------------------------------- reading
_bin_safety: dict = {}  # state_dict_from_pretrained function -> passes weights_only=True?


def _upstream_bin_is_safe(fn) -> bool:
    """Does the installed ``state_dict_from_pretrained`` pass ``weights_only=True`` to torch.load?
    (2.8.3: no; 2.8.3.post2: yes.) Read from its source once per function object."""
    if fn not in _bin_safety:
        import inspect

        try:
            _bin_safety[fn] = "weights_only=True" in inspect.getsource(fn)
        except (OSError, TypeError):
            _bin_safety[fn] = False
    return _bin_safety[fn]


def _bin_files(model_name: str) -> list[str] | None:
    """The ``.bin`` files flash-attn's reader would pick for ``model_name``; None when it would read
    safetensors (or find nothing: then its own reader raises its own error)."""
    from transformers.utils import WEIGHTS_INDEX_NAME, WEIGHTS_NAME
    from transformers.utils.hub import cached_file, get_checkpoint_shard_files

    local = os.path.isdir(model_name)
    if local and not os.path.isfile(os.path.join(model_name, WEIGHTS_NAME)) \
            and not os.path.isfile(os.path.join(model_name, WEIGHTS_INDEX_NAME)):
        return None  # flash-attn's local order: .bin, .bin index, then safetensors
    for name, sharded in ((WEIGHTS_NAME, False), (WEIGHTS_INDEX_NAME, True)):
        path = cached_file(model_name, name, _raise_exceptions_for_missing_entries=False)
        if path:
            return get_checkpoint_shard_files(model_name, path)[0] if sharded else [path]
    return None


def _torch_load(path: str) -> dict:
    import torch

    # Never mmap: the tensors become the model's parameters (``_assign``), and a parameter backed by
    # the file dies with SIGBUS (or silently changes) when the file is rewritten in place - e.g.
    # ``torch.save(model.state_dict(), the_same_path)``, which truncates it first.
    return torch.load(path, map_location="cpu", weights_only=True, mmap=False)


def read_state_dict(model_name: str) -> dict:
    """The checkpoint's state dict, through flash-attn's own reader (``.bin`` always with
    ``weights_only=True`` and never memory-mapped). Finding nothing raises flash-attn's (or
    transformers') own error, as before; a file that is there but cannot be read raises
    ``CheckpointError``."""
    import pickle

    from hfpatches.errors import CheckpointError

    reader = sys.modules[MODULE].state_dict_from_pretrained
    files = None if _upstream_bin_is_safe(reader) else _bin_files(model_name)
    try:
        if files is None:
            return reader(model_name)
        out: dict = {}
        for f in files:
            out.update(_torch_load(f))
        return out
    except Exception as e:
        if files is None and not _has_weights_file(model_name):
            raise  # nothing local to read: the upstream resolution error, unchanged
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
            cause = ("the .bin holds objects other than tensors, which torch.load(weights_only=True) refuses to "
                     "unpickle (it could run code); convert it to safetensors where you trust it")
        else:
            cause = "a truncated or corrupted file (an interrupted download or copy); fetch it again"
        shown = f" {', '.join(map(str, files))}" if files else ""
        raise CheckpointError(f"{where(model_name)}: could not read the checkpoint{shown} "
                              f"({type(e).__name__}: {str(e).strip()[:500]}).\n  likely cause: {cause}") from e


def _has_weights_file(model_name: str) -> bool:
    from hfpatches._files import BIN_INDEX, BIN_NAME, SAFE_INDEX, SAFE_NAME

    names = (BIN_NAME, BIN_INDEX, SAFE_NAME, SAFE_INDEX)
    return os.path.isdir(model_name) and any(os.path.isfile(os.path.join(model_name, n)) for n in names)


# ----------------------------------------------------------------------------- the fixed load
def _skip_meta_init():
    """The meta build of this thread only (``hfpatches._meta_build.meta_build``)."""
    from hfpatches._meta_build import meta_build

    return meta_build()


def _build(cls, config, inputs, kwargs):
    """``(model, on_meta)``: the class built on the meta device (no memory, initialisers skipped)
    when that works and leaves no buffer to compute; else built normally, as flash-attn does."""

    try:
        with _skip_meta_init():
            model = cls(config, *inputs, **kwargs)
        if not any(True for _ in model.buffers()):
            return model, True
    except Exception:  # noqa: BLE001 - the normal construction below raises the real error, if any
        pass
    return cls(config, *inputs, **kwargs), False


def _assign(model, sd: dict) -> None:
    """Load ``sd`` into a meta-built ``model`` by taking its tensors as the parameters (no copy
    unless dtype/device differ), then restore tied parameters (``assign`` replaces each name's
    Parameter separately). The tensors never depend on a ``.bin`` file (read without mmap); those
    of a safetensors file stay on its private mapping, as in transformers' own loads (see the
    module docstring, "Reading")."""
    import torch

    device = torch.empty(0).device  # the default device the normal construction would have used
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    expected = model.state_dict(keep_vars=True)
    sd = {k: (v.to(device=device, dtype=expected[k].dtype) if k in expected else v) for k, v in sd.items()}
    model.load_state_dict(sd, strict=False, assign=True)
    for names in groups.values():
        src = next((n for n in names if n in sd), None)
        if src is None or len(names) == 1:
            continue
        param = model.get_parameter(src)
        for n in names:
            if n != src:
                owner, _, leaf = n.rpartition(".")
                setattr(model.get_submodule(owner), leaf, param)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:  # cannot happen after a complete plan; never hand out meta tensors
        raise RuntimeError(f"hfpatches {PATCH.id}: left on the meta device: {show(left)}")


def load_pretrained(cls, model_name, config, *inputs, checkpoint_prefix=None, **kwargs):
    """What ``BertPreTrainedModel.from_pretrained`` does once patched (see the module docstring).
    ``checkpoint_prefix``: where the BERT encoder sits in the checkpoint (``''``, ``'bert.'``,
    ``'q_encoder.'``...) when it is not the one unambiguous ``''`` or ``'bert.'``."""
    import logging

    config_path, config_json = checkpoint_config(model_name)
    model, on_meta = _build(cls, config, inputs, kwargs)
    raw = read_state_dict(model_name)
    raw_keys = list(raw)
    prefix = check_bert_checkpoint(model_name, raw_keys, config=config, config_path=config_path,
                                   config_json=config_json, prefix=checkpoint_prefix, who=where(model_name, cls),
                                   positions=lambda key, sd=raw: sd[key][:POSITION_ROWS] if key in sd else None)
    emb = raw[prefix + ANCHOR]
    emb_shape = tuple(emb.shape)
    box = [raw]
    del raw, emb  # from here on the only reference to the tensors is the dict in ``box``
    sd, target = remap_checkpoint(box, prefix, config, model, raw_keys=raw_keys, who=(model_name, cls))
    plan = Plan(model, sd, target)
    if not plan.ok:
        raise load_error(model_name, cls, missing=plan.missing_backbone, unexpected=plan.unexpected_backbone,
                     mismatched=plan.mismatched, cause=likely_cause(plan, raw_keys, emb_shape, config))
    if on_meta and plan.missing_allowed:
        # something keeps the class's own initialisation: build it for real, as flash-attn does
        model, on_meta = cls(config, *inputs, **kwargs), False
    if on_meta:
        _assign(model, sd)
        result = "all parameters from the checkpoint"
    else:
        result = model.load_state_dict(sd, strict=False)
    del sd
    log = logging.getLogger(f"hfpatches.{PATCH.id}")
    if plan.missing_allowed or plan.unexpected_allowed:
        parts = []
        if plan.missing_allowed:
            parts.append(f"not in the checkpoint, left at their initialisation ({len(plan.missing_allowed)}): "
                         f"{show(plan.missing_allowed)}")
        if plan.unexpected_allowed:
            parts.append(f"checkpoint weights this class has no place for, not used ({len(plan.unexpected_allowed)}): "
                         f"{show(plan.unexpected_allowed)}")
        log.warning("%s: backbone loaded completely; %s", where(model_name, cls), "; ".join(parts))
    log.info("%s: loaded (checkpoint prefix %r -> model prefix %r; %s; non-weight buffers ignored: %s)",
             where(model_name, cls), prefix, target, result, show(plan.ignored) or "none")
    return model


def _split(model_name, config, *inputs, **kwargs):
    return model_name, config, inputs, kwargs


def _from_pretrained(wrapped, instance, args, kwargs):
    """wrapt wrapper: ``instance`` is the class the classmethod was called on. The one keyword the
    patch adds, ``checkpoint_prefix=``, is taken here; everything else reaches ``cls(config, ...)``."""
    cls = instance if isinstance(instance, type) else type(instance)
    model_name, config, inputs, kw = _split(*args, **kwargs)
    return load_pretrained(cls, model_name, config, *inputs, **kw)


# ----------------------------------------------------------------------------- probe / apply
def _tiny_checkpoints(directory: str):
    """A tiny transformers BERT saved twice (unprefixed and ``bert.``-prefixed); its config and state."""
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertModel as HFBert

    cfg = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, type_vocab_size=2,
                     position_embedding_type="absolute")
    torch.manual_seed(0)
    state = {k: v.detach().contiguous() for k, v in HFBert(cfg).state_dict().items()}
    paths = {}
    for label, pre in (("unprefixed", ""), ("bert.-prefixed", "bert.")):
        d = os.path.join(directory, label.replace(".", ""))
        os.makedirs(d)
        save_file({pre + k: v for k, v in state.items()}, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        paths[label] = d
    return cfg, state, paths


def probe(ctx: Any) -> ProbeResult:
    import tempfile

    import torch

    fb = sys.modules[MODULE]
    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory(prefix="hfpatches-probe-") as tmp:
        cfg, state, paths = _tiny_checkpoints(tmp)
        qkv = torch.cat([state[f"encoder.layer.0.attention.self.{p}.weight"] for p in ("query", "key", "value")])
        for label, path in paths.items():
            try:
                model = fb.BertModel.from_pretrained(path, cfg)
            except KeyError as e:
                return ProbeResult(True, f"{label} checkpoint: KeyError {e}")
            arrived = (torch.equal(model.embeddings.word_embeddings.weight, state[ANCHOR])
                       and torch.equal(model.encoder.layers[0].mixer.Wqkv.weight, qkv))
            if not arrived:
                return ProbeResult(True, f"{label} checkpoint into BertModel: weights did not arrive (random init)")
    return ProbeResult(False, "unprefixed and bert.-prefixed checkpoints both load into BertModel")


def check(ctx: Any) -> str | None:
    fb = sys.modules[MODULE]
    for name in ("remap_state_dict", "state_dict_from_pretrained", "BertModel"):
        if not hasattr(fb, name):
            return f"{MODULE}.{name} not found (the patch reuses it)"
    return None


def apply(ctx: Any) -> None:
    fb = ctx.module(MODULE)
    ctx.wrap(fb.BertPreTrainedModel, "from_pretrained", _from_pretrained)
