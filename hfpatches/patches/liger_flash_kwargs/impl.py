"""Implementation of ``liger_flash_kwargs`` (declared in ``__init__.py``; rationale in docs/patches/liger_flash_kwargs.md)."""
from __future__ import annotations

import contextvars
import functools
import sys
from typing import Any

from hfpatches._declare import ProbeResult

from . import PATCH

__all__ = ["flash_keys", "malformed"]

PATCH_ID = PATCH.id
PACKAGE = "liger_kernel.transformers"
LOSS_UTILS = "liger_kernel.transformers.model.loss_utils"
MONKEY_PATCH = "liger_kernel.transformers.monkey_patch"
MODEL_PKG = "liger_kernel.transformers.model"
ENTRY = "LigerForCausalLMLoss"                      # what every model's lce_forward calls
SHARED = "fixed_fused_linear_cross_entropy"         # looked up in loss_utils' globals per call
CALLEE = "liger_fused_linear_cross_entropy"         # the fixed-signature functional (``F.<CALLEE>``)
SHIFT = "shift_labels"                              # transformers' ForCausalLMLoss honours it
FALLBACK_FLASH_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

# Caches keyed on classes (not patch state: they hold no decision, only signatures).
_decoder_keys_cache: dict = {}
# (decoder, keys) for the forward call in flight, per thread/task: never handed to another thread.
_pending: contextvars.ContextVar = contextvars.ContextVar("hfpatches_liger_flash_kwargs", default=None)


def flash_keys() -> tuple[str, ...]:
    """FlashAttention's keyword names, from transformers' ``FlashAttentionKwargs`` where it exists."""
    try:
        from transformers.modeling_flash_attention_utils import FlashAttentionKwargs
    except ImportError:
        return FALLBACK_FLASH_KEYS
    keys = tuple(getattr(FlashAttentionKwargs, "__annotations__", {}))
    return keys or FALLBACK_FLASH_KEYS


def _live(ctx) -> bool:
    """Is the loss-side wrapper installed now? (The decoder hand-off acts only then.)"""
    lu = sys.modules.get(LOSS_UTILS)
    proxy = ctx.state.get("proxy")
    return ctx.live and proxy is not None and lu is not None and vars(lu).get(SHARED) is proxy


# ----------------------------------------------------------------------------- loss side
def _keyword_names(func) -> frozenset | None:
    """Names ``func`` accepts by keyword; None when it takes ``**kwargs`` or cannot be inspected."""
    import inspect

    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _transformers_loss_keys() -> frozenset:
    """Keywords transformers' causal-LM loss (``ForCausalLMLoss``, installed version) names beyond
    its positional inputs: the keys that change transformers' loss (4.51-5.x: num_items_in_batch,
    ignore_index, shift_labels). Every other keyword is swallowed by its ``**kwargs``."""
    import inspect

    try:
        from transformers.loss.loss_utils import ForCausalLMLoss

        params = inspect.signature(ForCausalLMLoss).parameters.values()
    except (ImportError, TypeError, ValueError):
        return frozenset({SHIFT})
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return frozenset(named - {"logits", "labels", "vocab_size"}) | {SHIFT}


def _make_resolver(ctx, entry_code, loss_keys: frozenset, warned: set):
    """What the filter does with a dropped keyword other than FlashAttention's (the slow path):
    ``shift_labels`` from ``LigerForCausalLMLoss`` becomes the target, as in transformers'
    ``ForCausalLMLoss`` and liger-kernel >= 0.5.7; ``shift_labels`` from any other caller, and
    any other key transformers' loss names, is refused (TypeError); anything else is dropped
    (transformers' loss ignores it too) and named once in a WARNING, because transformers'
    forward would also hand it to the decoder and Liger 0.5.6's forward does not."""

    def resolve(caller, args: tuple, kwargs: dict, quiet: frozenset) -> tuple:
        for key in sorted(k for k in kwargs if k not in quiet):
            if key == SHIFT:
                shift = kwargs[key]
                if shift is None:          # transformers: None = derive them from labels
                    continue
                if caller is not entry_code or len(args) < 3:
                    raise TypeError(
                        f"hfpatches {PATCH_ID}: {SHARED}() got {SHIFT!r} outside {ENTRY}: it already "
                        f"has a target (the shifted labels), so which one is meant is ambiguous. Pass "
                        f"the shifted labels as `target`, or call {ENTRY}(..., {SHIFT}=...).")
                hidden = args[0]
                shift = shift.view(-1).to(hidden.device)   # as transformers' ForCausalLMLoss does
                if shift.numel() != hidden.shape[0]:
                    raise ValueError(
                        f"hfpatches {PATCH_ID}: {SHIFT} has {shift.numel()} elements, expected one per "
                        f"token of the hidden states ({hidden.shape[0]}): pass labels already shifted, "
                        f"with the same shape as input_ids")
                args = (*args[:2], shift, *args[3:])
            elif key in loss_keys:
                raise TypeError(
                    f"hfpatches {PATCH_ID}: keyword {key!r} changes the loss in transformers' "
                    f"ForCausalLMLoss, but liger-kernel's fused linear cross-entropy cannot take it and "
                    f"hfpatches does not know how to honour it: refused rather than dropped. Remove it, "
                    f"or compute this loss without Liger's fused linear cross-entropy "
                    f"(fused_linear_cross_entropy=False).")
            elif key not in warned:
                warned.add(key)
                ctx.log.warning(
                    "%s: keyword %r reached Liger's fused loss, which does not take it: dropped. "
                    "transformers' own loss ignores it too, but transformers' forward also hands every "
                    "keyword to the decoder; liger-kernel 0.5.6's forward does not (this patch hands on "
                    "FlashAttention's keys only; 0.6.3-0.6.4's forward hands on every key): there, if %r "
                    "is meant for the decoder or attention, it has no effect. (Said once per key.)",
                    PATCH_ID, key, key)
        return args

    return resolve


