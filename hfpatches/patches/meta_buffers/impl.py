"""Implementation of ``meta_buffers`` (declared in ``__init__.py``; rationale in docs/patches/meta_buffers.md)."""
from __future__ import annotations

from hfpatches._declare import ProbeResult

__all__ = ["materialize", "UninitialisedBufferWarning"]

# Attach once ``torch`` has finished importing (see "Design decisions").
_LOGGER = "hfpatches.meta_buffers"
_ROPE_NAMES = ("inv_freq", "original_inv_freq")


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
    info = {"kept": keep, "recomputed": {}, "uninitialised": []}
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


def _owners(root) -> dict:
    """id(module) -> (qualified name relative to root, (owner PreTrainedModel, its prefix) or None).
    The owner is the outermost PreTrainedModel above (or equal to) the module."""
    pt = _pretrained_cls()
    out: dict = {}
    stack = [(root, "", None)]
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
        recipes = []
        if owner is not None:
            recipes.append(("_init_weights", lambda m, names: _via_init_weights(owner[0], m, names)))
        recipes += [("rotary init function", _via_rope), ("position/token_type ids", _via_ids)]
        if owner is not None:
            rel = qual[len(owner[1]) + 1:] if owner[1] else qual
            recipes.append(("rebuild from config",
                            lambda m, names: _via_rebuild(owner[0], rel, names, rebuilt)))
        for label, recipe in recipes:
            todo = [n for n in names if n not in values]
            if not todo:
                break
            try:
                got = recipe(m, todo)
            except Exception as e:  # a recipe that cannot run is just not the one
                _logger().debug("recipe %s for %s failed: %s: %s", label, qual or type(m).__name__, type(e).__name__, e)
                continue
            for n, v in got.items():
                target = m._buffers[n]
                if v is not None and tuple(v.shape) == tuple(target.shape) and not v.is_meta:
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


def _shadow(m, names, fill):
    """A throwaway stand-in for module ``m``: same class and attributes, own parameter/buffer/
    child dicts; parameters and other buffers are meta, the buffers ``names`` are CPU tensors
    filled with ``fill``. Whatever an init function writes lands here, not in the model."""
    import torch

    def meta_like(t):
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    def clone(mod, top):
        s = object.__new__(type(mod))
        s.__dict__.update(mod.__dict__)
        s.__dict__["_parameters"] = {
            k: (None if p is None else torch.nn.Parameter(meta_like(p), requires_grad=p.requires_grad))
            for k, p in mod._parameters.items()}
        s.__dict__["_buffers"] = {
            k: (None if b is None else
                torch.full(b.shape, fill, dtype=b.dtype) if top and k in names else meta_like(b))
            for k, b in mod._buffers.items()}
        s.__dict__["_modules"] = {k: (None if c is None else clone(c, False)) for k, c in mod._modules.items()}
        return s

    return clone(m, True)


def _via_init_weights(owner, m, names) -> dict:
    """transformers' own ``_init_weights`` on two shadows (filled 0 and 1); agreed values win."""
    import torch

    runs = []
    for fill in (0, 1):
        s = _shadow(m, names, fill)
        owner._init_weights(s)
        runs.append(s._buffers)
    out = {}
    for n in names:
        a, b = runs[0].get(n), runs[1].get(n)
        if a is not None and b is not None and not a.is_meta and not b.is_meta:
            a, b = a.detach().cpu(), b.detach().cpu()
            if a.shape == b.shape and torch.equal(a, b):
                out[n] = a
    return out


def _via_rope(m, names) -> dict:
    """Rotary embeddings: ``inv_freq`` / ``original_inv_freq`` from the module's own init function."""
    names = [n for n in names if n in _ROPE_NAMES]
    config = getattr(m, "config", None)
    if not names or config is None:
        return {}
    fn = getattr(m, "rope_init_fn", None)  # transformers 4.4x/4.5x: kept on the module
    if not callable(fn):  # transformers 5.x: chosen in __init__ from rope_type, not kept
        rope_type = getattr(m, "rope_type", None) or "default"
        own = {"default": "compute_default_rope_parameters", "axial": "compute_axial_rope_parameters",
               "ntk_alpha": "compute_ntk_alpha_rope_parameters"}.get(rope_type)
        fn = getattr(m, own, None) if own else None
        if not callable(fn):
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            fn = ROPE_INIT_FUNCTIONS[rope_type]
    inv, _scaling = fn(config, **(getattr(m, "rope_kwargs", None) or {}))
    return {n: inv for n in names}


def _fix_rope_alias(m) -> None:
    """transformers 4.x rotary modules keep ``original_inv_freq`` as a plain attribute aliasing
    ``inv_freq`` (``__init__``); left on meta it breaks dynamic RoPE. Re-alias it."""
    alias = m.__dict__.get("original_inv_freq")
    inv = m._buffers.get("inv_freq")
    if alias is not None and getattr(alias, "is_meta", False) and inv is not None and not inv.is_meta:
        m.__dict__["original_inv_freq"] = inv


def _via_ids(m, names) -> dict:
    """transformers' BERT-style ``position_ids`` (arange over the last dim) / ``token_type_ids`` (0)."""
    import torch

    if not type(m).__module__.startswith("transformers."):
        return {}
    out = {}
    for n in names:
        t = m._buffers[n]
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or t.dim() == 0:
            continue
        if n == "position_ids":
            out[n] = torch.arange(t.shape[-1], dtype=t.dtype).expand(t.shape)
        elif n == "token_type_ids":
            out[n] = torch.zeros(t.shape, dtype=t.dtype)
    return out


def _via_rebuild(owner, rel: str, names, cache: dict) -> dict:
    """Build ``type(owner)(owner.config)`` with parameters on meta and buffers real (once per
    call) and take the buffers by name."""
    key = id(owner)
    if key not in cache:
        cache[key] = None
        from accelerate import init_empty_weights

        cls = next(c for c in type(owner).__mro__  # FSDP2 swaps in a subclass; build the model's own
                   if not c.__module__.startswith("torch.distributed"))
        with init_empty_weights(include_buffers=False):
            cache[key] = cls(owner.config)
    skeleton = cache[key]
    if skeleton is None:
        return {}
    sub = skeleton.get_submodule(rel) if rel else skeleton
    return {n: sub._buffers.get(n) for n in names}


# ----------------------------------------------------------------------------- probe / apply
_probe_calls = 0


def probe() -> ProbeResult:
    import torch

    global _probe_calls
    _probe_calls += 1  # a new pattern each call: a freed block of an earlier probe cannot pass for kept
    m = torch.nn.Module()
    want = torch.arange(64, dtype=torch.float64) + (_probe_calls * 1000.25 + 7.0)
    m.register_buffer("probe", want.clone(), persistent=False)
    m.to_empty(device="cpu")
    kept = torch.equal(m.probe, want)
    return ProbeResult(not kept, "a non-persistent buffer's values after Module.to_empty(device='cpu'): "
                       + ("kept" if kept else "lost (uninitialised memory)"))


def apply(ctx) -> None:
    import functools

    module_cls = ctx.module("torch.nn.modules.module").Module
    original = module_cls.__dict__["to_empty"]

    def to_empty(self, *, device, recurse=True):
        _to_empty(original, self, device, recurse)
        return self

    functools.update_wrapper(to_empty, original)
    to_empty.__module__ = __name__
    ctx.replace(module_cls, "to_empty", to_empty)
