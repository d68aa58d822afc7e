"""Implementation of ``packed_attention_boundaries`` (declared in ``__init__.py``; rationale in
docs/patches/packed_attention_boundaries.md).

Two hooks per covered decoder class, and one per stack shape:

* ``<Arch>Model.forward`` (wrapped): when the caller passed neither an attention mask nor a cache,
  the attention is eager or sdpa and the row holds several sequences (``cu_seq_lens_q`` or
  restarting ``position_ids``), the sequence index of every token is put in a context variable for
  the duration of the call (and reset after; nested models set their own).
* shape "update" (4.41-4.52): ``<Arch>Model._update_causal_mask`` (wrapped): upstream's mask (causal,
  sliding window, static/hybrid cache length) with every cross-sequence pair masked too;
  where upstream returns None (sdpa's ``is_causal``) the block-diagonal causal mask is built.
* shape "masking_utils" (4.53.1+): ``masking_utils._preprocess_mask_arguments`` (wrapped): where
  upstream skipped packing detection only because the model made its own (empty) cache, or the
  boundaries came as ``cu_seq_lens_q`` (upstream found one sequence: None on 5.x, all-zero indices
  on 4.53.1-4.57), the sequence indices are handed to upstream's mask builders (the same sizes as
  without a cache, checked).
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import sys
from typing import Any

from hfpatches._declare import ProbeResult

#: modeling module (under transformers.models) -> decoder class whose mask is built like Llama's.
ARCHS = {
    "llama": "LlamaModel",
    "qwen2": "Qwen2Model",
    "qwen3": "Qwen3Model",
    "mistral": "MistralModel",
    "gemma": "GemmaModel",
    "gemma2": "Gemma2Model",
    "phi3": "Phi3Model",
}
MASKING = "transformers.masking_utils"
IMPLS = ("eager", "sdpa")
UPDATE_PARAMS = ("self", "attention_mask", "input_tensor", "cache_position", "past_key_values")
#: what ``_preprocess_mask_arguments`` must take (4.53.1-4.57 call the embeddings ``input_embeds``)
PREPROCESS_PARAMS = ("config", "attention_mask", "past_key_values", "position_ids")
EMBEDS = ("inputs_embeds", "input_embeds")
FORWARD_NEEDS = ("input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds")

# Set only inside a wrapped forward (always reset on exit): (sequence ids (B, T), from_cu_seq_lens).
_PACKED: contextvars.ContextVar[Any] = contextvars.ContextVar("hfpatches_packed_attention_boundaries",
                                                                default=None)


def module_name(arch: str) -> str:
    return f"transformers.models.{arch}.modeling_{arch}"


# ----------------------------------------------------------------------------- sequence ids
def _is_tracing(torch: Any) -> bool:
    compiler = getattr(torch, "compiler", None)
    try:
        return bool(compiler is not None and compiler.is_compiling())
    except Exception:
        return False


def _ids_from_cu(cu: Any, b: int, t: int, device: Any, torch: Any) -> Any:
    """(1, T) sequence ids from FlashAttention's cumulative lengths (1-D or TRL's (1, n+1)), or None
    when they do not describe exactly this one row."""
    if not torch.is_tensor(cu) or cu.is_floating_point() or cu.dtype is torch.bool or b != 1:
        return None
    if cu.dim() == 2 and cu.shape[0] == 1:
        cu = cu[0]
    if cu.dim() != 1 or cu.numel() < 3:   # one sequence: nothing to separate
        return None
    cu = cu.to(device=device, dtype=torch.long)
    lengths = cu.diff()
    if int(cu[0]) != 0 or int(cu[-1]) != t or bool((lengths < 0).any()):
        return None
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)[None]


def _ids_from_positions(position_ids: Any, b: int, t: int, torch: Any) -> Any:
    """(B, T) sequence ids where ``position_ids`` restart at 0 (what every padding-free collator
    writes), or None when no row holds more than one sequence. Narrower than upstream's rule (any
    step other than +1, 4.53.1+): positions with gaps or repeats and no restart (PoSE-style
    skipped positions, hand-made position ids) are not packing and keep upstream's mask."""
    if not torch.is_tensor(position_ids) or position_ids.dim() != 2 or position_ids.shape[-1] != t \
            or position_ids.shape[0] not in (1, b) or position_ids.is_floating_point():
        return None
    pos = position_ids.expand(b, -1)
    first = pos[:, :1] - 1
    ids = ((torch.diff(pos, prepend=first, dim=-1) != 1) & (pos == 0)).cumsum(-1)
    if not bool((ids[:, -1] != 0).any()):   # one host sync, as upstream's detection
        return None
    return ids