def _make_filter(original, own: frozenset, module_globals: dict, accepted: dict, flash: frozenset,
                 resolve):
    """The replacement of ``fixed_fused_linear_cross_entropy``: a plain closure, not a wrapt
    proxy (the proxy's call path costs ~1.5 us here, the closure's one frame ~0.3 us).
    ``accepted`` maps a callee to None (filter nothing) or ``(ok, quiet)``: ``ok`` the keyword
    names that survive (``own`` plus the callee's), ``quiet`` those plus FlashAttention's keys
    (dropped here, handed to the decoder). Any other key goes through ``resolve`` (the slow
    path). ``__wrapped__`` keeps the original's signature for introspection."""

    def fixed_fused_linear_cross_entropy(*args, **kwargs):
        if not kwargs:
            return original(*args)
        callee = getattr(module_globals["F"], CALLEE)
        try:
            ok = accepted[callee]
        except KeyError:
            names = _keyword_names(callee)
            ok = accepted[callee] = None if names is None else (own | names, own | names | flash)
        if ok is None or ok[0].issuperset(kwargs):
            return original(*args, **kwargs)
        if not ok[1].issuperset(kwargs):    # a key other than FlashAttention's would be dropped
            args = resolve(sys._getframe(1).f_code, args, kwargs, ok[1])
        keep = ok[0].intersection(kwargs)   # usually empty: FlashAttention keys only
        if not keep:
            return original(*args)
        return original(*args, **{k: kwargs[k] for k in keep})

    fixed_fused_linear_cross_entropy.__wrapped__ = original  # type: ignore[attr-defined]
    fixed_fused_linear_cross_entropy.__doc__ = (
        f"hfpatches {PATCH_ID}: drops FlashAttention's keywords (neither {SHARED} nor F.{CALLEE} "
        f"accepts them), honours {SHIFT} from {ENTRY}, refuses other loss keys, then calls "
        f"liger-kernel's {SHARED}.")
    return fixed_fused_linear_cross_entropy


# ----------------------------------------------------------------------------- decoder side
def _decoder_keys(decoder, flash: frozenset) -> tuple[str, ...]:
    """The FlashAttention keys ``decoder.forward`` accepts (cached per class and key set)."""
    cls = type(decoder)
    keys = _decoder_keys_cache.get((cls, flash))
    if keys is None:
        names = _keyword_names(cls.forward)
        keys = tuple(sorted(flash)) if names is None else tuple(sorted(flash & names))
        _decoder_keys_cache[(cls, flash)] = keys
    return keys


def _inject(module, args, kwargs):
    """One-shot ``with_kwargs`` pre-hook on the decoder: add the pending keys it did not get."""
    pending = _pending.get()
    if pending is None or pending[0] is not module:
        return None
    _pending.set(None)
    missing = {k: v for k, v in pending[1].items() if k not in kwargs}
    if not missing:
        return None
    return args, {**kwargs, **missing}


