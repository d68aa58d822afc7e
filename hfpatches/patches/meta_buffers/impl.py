"""Implementation of ``meta_buffers`` (declared in ``__init__.py``; rationale in docs/patches/meta_buffers.md)."""
from __future__ import annotations

import functools
from typing import Any

from hfpatches._declare import ProbeResult

from . import PATCH
from .recording import _Recording

__all__ = ["UninitialisedBufferWarning", "materialize"]

PATCH_ID = PATCH.id
_LOGGER = f"hfpatches.{PATCH_ID}"   # ctx.log's name: the recording runs outside apply(ctx)


class UninitialisedBufferWarning(RuntimeWarning):
    """``to_empty`` left non-persistent buffers uninitialised that hfpatches could not recompute.
    A Python warning (shown by default, ``-W error`` turns it into an error), not only a log line:
    the ``hfpatches`` logger is silent unless logging is configured."""


def _logger():
    import logging

    return logging.getLogger(_LOGGER)


# ----------------------------------------------------------------------------- scan
def _with_np_buffers(root, recurse: bool) -> list:
    """Modules in ``to_empty``'s scope that own non-persistent buffers (the fast path: one set
    check per module, the same traversal ``_apply`` makes)."""
    if not recurse:
        return [root] if getattr(root, "_non_persistent_buffers_set", None) else []
    found, stack = [], [root]
    for m in stack:  # the list grows while we walk it
        if m is None:
            continue
        if m._non_persistent_buffers_set:
            found.append(m)
        stack += m._modules.values()
    return found


def _plan(modules) -> tuple[list, list]:
    """``(keep, recompute)``: real buffers to copy back ``(module, name, old)``, and meta ones
    ``(module, name)``. A module reached twice (shared) is listed once."""
    keep, meta, seen = [], [], set()
    for m in modules:
        if id(m) in seen:
            continue
        seen.add(id(m))
        bufs = m._buffers
        for name in m._non_persistent_buffers_set:
            t = bufs.get(name)
            if t is None:
                continue
            if t.is_meta:
                meta.append((m, name))
            else:
                keep.append((m, name, t))
    return keep, meta


# ----------------------------------------------------------------------------- the replacement
def _to_empty(original, module, device, recurse: bool, *, explicit: bool = False) -> dict | None:
    """Call torch's ``to_empty`` and restore the non-persistent buffers it emptied.

    Returns None on the fast path (nothing to restore), else a summary
    ``{"kept": [...], "recomputed": {name: recipe}, "uninitialised": [...]}``.
    """
    found = _with_np_buffers(module, recurse)
    if not found:
        original(module, device=device, recurse=recurse)
        return None
    keep, meta = _plan(found)
    original(module, device=device, recurse=recurse)
    import torch

    copies = []
    for m, name, old in keep:
        bufs = m._buffers
        new = bufs.get(name)
        if new is None or new is old or new.is_meta:
            continue
        if new.device == old.device and new.dtype == old.dtype:
            bufs[name] = old  # already where it should be: keep it (no copy, aliases preserved)
        else:
            copies.append((new, old))
    if copies:
        with torch.no_grad():
            for new, old in copies:
                new.copy_(old)
    info: dict[str, Any] = {"kept": keep, "recomputed": {}, "uninitialised": []}
    meta = [(m, n) for m, n in meta if m._buffers.get(n) is not None and not m._buffers[n].is_meta]
    if meta:
        _recompute(module, meta, info)
    if info["uninitialised"]:
        import warnings

        left = info["uninitialised"]
        warnings.warn(
            f"to_empty(device={str(device)!r}) on {type(module).__name__} left {len(left)} non-persistent "
            f"buffer(s) uninitialised: {', '.join(left)}. They were on the meta device, are not in any "
            "state dict, and hfpatches has no recipe to recompute them. Set them yourself before use, or "
            "build the model with buffers on a real device (accelerate.init_empty_weights("
            "include_buffers=False)) so to_empty keeps their values.", UninitialisedBufferWarning, stacklevel=3)
    if explicit or info["recomputed"]:
        _logger().log(20 if explicit else 10, "to_empty(device=%r) on %s: kept %d non-persistent buffer(s), "
                      "recomputed %d%s", str(device), type(module).__name__, len(keep), len(info["recomputed"]),
                      "".join(f"; {k} via {v}" for k, v in info["recomputed"].items()))
    return info


def materialize(model, device, *, recurse: bool = True):
    """``model.to_empty(device=device, recurse=recurse)`` that keeps non-persistent buffers.

    Works whether or not the ``meta_buffers`` patch is applied: buffers holding data keep it,
    buffers on ``meta`` are recomputed (see this module's docstring), anything that cannot be is
    named in one ``UninitialisedBufferWarning``; a summary is logged at INFO. Then load the state
    dict (and ``model.tie_weights()``) as usual. Returns ``model``.
    """
    _to_empty(_original_to_empty(), model, device, recurse, explicit=True)
    return model