def packed_ids(model: Any, kwargs: dict[str, Any]) -> Any:
    """The (B, T) sequence ids of a packed batch this patch handles, or None (leave as upstream)."""
    if kwargs.get("attention_mask") is not None or kwargs.get("past_key_values") is not None:
        return None
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) not in IMPLS:
        return None
    torch = sys.modules.get("torch")
    if torch is None or _is_tracing(torch):
        return None
    x: Any = kwargs.get("input_ids")
    if x is None:
        x = kwargs.get("inputs_embeds")
    if not torch.is_tensor(x) or x.dim() < 2:
        return None
    b, t = int(x.shape[0]), int(x.shape[1])
    if t < 2:
        return None
    cu: Any = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        ids = _ids_from_cu(cu, b, t, x.device, torch)
        if ids is not None:
            return ids
    pos: Any = kwargs.get("position_ids")
    return None if pos is None else _ids_from_positions(pos.to(x.device), b, t, torch)


def _bind(names: tuple[str, ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _forward(names: tuple[str, ...], wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    ids = packed_ids(instance, _bind(names, args, kwargs))
    token = _PACKED.set(ids)
    try:
        return wrapped(*args, **kwargs)
    finally:
        _PACKED.reset(token)


def _empty(cache: Any) -> bool:
    if cache is None:
        return True
    try:
        return int(cache.get_seq_length()) == 0
    except Exception:
        return False


# ----------------------------------------------------------------------------- shape "update"
def block_causal(ids: Any, mask: Any, dtype: Any, torch: Any) -> Any:
    """``mask`` (upstream's 4-D additive mask, or None for plain causal) with cross-sequence pairs
    masked; None when ``mask`` is not in a form this understands."""
    b, t = ids.shape
    same = ids[:, :, None] == ids[:, None, :]
    if mask is None:
        allowed = same & torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
        out = torch.zeros(b, 1, t, t, dtype=dtype, device=ids.device)
        return out.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    if not torch.is_tensor(mask) or mask.dim() != 4 or not mask.is_floating_point() \
            or mask.shape[0] not in (1, b) or mask.shape[2] != t or mask.shape[3] < t:
        return None
    cross = ~same
    if mask.shape[3] > t:   # key slots after this call's tokens (cache room): as upstream made them
        cross = torch.nn.functional.pad(cross, (0, mask.shape[3] - t), value=False)
    return mask.masked_fill(cross[:, None].to(mask.device), torch.finfo(mask.dtype).min)


def _update_causal_mask(names: tuple[str, ...], wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    mask = wrapped(*args, **kwargs)
    ids = _PACKED.get()
    if ids is None:
        return mask
    bound = _bind(names[1:], args, kwargs)
    x: Any = bound.get("input_tensor")
    torch = sys.modules["torch"]
    if bound.get("attention_mask") is not None or not _empty(bound.get("past_key_values")) \
            or not torch.is_tensor(x) or tuple(x.shape[:2]) != tuple(ids.shape) \
            or getattr(instance.config, "_attn_implementation", None) not in IMPLS:
        return mask
    out = block_causal(ids.to(x.device), mask, x.dtype, torch)
    return mask if out is None else out


# ----------------------------------------------------------------------------- shape "masking_utils"
def _preprocess(names: tuple[str, ...], wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    result = wrapped(*args, **kwargs)
    ids = _PACKED.get()
    if ids is None or not isinstance(result, tuple) or len(result) < 5 or result[0] or _found(result[2]):
        return result
    bound = _bind(names, args, kwargs)
    x: Any = bound.get(EMBEDS[0], bound.get(EMBEDS[1]))
    cache = bound.get("past_key_values")
    torch = sys.modules["torch"]
    if bound.get("attention_mask") is not None or bound.get("encoder_hidden_states") is not None \
            or not _empty(cache) or not torch.is_tensor(x) or tuple(x.shape[:2]) != tuple(ids.shape) \
            or getattr(bound.get("config"), "_attn_implementation", None) not in IMPLS:
        return result
    if cache is not None:
        # Sizes as upstream computes them without a cache: the model's own empty cache changes none.
        a, k = _with(names, args, kwargs, "past_key_values", None)
        fresh = wrapped(*a, **k)
        if not isinstance(fresh, tuple) or fresh[0] or tuple(fresh[3:]) != tuple(result[3:]):
            return result
    return (result[0], result[1], ids.to(x.device), *result[3:])


def _found(seq: Any) -> bool:
    """Whether upstream's own packed-sequence indices separate anything. It found none when it gives
    None (5.x; every release when it skipped detection) or indices that are all 0 (4.53.1-4.57 return
    the tensor even for one sequence per row); anything else is upstream's and kept."""
    if seq is None:
        return False
    torch = sys.modules["torch"]
    if not torch.is_tensor(seq) or seq.dim() != 2:
        return True
    return bool((seq[:, -1] != 0).any())   # one host sync, only for a batch the patch found packed


def _with(names: tuple[str, ...], args: Any, kwargs: Any, name: str, value: Any) -> tuple[Any, Any]:
    """``(args, kwargs)`` of the same call with argument ``name`` set to ``value``."""
    i = names.index(name)
    if i < len(args):
        return (*args[:i], value, *args[i + 1:]), kwargs
    return args, {**kwargs, name: value}


# ----------------------------------------------------------------------------- wiring
def _params(func: Any) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(getattr(func, "__func__", func)).parameters)
    except (TypeError, ValueError):
        return ()


def _masking_shape(masking: Any) -> str | None:
    """None when ``masking_utils`` has upstream's packed detection in the form this patch feeds."""
    pre = getattr(masking, "_preprocess_mask_arguments", None)
    if pre is None or not hasattr(masking, "find_packed_sequence_indices"):
        return ("transformers.masking_utils has no packed-sequence detection (4.53.0's form): "
                "its mask builders cannot be handed sequence boundaries")
    names = _params(pre)
    if names[:1] != ("config",) or not all(n in names for n in PREPROCESS_PARAMS) \
            or not any(n in names for n in EMBEDS):
        return f"masking_utils._preprocess_mask_arguments signature is {names}"
    return None


def _masking_module() -> Any:
    """``transformers.masking_utils`` when this transformers has it (imported: every modeling module
    of such a release imports it), else None."""
    if MASKING in sys.modules:
        return sys.modules[MASKING]
    import importlib.util

    if importlib.util.find_spec(MASKING) is None:
        return None
    import importlib

    return importlib.import_module(MASKING)


def check() -> str | None:
    masking = _masking_module()
    return None if masking is None else _masking_shape(masking)


def _attach_arch(ctx: Any, arch: str, mod: Any) -> None:
    if _mid_import(mod.__name__):
        # apply() ran from a hook inside this module's own import (``from transformers import
        # LlamaForCausalLM`` -> modeling_utils' hook): its classes do not exist yet, and no import
        # hook fires for it any more. The first model built after it finished attaches it.
        ctx.state.setdefault("pending", set()).add(arch)
        return
    ctx.state.setdefault("pending", set()).discard(arch)
    cls: Any = getattr(mod, ARCHS[arch], None)
    forward = vars(cls).get("forward") if isinstance(cls, type) else None
    names = _params(forward)[1:] if forward is not None else ()
    if not all(n in names for n in FORWARD_NEEDS):
        ctx.log.info("%s: %s.%s.forward not in the expected form; left alone", ctx.patch.id, mod.__name__,
                     ARCHS[arch])
        return
    uses_masking = hasattr(mod, "create_causal_mask")
    update = vars(cls).get("_update_causal_mask")
    if uses_masking:
        if ctx.state.get("masking") is None:
            ctx.log.info("%s: %s uses masking_utils but no usable one is hooked; left alone", ctx.patch.id, arch)
            return
    elif update is None or _params(update)[: len(UPDATE_PARAMS)] != UPDATE_PARAMS:
        ctx.log.info("%s: %s builds its mask in an unknown way; left alone", ctx.patch.id, cls.__qualname__)
        return
    else:
        ctx.wrap(cls, "_update_causal_mask", functools.partial(_update_causal_mask, _params(update)))
    ctx.wrap(cls, "forward", functools.partial(_forward, names))
    ctx.state.setdefault("covered", []).append(f"{mod.__name__}.{cls.__qualname__}")


def apply(ctx: Any) -> None:
    import threading

    ctx.state["lock"] = threading.Lock()
    masking = _masking_module()
    if masking is not None:
        reason = _masking_shape(masking)
        if reason is not None:   # check() refused it already; never reached through the engine
            raise RuntimeError(reason)
        pre = masking._preprocess_mask_arguments
        ctx.wrap(masking, "_preprocess_mask_arguments", functools.partial(_preprocess, _params(pre)))
        ctx.state["masking"] = masking
    for arch in ARCHS:
        ctx.on_import(module_name(arch), functools.partial(_attach_arch, ctx, arch))
    base = ctx.module("transformers.modeling_utils").PreTrainedModel
    ctx.wrap(base, "post_init", functools.partial(_post_init, ctx))


def _post_init(ctx: Any, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    """Every model's ``__init__`` ends in ``post_init``: attach the architectures whose modules were
    mid-import when apply() ran (nothing to do, and one dict lookup, otherwise)."""
    pending = ctx.state.get("pending")
    if pending:
        with ctx.state["lock"]:
            for arch in sorted(pending):
                mod = sys.modules.get(module_name(arch))
                if mod is not None and not _mid_import(mod.__name__) and arch in pending:
                    _attach_arch(ctx, arch, mod)
    return wrapped(*args, **kwargs)


# ----------------------------------------------------------------------------- probe
#: architectures the probe can build (config class, model class), tried in order
PROBE_ARCHS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
               "mistral": ("MistralConfig", "MistralForCausalLM")}


def _mid_import(name: str) -> bool:
    mod = sys.modules.get(name)
    return mod is not None and bool(getattr(getattr(mod, "__spec__", None), "_initializing", False))


def _probe_arch() -> str | None:
    """The first architecture whose modeling module is not being imported right now: the probe runs
    from the hook on ``transformers.modeling_utils``, which completes while the user's own
    ``from transformers import LlamaForCausalLM`` is still importing ``modeling_llama``."""
    return next((a for a in PROBE_ARCHS if not _mid_import(module_name(a))), None)


def _tiny_model(torch: Any, impl: str, arch: str) -> Any:
    import importlib

    config_cls, model_cls = PROBE_ARCHS[arch]
    config = getattr(importlib.import_module(f"transformers.models.{arch}.configuration_{arch}"), config_cls)(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    config._attn_implementation = impl
    with torch.random.fork_rng(devices=[]):
        model: Any = getattr(importlib.import_module(module_name(arch)), model_cls)(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model.eval()


def leak(model: Any, torch: Any, **kwargs: Any) -> float:
    """max |logit diff| of the second of two packed sequences against it alone."""
    a, b = [[3, 7, 1, 9, 4], [5, 2, 8, 6, 11, 12, 2]]
    row = torch.tensor([a + b])
    pos = torch.tensor([list(range(len(a))) + list(range(len(b)))])
    with torch.no_grad():
        packed = model(input_ids=row, position_ids=pos, **kwargs).logits[0, len(a):]
        alone = model(input_ids=torch.tensor([b]), **kwargs).logits[0]
    return float((packed - alone).abs().max())


def probe() -> ProbeResult:
    import torch

    from hfpatches._quiet import Quiet

    arch = _probe_arch()
    if arch is None:
        return ProbeResult(None, "not probed: every architecture it builds is being imported right now")
    name = PROBE_ARCHS[arch][1].replace("ForCausalLM", "")
    worst: dict[str, float] = {}
    with Quiet():
        for impl in IMPLS:
            try:
                model = _tiny_model(torch, impl, arch)
            except (ImportError, AttributeError) as e:
                if "partially initialized" not in str(e):
                    raise
                # the user's own import of a model class is still running (5.x: modeling_layers is
                # half-initialised): a model cannot be built yet; said, not guessed
                return ProbeResult(None, f"not probed: transformers is mid-import here ({e})")
            for cache in (True, False):
                worst[f"{impl}, use_cache={cache}"] = leak(model, torch, use_cache=cache)
    bad = {k: v for k, v in worst.items() if v > 1e-4}
    if bad:
        return ProbeResult(True, f"tiny {name}, two packed sequences: the second differs from itself alone by "
                           + ", ".join(f"{v:.2e} ({k})" for k, v in bad.items()))
    return ProbeResult(False, f"tiny {name}, two packed sequences: each equals itself alone "
                       f"(max |diff| {max(worst.values()):.1e}, eager/sdpa, use_cache on/off)")