def malformed(pending: dict, torch) -> str | None:
    """Why these keys are not in the form FlashAttention's varlen kernel takes (transformers'
    ``FlashAttentionKwargs``: ``cu_seq_lens_*`` 1-D integer tensors, ``max_length_*`` ints), or
    None. TRL 0.17's ``DataCollatorForCompletionOnlyLM(padding_free=True)`` emits
    ``cu_seq_lens_*`` of shape (1, n+1) and ``max_length_*`` as tensors; handed to
    ``flash_attn_varlen_func`` they raise "cu_seqlens_q must have shape (batch_size + 1)"
    (huggingface/trl#3243, open) -- which is what transformers' own forward does with them."""
    for k, v in pending.items():
        if k.startswith("cu_seq_lens"):
            if not (torch.is_tensor(v) and v.dim() == 1 and not v.is_floating_point()):
                what = f"a {v.dim()}-D {str(v.dtype).replace('torch.', '')} tensor" if torch.is_tensor(v) \
                    else f"a {type(v).__name__}"
                return f"{k} is {what}, not a 1-D integer tensor"
        elif k.startswith("max_length") and not isinstance(v, int):
            return f"{k} is a {type(v).__name__}, not an int"
    return None


def _not_handed_off(ctx, pending: dict, torch) -> bool:
    """True when the keys are malformed: then the decoder does not get them (it recomputes the
    boundaries from ``position_ids``, as under Liger 0.5.6 alone) and, once per reason, an INFO
    record says so. Handing them on would turn a working FlashAttention-2 run into trl#3243."""
    why = malformed(pending, torch)
    if why is None:
        return False
    told = ctx.state.setdefault("told", set())
    if why not in told:
        told.add(why)
        ctx.log.info(
            "%s: FlashAttention keys not handed to the decoder: %s (FlashAttention's varlen kernel "
            "would reject them; TRL 0.17's padding-free collator emits this form, huggingface/trl#3243). "
            "The decoder derives the boundaries from position_ids instead, as without this patch.",
            PATCH_ID, why)
    return True


def hand_off(ctx, wrapped, instance, args, kwargs):
    """Wrapper of Liger's ``lce_forward`` (bound to the patch's ``ctx`` with functools.partial):
    FlashAttention keys also reach ``self.model``."""
    flash = ctx.state.get("flash", frozenset())
    if not kwargs or flash.isdisjoint(kwargs) or not _live(ctx):
        return wrapped(*args, **kwargs)
    owner = instance if instance is not None else (args[0] if args else None)
    decoder = getattr(owner, "model", None)   # every loss_utils-based lce_forward calls self.model(...)
    import torch

    if not isinstance(decoder, torch.nn.Module):
        return wrapped(*args, **kwargs)
    keys = _decoder_keys(decoder, flash)
    pending = {k: kwargs[k] for k in keys if k in kwargs}
    if not pending or _not_handed_off(ctx, pending, torch):
        return wrapped(*args, **kwargs)
    token = _pending.set((decoder, pending))
    # prepend: other pre-hooks (user code) see the call as if lce_forward had passed the keys
    handle = decoder.register_forward_pre_hook(_inject, with_kwargs=True, prepend=True)
    try:
        return wrapped(*args, **kwargs)
    finally:
        handle.remove()
        _pending.reset(token)


def _is_liger_forward(fn, entry) -> bool:
    """A Liger ``lce_forward`` rewritten onto loss_utils: it calls ``LigerForCausalLMLoss``."""
    if type(fn) is not type(_is_liger_forward):   # a plain function (a wrapt proxy mimics one)
        return False
    code = fn.__code__
    return (ENTRY in code.co_names
            and getattr(fn, "__globals__", {}).get(ENTRY) is entry)


def _wrap_model_module(ctx, mod, entry) -> object | None:
    """Wrap ``mod.lce_forward`` if it is a loss_utils-based forward; return the original."""
    fn = vars(mod).get("lce_forward")
    if not _is_liger_forward(fn, entry):
        return None
    ctx.wrap(mod, "lce_forward", ctx.state["hand_off"])
    return fn


def _on_model_import(ctx, mod) -> None:
    """Post-import hook for Liger model modules imported after apply (lazy ``apply_*``); the
    context runs it under the engine's lock and never after a revert."""
    lu = sys.modules.get(LOSS_UTILS)
    if lu is not None and _live(ctx):
        _wrap_model_module(ctx, mod, getattr(lu, ENTRY))