def _original_to_empty():
    """torch's own ``Module.to_empty``: the installed one, unwrapped if it is this patch's
    replacement (``apply`` marks it with this module's name and ``__wrapped__``)."""
    import torch

    fn = torch.nn.Module.__dict__["to_empty"]
    while getattr(fn, "__module__", None) == __name__ and hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


# ----------------------------------------------------------------------------- recipes
def _pretrained_cls():
    import sys

    mu = sys.modules.get("transformers.modeling_utils")
    return getattr(mu, "PreTrainedModel", None)


def _own_class(m: Any) -> Any:
    """The module's own class: FSDP2 swaps in a subclass from ``torch.distributed``; skip it."""
    return next(c for c in type(m).__mro__ if not c.__module__.startswith("torch.distributed"))


def _owners(root) -> dict:
    """id(module) -> (qualified name relative to root, (owner PreTrainedModel, its prefix) or None).
    The owner is the outermost PreTrainedModel above (or equal to) the module."""
    pt = _pretrained_cls()
    out: dict = {}
    stack: list[tuple[Any, str, tuple[Any, str] | None]] = [(root, "", None)]
    while stack:
        m, name, owner = stack.pop()
        if m is None or id(m) in out:
            continue
        if owner is None and pt is not None and isinstance(m, pt):
            owner = (m, name)
        out[id(m)] = (name, owner)
        stack.extend((c, f"{name}.{k}" if name else k, owner) for k, c in m._modules.items())
    return out


def _recompute(root, meta: list, info: dict) -> None:
    owners = _owners(root)
    by_module: dict = {}
    for m, n in meta:
        by_module.setdefault(id(m), (m, []))[1].append(n)
    rebuilt: dict = {}
    for m, names in by_module.values():
        qual, owner = owners.get(id(m), ("", None))
        values: dict = {}
        recipes = []  # the module's own (cheap, from the config it holds) first, then the owner's
        if owner is None or owner[0] is not m:
            recipes += [("class constructor", _via_constructor), ("position/token_type ids", _via_ids)]
        if owner is not None:
            rel = qual[len(owner[1]) + 1:] if owner[1] else qual
            recipes.append(("rebuild from config", functools.partial(_via_owner, owner[0], rel, rebuilt)))
        for label, recipe in recipes:
            todo = [n for n in names if n not in values]
            if not todo:
                break
            try:
                got = recipe(m, todo)
            except Exception as e:  # noqa: BLE001 - a recipe that cannot run is just not the one
                _logger().debug("recipe %s for %s failed: %s: %s", label, qual or type(m).__name__, type(e).__name__, e)
                continue
            for n, v in got.items():
                target = m._buffers[n]
                if (v is not None and not v.is_meta and tuple(v.shape) == tuple(target.shape)
                        and v.dtype == target.dtype):
                    values[n] = (v, label)
        import torch

        with torch.no_grad():
            for n in sorted(names):
                full = f"{qual}.{n}" if qual else f"{type(m).__name__}.{n}"
                if n in values:
                    m._buffers[n].copy_(values[n][0])
                    info["recomputed"][full] = values[n][1]
                else:
                    info["uninitialised"].append(full)
        _fix_rope_alias(m)


def _fix_rope_alias(m) -> None:
    """transformers 4.x rotary modules keep ``original_inv_freq`` as a plain attribute aliasing
    ``inv_freq`` (``__init__``); left on meta it breaks dynamic RoPE. Re-alias it."""
    alias = m.__dict__.get("original_inv_freq")
    inv = m._buffers.get("inv_freq")
    if alias is not None and getattr(alias, "is_meta", False) and inv is not None and not inv.is_meta:
        m.__dict__["original_inv_freq"] = inv


def _take(skeleton_module: Any, m: Any, names: list[str], replay: Any) -> dict:
    """The buffers ``names`` of the rebuilt counterpart of ``m``, only where the counterpart is the
    same class and holds each as a non-persistent buffer (anything the user changed is refused)."""
    if skeleton_module is None or type(skeleton_module) is not _own_class(m):
        return {}
    bufs = skeleton_module._buffers
    want = [bufs[n] for n in names if bufs.get(n) is not None and n in skeleton_module._non_persistent_buffers_set]
    real = replay(want)
    return {n: real.get(id(bufs[n])) for n in names if bufs.get(n) is not None and id(bufs[n]) in real}


def _via_owner(owner: Any, rel: str, cache: dict, m: Any, names: list[str]) -> dict:
    """The "rebuild from config" recipe bound to one owner (``functools.partial``)."""
    return _via_rebuild(owner, rel, m, names, cache)


