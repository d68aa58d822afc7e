"""``hfpatches.peft_state_dict``: translate between PEFT-wrapped and plain state-dict keys.

PEFT renames a model's weights when it wraps it (``get_peft_model``):

* everything moves under ``base_model.model.`` (keys of a model that *holds* a PeftModel, e.g.
  a flair embedding, keep their own outer part: ``embeddings.model.base_model.model.…``);
* a wrapped layer (LoRA and the other tuners built on ``BaseTunerLayer``) keeps its original
  weight under ``<layer>.base_layer.`` and adds adapter weights ``<layer>.<attr>.<adapter>…``
  (``lora_A.default.weight``, ``lora_embedding_B.default``, ``lora_magnitude_vector.default…``);
* a ``modules_to_save`` module keeps the original under ``<m>.original_module.`` and one trained
  copy per adapter under ``<m>.modules_to_save.<adapter>.``.

``peft_state_dict(sd, to="plain")`` undoes that (adapter weights dropped, the original modules
kept: what peft's own ``get_base_model_state_dict`` returns); with ``merge=True`` LoRA is folded
into the base weights (``W + scale * B @ A``, the scale from the config) and the trained
``modules_to_save`` copies replace the originals, so that a plain transformers model loads the
result strictly and computes what the PEFT model computed (peft's ``merge_and_unload()`` does
the same to a live model). ``to="peft"`` goes the other way, from a plain state dict and the
PEFT config (which layers are wrapped); adapter weights can be passed in with ``adapters=``.

Delegation. peft releases that carry huggingface/peft PR #3000 (0.21.2 does, 0.15.2 does not)
have ``get_base_model_state_dict(model)`` / ``set_base_model_state_dict(model, sd)``. They work
on a live ``PeftModel`` (they walk its modules, which also resolves a layer that is *really*
called ``base_layer``). Where they exist and a model is given, they are used: ``to="plain"``
from a PeftModel returns peft's ``get_base_model_state_dict``; ``to="peft"`` with a PeftModel as
``config`` places every key where peft's own mapping puts it. The string translation below is
used for older peft and for bare state dicts (a file on disk has no model to walk); the tests
check that both paths agree on real models. The rules of which modules a config wraps are
peft's own (``check_target_module_exists``, ``get_pattern_key``), imported, not re-implemented.

Limits (said, not hidden): ``merge=True`` folds LoRA on linear, ``Conv1D`` (``fan_in_fan_out``)
and embedding layers, with ``use_rslora``, ``rank_pattern``/``alpha_pattern`` and ``lora_bias``
(the B bias folded *scaled*, as the forward computes it; peft 0.15.x's own merge adds it unscaled,
huggingface/peft#2486, fixed by #2489);
DoRA, convolutional LoRA and other tuners raise :class:`hfpatches.errors.CheckpointError`
naming the key (use peft's ``merge_and_unload()`` on the live model for those). Without a
model, a layer of the original architecture literally named ``base_layer``, ``original_module``
or ``modules_to_save`` cannot be told from PEFT's infix (pass the PeftModel then).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

from .errors import CheckpointError

__all__ = ["peft_state_dict", "PEFT_ROOT", "parse_peft_keys"]

#: where PEFT puts the original model inside its wrapper
PEFT_ROOT = "base_model.model."
_ROOT_RE = re.compile(r"(?:^|(?<=\.))base_model\.model\.")
_TUNER = "base_layer"
_SAVE_ORIG = "original_module"
_SAVE_COPY = "modules_to_save"
# heads that peft adds to ``modules_to_save`` by itself, per task type (PeftModelFor<Task>.__init__)
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
               "QUESTION_ANS": ("qa_outputs",)}


class Entry:
    """One key of a PEFT-wrapped state dict, classified.

    ``kind``: ``outside`` (no ``base_model.model.`` in the key: not inside a PeftModel),
    ``base`` (a weight of the original model, maybe under ``base_layer``), ``adapter`` (a tuner
    weight: ``attr`` e.g. ``lora_A``, ``adapter`` its name), ``original`` (``original_module`` of
    a modules_to_save wrapper), ``copy`` (a trained ``modules_to_save.<adapter>`` copy).
    ``plain``: the key in the unwrapped model (None for adapter weights); ``module``: the wrapped
    module's key in the unwrapped model (outer part included); ``rel_module``: the same relative
    to the transformers model (what peft's config patterns match against).
    """

    __slots__ = ("key", "kind", "plain", "module", "rel_module", "attr", "adapter", "tail")

    def __init__(self, key, kind, plain, module=None, rel_module=None, attr=None, adapter=None, tail=""):
        self.key, self.kind, self.plain, self.module, self.rel_module = key, kind, plain, module, rel_module
        self.attr, self.adapter, self.tail = attr, adapter, tail

    def __repr__(self) -> str:
        return f"Entry({self.key!r}, {self.kind}, plain={self.plain!r}, attr={self.attr!r}, adapter={self.adapter!r})"


def _split_root(key: str) -> tuple[str, str] | None:
    m = _ROOT_RE.search(key)
    return None if m is None else (key[:m.start()], key[m.end():])


def parse_peft_keys(keys) -> list[Entry]:
    """Classify every key (strings only: nothing is imported, no tensor is touched)."""
    split = {k: _split_root(k) for k in keys}
    tuners: set[tuple[str, tuple[str, ...]]] = set()
    savers: set[tuple[str, tuple[str, ...]]] = set()
    for k, s in split.items():
        if s is None:
            continue
        outer, rel = s
        segs = rel.split(".")
        for i, seg in enumerate(segs[:-1]):
            if seg == _TUNER and i:
                tuners.add((outer, tuple(segs[:i])))
            elif seg in (_SAVE_ORIG, _SAVE_COPY) and i:
                savers.add((outer, tuple(segs[:i])))
    out = []
    for k, s in split.items():
        if s is None:
            out.append(Entry(k, "outside", k))
            continue
        outer, rel = s
        out.append(_classify(k, outer, rel.split("."), tuners, savers))
    return out


def _strip(outer: str, segs: list[str], tuners) -> str:
    """Drop ``base_layer`` infixes of (possibly nested) tuner-wrapped modules."""
    kept: list[str] = []
    for i, seg in enumerate(segs):
        if seg == _TUNER and (outer, tuple(segs[:i])) in tuners:
            continue
        kept.append(seg)
    return ".".join(kept)


def _classify(key: str, outer: str, segs: list[str], tuners, savers) -> Entry:
    for i in range(1, len(segs)):
        prefix = tuple(segs[:i])
        nxt = segs[i]
        if (outer, prefix) in savers and nxt in (_SAVE_ORIG, _SAVE_COPY):
            rel_module = ".".join(prefix)
            if nxt == _SAVE_ORIG:
                rest = _strip(outer, segs[i + 1:], tuners)
                return Entry(key, "original", f"{outer}{rel_module}.{rest}", outer + rel_module, rel_module)
            name, rest = segs[i + 1], ".".join(segs[i + 2:])
            return Entry(key, "copy", f"{outer}{rel_module}.{rest}", outer + rel_module, rel_module,
                         attr=_SAVE_COPY, adapter=name, tail=rest)
        if (outer, prefix) in tuners and nxt != _TUNER:
            rel_module = ".".join(prefix)
            tail = segs[i + 1:]
            # ``lora_A.<adapter>.weight`` (ModuleDict) or ``lora_embedding_A.<adapter>`` (ParameterDict)
            return Entry(key, "adapter", None, outer + rel_module, rel_module, attr=nxt,
                         adapter=tail[0] if tail else None, tail=".".join(tail[1:]))
    return Entry(key, "base", outer + _strip(outer, segs, tuners))


# ----------------------------------------------------------------------------- helpers
def _is_peft_model(obj) -> bool:
    return not isinstance(obj, Mapping) and hasattr(obj, "peft_config") and hasattr(obj, "base_model")


def _peft_fn(name: str):
    """peft's function ``name`` where this peft has it (None otherwise, or without peft)."""
    try:
        import peft
    except ImportError:
        return None
    return getattr(peft, name, None)


def _as_config(config, adapter_name: str):
    """A PeftConfig object from a PeftConfig, a dict (``LoraConfig.to_dict()`` / adapter_config.json),
    ``{adapter: config}`` or a PeftModel."""
    if config is None:
        return None
    if _is_peft_model(config):
        cfgs = config.peft_config
        if adapter_name not in cfgs:
            raise CheckpointError(f"the PeftModel has no adapter {adapter_name!r} (it has {', '.join(cfgs)})")
        return cfgs[adapter_name]
    if isinstance(config, Mapping):
        if "peft_type" not in config and adapter_name in config:
            return _as_config(config[adapter_name], adapter_name)
        from peft import get_peft_config

        return get_peft_config(dict(config))
    return config


def _cfg(config, name: str, default=None):
    return getattr(config, name, default) if config is not None else default


def _pattern_value(patterns, rel_module: str, default):
    """``rank_pattern`` / ``alpha_pattern`` lookup with peft's own matcher."""
    if not patterns:
        return default
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(list(patterns), rel_module)
    return patterns.get(key, default)


# ----------------------------------------------------------------------------- to plain
def _to_plain(sd: Mapping, *, merge: bool, adapter_name: str, config) -> dict:
    entries = parse_peft_keys(sd.keys())
    copies = {e.module for e in entries if e.kind == "copy" and e.adapter == adapter_name}
    out: dict = {}
    adapters: dict[str, dict[str, dict]] = {}
    names = {e.adapter for e in entries if e.kind in ("adapter", "copy") and e.adapter is not None}

    def put(key, value, src):
        if key in out and out[key] is not value:
            raise CheckpointError(f"two keys map to {key!r} (the second is {src!r}): not a PEFT state dict "
                                  "this translation understands (peft < 0.16 wraps a layer inside a "
                                  "modules_to_save module twice; translate such a model with peft itself)")
        out[key] = value

    for e in entries:
        v = sd[e.key]
        if e.kind in ("outside", "base"):
            put(e.plain, v, e.key)
        elif e.kind == "original":
            if not (merge and e.module in copies):
                put(e.plain, v, e.key)
        elif e.kind == "copy":
            if merge and e.adapter == adapter_name:
                put(e.plain, v, e.key)
        elif e.kind == "adapter" and merge and e.adapter == adapter_name:
            adapters.setdefault(e.module, {"rel": e.rel_module}).setdefault(e.attr, {})[e.tail] = (e.key, v)
    if merge:
        if names and adapter_name not in names:
            raise CheckpointError(f"merge=True: no adapter named {adapter_name!r} in the state dict "
                                  f"(found {', '.join(sorted(names))}); pass adapter_name=")
        if adapters:
            if config is None:
                raise CheckpointError("merge=True needs the LoRA config (config=LoraConfig(...) or the PeftModel): "
                                      "lora_alpha, hence the scale, is not stored in the weights")
            for module, parts in adapters.items():
                _fold(out, module, parts, config)
    return out


def _fold(out: dict, module: str, parts: dict, config) -> None:
    """``W + scale * delta`` for one LoRA-wrapped module, computed in float32 and stored in W's dtype
    (new tensors: the input's are never modified)."""
    rel = parts.pop("rel")
    attrs = set(parts)
    any_key = next(iter(next(iter(parts.values())).values()))[0]
    if "lora_magnitude_vector" in attrs:
        raise CheckpointError(f"merge=True: {any_key} is DoRA (lora_magnitude_vector); folding it needs the live "
                              "layer: use peft's merge_and_unload() on the PeftModel")
    if attrs == {"lora_A", "lora_B"}:
        a, b = parts["lora_A"].get("weight"), parts["lora_B"].get("weight")
        if a is None or b is None or a[1].dim() != 2:
            raise CheckpointError(f"merge=True: {any_key} is not a linear LoRA pair (convolutional LoRA is not "
                                  "folded here: use peft's merge_and_unload())")
        A, B = a[1], b[1]
        delta = B.float() @ A.float()
        if _cfg(config, "fan_in_fan_out", False):
            delta = delta.T
    elif attrs == {"lora_embedding_A", "lora_embedding_B"}:
        A, B = parts["lora_embedding_A"][""][1], parts["lora_embedding_B"][""][1]
        delta = (B.float() @ A.float()).T
    else:
        raise CheckpointError(f"merge=True folds LoRA only; {any_key} belongs to {', '.join(sorted(attrs))}: "
                              "use peft's merge_and_unload() on the live model")
    r = A.shape[0]
    alpha = _pattern_value(_cfg(config, "alpha_pattern"), rel, _cfg(config, "lora_alpha", 8))
    scale = alpha / (r ** 0.5) if _cfg(config, "use_rslora", False) else alpha / r
    target = f"{module}.weight"
    w = out.get(target)
    if w is None or tuple(w.shape) != tuple(delta.shape):
        raise CheckpointError(f"merge=True: {target} is {None if w is None else tuple(w.shape)}, the LoRA delta of "
                              f"{any_key} is {tuple(delta.shape)}")
    out[target] = (w.float() + scale * delta).to(w.dtype)
    bias = parts.get("lora_B", {}).get("bias")
    if bias is not None:  # lora_bias=True: the B layer has a bias, folded into the base bias
        bkey = f"{module}.bias"
        if bkey not in out:
            raise CheckpointError(f"merge=True: {bias[0]} (lora_bias) but the base layer has no {bkey}")
        out[bkey] = (out[bkey].float() + scale * bias[1].float()).to(out[bkey].dtype)


# ----------------------------------------------------------------------------- to peft
def _modules_to_save(config) -> tuple[str, ...]:
    names = list(_cfg(config, "modules_to_save") or ())
    task = _cfg(config, "task_type")
    task = getattr(task, "value", task)
    for head in _TASK_HEADS.get(str(task), ()):
        if head not in names:
            names.append(head)
    return tuple(names)


def _own_peft_map(keys, config, root: str) -> dict[str, str]:
    """plain key -> PEFT key, from the config (peft's own matching rules)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = _cfg(config, "target_modules")
    if targets is None or targets == "all-linear":
        raise CheckpointError(f"config.target_modules is {targets!r}: which layers are wrapped depends on the model "
                              "(peft resolves it in get_peft_model); pass the PeftModel as config=")
    if _cfg(config, "target_parameters"):
        raise CheckpointError("config.target_parameters (peft ParamWrapper) is not translated here; pass the PeftModel")
    saves = _modules_to_save(config)
    out: dict[str, str] = {}
    for key in keys:
        if not key.startswith(root):
            out[key] = key
            continue
        rel = key[len(root):]
        module, _, param = rel.rpartition(".")
        segs = module.split(".") if module else []
        placed = None
        for i in range(1, len(segs) + 1):  # the outermost module that modules_to_save names
            anc = ".".join(segs[:i])
            if any(anc.endswith(n) for n in saves):
                placed = f"{anc}.{_SAVE_ORIG}.{rel[len(anc) + 1:]}"
                break
        if placed is None and module and check_target_module_exists(config, module):
            placed = f"{module}.{_TUNER}.{param}"
        out[key] = f"{root}{PEFT_ROOT}{placed if placed is not None else rel}"
    return out


def _peft_map_from_model(model, keys, adapter_name: str) -> dict[str, str]:
    """plain key -> PEFT key, where peft itself puts it.

    New peft: ``get_base_model_state_dict(model)`` gives {plain key: tensor}; each tensor is a
    view of one of the model's own state-dict tensors, which names its PEFT key (tied weights:
    several candidates, the one whose translation is that plain key). Older peft: the string
    translation with the model's config, checked against the model's own keys."""
    full = model.base_model.model.state_dict()
    get_base = _peft_fn("get_base_model_state_dict")
    if get_base is not None:
        by_storage: dict[tuple, list[str]] = {}
        for k, t in full.items():
            by_storage.setdefault(_storage_id(t), []).append(k)
        mapping: dict[str, str] = {}
        for plain, t in get_base(model).items():
            cands = by_storage.get(_storage_id(t), [])
            if len(cands) != 1:
                named = {e.key: e.plain for e in parse_peft_keys(PEFT_ROOT + c for c in cands)}
                cands = [c for c in cands if named.get(PEFT_ROOT + c) == plain]
            if len(cands) != 1:
                raise CheckpointError(f"cannot place {plain!r} in the PeftModel (candidates: {cands})")
            mapping[plain] = PEFT_ROOT + cands[0]
    else:
        mapping = _own_peft_map(
            [e.plain for e in parse_peft_keys(PEFT_ROOT + k for k in full) if e.kind in ("base", "original")],
            _as_config(model, adapter_name), "")
        known = {PEFT_ROOT + k for k in full}
        wrong = [p for p in mapping.values() if p not in known]
        if wrong:
            raise CheckpointError(f"the config's mapping does not match the PeftModel: {wrong[:5]}")
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise CheckpointError(f"{len(missing)} key(s) have no place in the PeftModel, e.g. {missing[:5]}")
    return mapping


def _storage_id(t) -> tuple:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device) if t.numel() else (id(t),)


def _to_peft(sd: Mapping, *, config, adapter_name: str, adapters, root: str) -> dict:
    if config is None:
        raise CheckpointError("to='peft' needs config= (the PeftConfig, its dict, or the PeftModel): it says which "
                              "layers are wrapped")
    if _is_peft_model(config) and not root:
        mapping = _peft_map_from_model(config, sd.keys(), adapter_name)
    else:
        mapping = _own_peft_map(sd.keys(), _as_config(config, adapter_name), root)
    out = {mapping[k]: v for k, v in sd.items()}
    if adapters:
        # a module counts as wrapped once its base weights moved under base_layer / original_module
        wrapped = {m for m in (_wrapped_module(k) for k in out) if m}
        for e in parse_peft_keys(adapters.keys()):
            if e.kind not in ("adapter", "copy"):
                continue
            if e.module not in wrapped:
                raise CheckpointError(f"adapter weight {e.key!r}: the config does not wrap {e.module!r}")
            out[e.key] = adapters[e.key]
        out = _peft_order(out)
    return out


def _wrapped_module(peft_key: str) -> str | None:
    s = _split_root(peft_key)
    if s is None:
        return None
    outer, rel = s
    segs = rel.split(".")
    for i, seg in enumerate(segs[:-1]):
        if seg in (_TUNER, _SAVE_ORIG) and i:
            return outer + ".".join(segs[:i])
    return None


def _peft_order(sd: dict) -> dict:
    """Adapter weights right after their module's base weights (peft's own order)."""
    entries = parse_peft_keys(sd.keys())
    extra: dict[str, list[str]] = {}
    for e in entries:
        if e.kind in ("adapter", "copy"):
            extra.setdefault(e.module, []).append(e.key)
    last: dict[str, str] = {}
    for e in entries:
        if e.kind in ("base", "original"):
            m = _wrapped_module(e.key)
            if m in extra:
                last[m] = e.key
    out: dict = {}
    for e in entries:
        if e.kind in ("adapter", "copy"):
            continue
        out[e.key] = sd[e.key]
        m = _wrapped_module(e.key)
        if m is not None and last.get(m) == e.key:
            for k in extra.pop(m):
                out[k] = sd[k]
    for keys in extra.values():
        for k in keys:
            out[k] = sd[k]
    return out


# ----------------------------------------------------------------------------- public
def peft_state_dict(state_dict, to: str = "plain", *, merge: bool = False, adapter_name: str = "default",
                    config=None, adapters: Mapping | None = None, root: str = "") -> dict:
    """Translate a state dict between PEFT-wrapped keys and the plain model's keys.

    state_dict
        A mapping (a ``state_dict()``, a loaded file), or for ``to="plain"`` a ``PeftModel``.
    to
        ``"plain"``: PEFT keys -> the unwrapped model's keys. Adapter weights are dropped and the
        ``original_module`` of a modules_to_save wrapper is kept (peft's
        ``get_base_model_state_dict`` semantics), unless ``merge=True``: then the adapter
        ``adapter_name`` is folded in (LoRA: ``W + scale * B @ A``) and its ``modules_to_save``
        copies replace the originals, so a plain model computes what the PEFT model computed.
        Keys outside the PeftModel (no ``base_model.model.`` in them, e.g. a flair head) pass
        through unchanged; an outer part before ``base_model.model.`` is kept.
        ``"peft"``: plain keys -> PEFT keys. Needs ``config`` (a PeftConfig, its dict, or the
        PeftModel, whose layout is then peft's own). ``root``: the outer part of the keys that
        belong to the transformers model (``"embeddings.model."`` for a flair model); keys not
        starting with it pass through. ``adapters``: a mapping holding adapter weights in PEFT
        form (with the adapter name, e.g. another PEFT state dict): they are inserted, so that
        ``peft_state_dict(peft_state_dict(S), "peft", config=c, adapters=S) == S``.
    merge
        ``to="plain"`` only; needs the LoRA config (``config=``, or the PeftModel itself).
    adapter_name
        The adapter to fold (``merge=True``) and whose config to use.

    Returns a new dict; its tensors are the input's own objects except the merged ones (new).
    Raises :class:`hfpatches.errors.CheckpointError` for what it cannot translate faithfully.
    """
    if to not in ("plain", "peft"):
        raise ValueError(f"to={to!r}: use 'plain' or 'peft'")
    if to == "peft":
        if merge:
            raise ValueError("merge=True only makes sense with to='plain'")
        if _is_peft_model(state_dict):
            raise TypeError("to='peft' translates a plain mapping; pass the PeftModel as config= (the layout)")
        return _to_peft(state_dict, config=config, adapter_name=adapter_name, adapters=adapters, root=root)
    if _is_peft_model(state_dict):
        model = state_dict
        cfg = _as_config(config if config is not None else model, adapter_name)
        if _cfg(cfg, "is_prompt_learning", False):  # prompt learning leaves the model's own keys alone
            if merge:
                raise CheckpointError("merge=True: a prompt-learning adapter has no weights to fold into the model")
            return dict(model.base_model.state_dict())
        full = {PEFT_ROOT + k: v for k, v in model.base_model.model.state_dict().items()}
        get_base = _peft_fn("get_base_model_state_dict")
        if get_base is None:
            return _to_plain(full, merge=merge, adapter_name=adapter_name, config=cfg)
        if not merge:
            return dict(get_base(model))
        # peft's base weights, then the fold (LoRA math, modules_to_save copies) on top of them
        base = dict(get_base(model))
        plain = _to_plain(full, merge=False, adapter_name=adapter_name, config=cfg)
        merged = _to_plain(full, merge=True, adapter_name=adapter_name, config=cfg)
        if set(plain) != set(base):
            raise CheckpointError("peft's get_base_model_state_dict and the key translation disagree on "
                                  f"{sorted(set(plain) ^ set(base))[:5]}")
        base.update({k: v for k, v in merged.items() if v is not plain[k]})
        return base
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping or a PeftModel, not {type(state_dict).__name__}")
    return _to_plain(state_dict, merge=merge, adapter_name=adapter_name, config=_as_config(config, adapter_name))