def _attach_hand_off(ctx, lu) -> None:
    import pkgutil

    entry = getattr(lu, ENTRY)
    ctx.state["hand_off"] = functools.partial(hand_off, ctx)
    originals = []
    # From 0.6 the patch attaches when loss_utils has been imported, possibly in the middle of the
    # model module that imports it first (no ``lce_forward`` yet, so not wrapped here): there (0.6.3-
    # 0.6.4) every lce_forward hands all its keywords to the decoder itself; the hand-off adds nothing.
    for name, mod in list(sys.modules.items()):
        if mod is not None and name.startswith(MODEL_PKG + ".") and name != LOSS_UTILS:
            fn = _wrap_model_module(ctx, mod, entry)
            if fn is not None:
                originals.append(fn)
    mp = sys.modules.get(MONKEY_PATCH)
    if mp is not None:
        for name, value in list(vars(mp).items()):
            if any(value is fn for fn in originals):
                ctx.wrap(mp, name, ctx.state["hand_off"])
    pkg = sys.modules.get(MODEL_PKG)
    for info in pkgutil.iter_modules(getattr(pkg, "__path__", [])):
        full = f"{MODEL_PKG}.{info.name}"
        if full not in sys.modules:
            ctx.on_import(full, functools.partial(_on_model_import, ctx))
    # Classes that already hold Liger's unwrapped forward (Liger applied before hfpatches).
    early = []
    for name, mod in list(sys.modules.items()):
        if mod is None or not name.startswith("transformers.models."):
            continue
        for attr in list(vars(mod).values()):
            if isinstance(attr, type) and _is_liger_forward(vars(attr).get("forward"), entry):
                early.append(f"{attr.__module__}.{attr.__qualname__}")
    if early:
        ctx.log.info(
            "%s: Liger's forward was installed before hfpatches on %s: the loss fix covers them; "
            "FlashAttention keys reach their decoder once Liger's apply_liger_kernel_to_* runs "
            "again after hfpatches.apply()", PATCH_ID, ", ".join(sorted(set(early))))


# ----------------------------------------------------------------------------- patch
def apply(ctx: Any) -> None:
    import inspect

    lu = ctx.module(LOSS_UTILS)
    ctx.state["flash"] = frozenset(flash_keys())
    original = vars(lu)[SHARED]
    params = inspect.signature(original).parameters.values()
    own = frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    accepted: dict = {}
    resolve = _make_resolver(ctx, getattr(lu, ENTRY).__code__, _transformers_loss_keys(), set())
    replacement = _make_filter(original, own, vars(lu), accepted, ctx.state["flash"], resolve)
    ctx.replace(lu, SHARED, replacement)
    ctx.state.update(proxy=replacement, accepted=accepted)
    _attach_hand_off(ctx, lu)


def check(ctx: Any) -> str | None:
    """Does the loss path still route through the attribute we wrap?"""
    lu = sys.modules[LOSS_UTILS]
    entry = getattr(lu, ENTRY, None)
    if SHARED not in getattr(getattr(entry, "__code__", None), "co_names", ()):
        return f"{LOSS_UTILS}.{ENTRY} no longer calls the module-level {SHARED}"
    shared = vars(lu).get(SHARED)
    functional = vars(lu).get("F")
    if functional is None or not callable(getattr(functional, CALLEE, None)) or \
            CALLEE not in getattr(getattr(shared, "__code__", None), "co_names", ()):
        return f"{LOSS_UTILS}.{SHARED} no longer calls F.{CALLEE}"
    for name, mod in list(sys.modules.items()):
        if mod is not None and mod is not lu and name.startswith(MODEL_PKG + ".") and SHARED in vars(mod):
            return f"{name} binds {SHARED} by name: a patch of {LOSS_UTILS} would not reach it"
    return None


class _Bound(Exception):
    """Raised by the probe's trace hook once the fused functional's arguments were bound."""


def probe(ctx: Any) -> ProbeResult:
    import torch

    lu = sys.modules[LOSS_UTILS]
    code = getattr(getattr(lu.F, CALLEE), "__code__")
    key = FALLBACK_FLASH_KEYS[0]

    def stop_at_callee(frame, event, arg):
        if event == "call" and frame.f_code is code:
            raise _Bound(sorted(frame.f_locals))
        return None

    hidden = torch.zeros(1, 3, 4)
    weight = torch.zeros(5, 4)
    labels = torch.zeros(1, 3, dtype=torch.long)
    kw = {key: torch.tensor([0, 3], dtype=torch.int32)}
    previous = sys.gettrace()
    sys.settrace(stop_at_callee)
    try:
        getattr(lu, ENTRY)(hidden, weight, labels, 4, **kw)
    except _Bound as e:
        bound = e.args[0]
        return ProbeResult(key in bound, f"{CALLEE} was entered "
                           f"{'with' if key in bound else 'without'} {key}; Triton never reached")
    except TypeError as e:
        if key in str(e):
            return ProbeResult(True, f"TypeError: {e}")
        raise
    finally:
        sys.settrace(previous)
    return ProbeResult(False, f"{ENTRY} accepted {key} and returned")