def _via_rebuild(owner, rel: str, m, names, cache: dict) -> dict:
    """The owning ``PreTrainedModel`` rebuilt from its config, in this thread only, with every
    tensor on meta while its construction is recorded; the wanted buffers are then replayed on the
    CPU (see ``_Recording``). Built once per ``to_empty`` call."""
    key = id(owner)
    if key not in cache:
        cache[key] = None
        cls, config = _own_class(owner), owner.config
        cache[key] = _Recording.of(lambda: cls(config))
    rec = cache[key]
    if rec is None:
        return {}
    try:
        sub = rec.result.get_submodule(rel) if rel else rec.result
    except AttributeError:
        return {}
    return _take(sub, m, names, rec.replay)


def _via_constructor(m, names) -> dict:
    """``type(m)(m.config)``, recorded and replayed like the rebuild, only for a transformers class
    whose constructor takes nothing but ``config`` (and ``device``, which only places tensors), so
    the module's buffers are a function of the config it holds. Anything else (a user class, a
    constructor argument the module does not keep, such as ModernBERT 4.x's rotary ``base``) is
    not guessed: the buffer is named in the warning."""
    import inspect
    import sys

    cls = _own_class(m)
    config = m.__dict__.get("config")
    cu = sys.modules.get("transformers.configuration_utils")
    cfg_cls = getattr(cu, "PreTrainedConfig", None) or getattr(cu, "PretrainedConfig", None)
    if (not cls.__module__.startswith("transformers.") or cfg_cls is None or not isinstance(config, cfg_cls)
            or (_pretrained_cls() is not None and isinstance(m, _pretrained_cls()))):
        return {}
    init: Any = cls.__init__
    params = list(inspect.signature(init).parameters.values())[1:]
    if not params or params[0].name != "config" or any(
            p.name != "device" or p.default is not None for p in params[1:]):
        return {}
    rec = _Recording.of(lambda: cls(config))
    return _take(rec.result, m, names, rec.replay)


# What transformers' BERT-style embeddings (BertEmbeddings, RobertaEmbeddings, ... on 4.x and 5.x)
# register in __init__, as their source spells it (whitespace ignored).
_IDS_SOURCE = {"position_ids": "torch.arange(config.max_position_embeddings).expand((1,-1))",
               "token_type_ids": "torch.zeros(self.position_ids.size(),dtype=torch.long)"}


def _via_ids(m, names) -> dict:
    """BERT-style ``position_ids`` (0..N-1) / ``token_type_ids`` (zeros) of a module that keeps no
    config to rebuild it from (per-module materialisation). Only for a transformers class whose own
    ``__init__`` registers the buffer with exactly the expression in ``_IDS_SOURCE``, and only while
    the buffer still has the shape that expression gives, ``(1, position_embeddings.num_embeddings)``,
    and dtype int64: a buffer the user registered in its place (another length, another class) is
    not guessed."""
    import inspect

    import torch

    cls = _own_class(m)
    pe = m._modules.get("position_embeddings")
    n = getattr(pe, "num_embeddings", None)
    if not cls.__module__.startswith("transformers.") or not isinstance(n, int):
        return {}
    init: Any = cls.__init__
    src = "".join(inspect.getsource(init).split())
    out = {}
    for name in names:
        t = m._buffers[name]
        if (name in _IDS_SOURCE and _IDS_SOURCE[name] in src and (f'"{name}"' in src or f"self.{name}=" in src)
                and tuple(t.shape) == (1, n) and t.dtype == torch.long):
            out[name] = torch.arange(n).expand((1, -1)) if name == "position_ids" else torch.zeros((1, n), dtype=torch.long)
    return out


# ----------------------------------------------------------------------------- probe / apply
_probe_calls = 0


def probe(ctx: Any) -> ProbeResult:
    import torch

    global _probe_calls
    _probe_calls += 1  # a new pattern each call: a freed block of an earlier probe cannot pass for kept
    m = torch.nn.Module()
    want = torch.arange(64, dtype=torch.float64) + (_probe_calls * 1000.25 + 7.0)
    m.register_buffer("probe", want.clone(), persistent=False)
    m.to_empty(device="cpu")
    got: Any = m.probe
    kept = torch.equal(got, want)
    return ProbeResult(not kept, "a non-persistent buffer's values after Module.to_empty(device='cpu'): "
                       + ("kept" if kept else "lost (uninitialised memory)"))


def apply(ctx: Any) -> None:
    import functools

    module_cls = ctx.module("torch.nn.modules.module").Module
    original = module_cls.__dict__["to_empty"]

    def to_empty(self, *, device, recurse=True):
        _to_empty(original, self, device, recurse)
        return self

    functools.update_wrapper(to_empty, original)
    to_empty.__module__ = __name__
    ctx.replace(module_cls, "to_empty", to_empty)
