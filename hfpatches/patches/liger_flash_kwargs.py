"""``liger_flash_kwargs``: padding-free batches train with Liger's fused linear cross-entropy.

The bug
    Padding-free batches (TRL's ``DataCollatorForCompletionOnlyLM(..., padding_free=True)``,
    transformers' ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``) carry
    FlashAttention's varlen keywords: ``cu_seq_lens_q``, ``cu_seq_lens_k``, ``max_length_q``,
    ``max_length_k`` (transformers' ``FlashAttentionKwargs``). liger-kernel 0.5.6 rewrote every
    model's ``lce_forward`` (llama, mistral, qwen2, gemma, gemma2, phi3, mixtral, olmo2, mllama,
    qwen2-vl, qwen2.5-vl) onto ``liger_kernel/transformers/model/loss_utils.py``: in ``train()``
    with labels, ``lce_forward(**loss_kwargs)`` -> ``LigerForCausalLMLoss(**kwargs)`` ->
    ``fixed_fused_linear_cross_entropy(**kwargs)`` -> ``liger_fused_linear_cross_entropy``, whose
    fixed signature raises ``TypeError: liger_fused_linear_cross_entropy() got an unexpected
    keyword argument 'cu_seq_lens_q'``. (Eval mode uses ``self.loss_function``, which accepts them.)
    Second half: until 0.6.0 Liger's forward did not hand these keys to ``self.model(...)`` at all,
    so FlashAttention-2 recomputed the sequence boundaries from ``position_ids`` in every layer
    (device-to-host syncs per layer) -- slower, numerically the same.

Affected
    liger-kernel 0.5.6 (loss_utils arrived with linkedin/Liger-Kernel#614; 0.5.5 had no loss_utils
    and worked). Reported in linkedin/Liger-Kernel#650, fixed by #651 in 0.5.7 (loss_utils stops
    forwarding ``**kwargs``). #708 (0.6.0) makes the forward pass ``**kwargs`` to the decoder, as
    transformers' own forward does (transformers#35588 explains why the precomputed keys matter).
    0.8.x filters the keys in ``LigerForCausalLMLoss`` with ``inspect.signature`` on every call.
    llava and paligemma are not on loss_utils in 0.5.6 (they call the loss module without
    ``**kwargs``) and never had the bug.

The fix
    1. Loss side -- the one shared point. Each model module binds ``LigerForCausalLMLoss`` with
       ``from ...loss_utils import ...``, so replacing that module attribute would reach no model.
       But every one of those captured names is the same function object, and it looks
       ``fixed_fused_linear_cross_entropy`` up in loss_utils' globals *at call time*; no other
       module binds that name. Replacing ``loss_utils.fixed_fused_linear_cross_entropy`` therefore
       covers every model, whenever its module was imported (``check`` re-verifies both facts
       before attaching; the tests prove it per model). The wrapper drops every keyword that
       neither ``fixed_fused_linear_cross_entropy`` nor the functional it calls
       (``F.liger_fused_linear_cross_entropy``, looked up at call time like Liger does) names --
       FlashAttention's keys and anything else the fused loss does not accept. The accepted set is
       computed once per callee (a dict keyed on the callee object, so a replaced functional gets
       its own entry) and the fast path is one ``issuperset``: no keyword -> no lookup at all;
       only accepted keywords -> no copy. The replacement is a plain closure (``ctx.replace``),
       not a wrapt proxy, for the per-call cost; see ``benchmarks/liger_filter.py``.
    2. Decoder side -- the keys belong to attention. Liger's ``lce_forward`` (each loss_utils-based
       one: it calls ``LigerForCausalLMLoss``) is wrapped where Liger's installers take it from:
       the ``lce_forward`` attribute of each imported ``liger_kernel.transformers.model.*``
       module, its aliases in ``liger_kernel.transformers.monkey_patch`` (``llama_lce_forward``
       ...), and -- through a post-import hook -- the modules Liger imports lazily inside its
       ``apply_liger_kernel_to_*`` (mllama, olmo2, qwen2-vl, qwen2.5-vl). When a call carries
       FlashAttention keys, the wrapper registers a one-shot ``with_kwargs`` forward pre-hook on
       ``self.model`` (the decoder every such forward calls) for the duration of that call; the
       hook adds the keys the decoder's ``forward`` accepts and did not receive. Why this way:
       Liger's code is not copied or rewritten, nothing is added to transformers' classes, calls
       without those keys pay one ``isdisjoint``, a forward that already passes them (0.6.0+)
       gets nothing added, a decoder whose ``forward`` takes no such keywords (Qwen2-VL,
       Mllama text model in 4.51) is left alone -- exactly what transformers' own forward gives
       the decoder for these keys. The pending keys live in a ``ContextVar``, so another thread
       running the same module is never handed them.
       One guard where transformers has none: keys not in the documented form (``cu_seq_lens_*``
       1-D integer tensors, ``max_length_*`` ints) are not handed on. TRL 0.17's padding-free
       collator -- the usual producer on this stack -- emits ``cu_seq_lens_*`` of shape (1, n+1),
       which ``flash_attn_varlen_func`` rejects (huggingface/trl#3243, open; plain transformers
       crashes on it with FlashAttention-2). Under Liger 0.5.6 the decoder never saw them, so
       FlashAttention-2 worked by deriving the boundaries from ``position_ids``; handing them on
       would turn the loss fix into that crash. Such batches keep the old path (an INFO record
       says so once); they are not reshaped (that would be fixing TRL's bug, silently).
    3. No key that changes the result vanishes. transformers' ``ForCausalLMLoss`` honours
       ``shift_labels`` (labels already shifted: context parallelism, packed batches); 0.5.6
       raised TypeError on it, a plain filter would drop it. Called from ``LigerForCausalLMLoss``
       (checked by the caller's code object), the filter makes it the target, flattened and moved
       as transformers and liger-kernel 0.5.7 do (``None`` = derive from labels, as there).
       Refused with TypeError: ``shift_labels`` from any other caller (the target is already
       given: ambiguous), and any other key the installed transformers' ``ForCausalLMLoss``
       names that Liger cannot take. Any remaining dropped key (transformers' loss ignores it
       too, but its forward also hands it to the decoder, which 0.5.6's does not) is named once
       in a WARNING. FlashAttention's keys are the only ones dropped quietly: they reach the
       decoder by 2. This costs nothing on the fast paths (one more ``issuperset``).

Probe
    Calls the installed loss entry ``LigerForCausalLMLoss`` on tiny CPU tensors with a
    ``cu_seq_lens_q`` keyword. A ``sys.settrace`` hook stops the call with a private exception at
    the ``call`` event of ``liger_fused_linear_cross_entropy`` -- an event CPython emits only
    after the arguments were bound -- so the Triton kernel is never reached, on any machine.
    Bug present <=> ``TypeError`` naming ``cu_seq_lens_q``. The previous trace function (a
    debugger, coverage) is restored afterwards. Costs well under a millisecond. (The probe
    checks the loss side; the decoder hand-off is checked by the tests.)

Design decisions
    * Only keys neither function names are dropped (and only as 3. allows). A key the
      functional accepts but ``fixed_fused_linear_cross_entropy`` also sets itself
      (``reduction``) still raises as it does upstream: that is a caller error, not this bug,
      and dropping it would hide it.
    * Forwards installed *before* ``hfpatches.apply()`` (``apply_liger_kernel_to_llama()`` run
      first) hold Liger's unwrapped function in a transformers class; the recorder never stacks
      on a foreign replacement (that is a CONFLICT by design), so those classes get the loss fix
      only and an INFO record on ``hfpatches.liger_flash_kwargs`` names them (call Liger's
      ``apply_liger_kernel_to_*`` again after ``hfpatches.apply()``, or apply hfpatches first, as
      TRL/Trainer ``use_liger_kernel=True`` and ``AutoLigerKernelForCausalLM`` do anyway).
    * Revert restores every attribute hfpatches set. A wrapped forward that Liger copied into a
      class while the patch was live stays there (Liger owns that attribute, not hfpatches) and
      becomes a pass-through: it acts only while the loss-side wrapper is installed.
    * The target is declared on ``liger_kernel.transformers`` (path ``model.loss_utils.<SHARED>``):
      loss_utils is imported in the middle of that package's ``__init__``, so a post-import hook
      on loss_utils itself fires while the package is still initialising; the package's hook
      fires once everything is there, whichever submodule the user imports.
    * In range: liger-kernel 0.5.6 only. 0.5.7-0.5.x no longer raise but still drop the keys
      before the decoder (performance only); this patch does not touch them.
"""
from __future__ import annotations

import sys

from hfpatches._registry import Patch, ProbeResult, Target

__all__ = ["PATCH", "flash_keys"]

PATCH_ID = "liger_flash_kwargs"
PACKAGE = "liger_kernel.transformers"
LOSS_UTILS = "liger_kernel.transformers.model.loss_utils"
MONKEY_PATCH = "liger_kernel.transformers.monkey_patch"
MODEL_PKG = "liger_kernel.transformers.model"
ENTRY = "LigerForCausalLMLoss"                      # what every model's lce_forward calls
SHARED = "fixed_fused_linear_cross_entropy"         # looked up in loss_utils' globals per call
CALLEE = "liger_fused_linear_cross_entropy"         # the fixed-signature functional (``F.<CALLEE>``)
SHIFT = "shift_labels"                              # transformers' ForCausalLMLoss honours it
FALLBACK_FLASH_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
_LOGGER = "hfpatches.liger_flash_kwargs"

_flash = frozenset(FALLBACK_FLASH_KEYS)   # replaced by transformers' FlashAttentionKwargs at apply
_state: dict = {"proxy": None, "ctx": None, "accepted": None, "hooked": set(), "told": set()}
_decoder_keys_cache: dict = {}
_pending = None                           # ContextVar, created at apply (keeps import light)


def _logger():
    import logging

    return logging.getLogger(_LOGGER)


def flash_keys() -> tuple[str, ...]:
    """FlashAttention's keyword names, from transformers' ``FlashAttentionKwargs`` where it exists."""
    try:
        from transformers.modeling_flash_attention_utils import FlashAttentionKwargs
    except ImportError:
        return FALLBACK_FLASH_KEYS
    keys = tuple(getattr(FlashAttentionKwargs, "__annotations__", {}))
    return keys or FALLBACK_FLASH_KEYS


def _live() -> bool:
    """Is the loss-side wrapper installed now? (The decoder hand-off acts only then.)"""
    lu = sys.modules.get(LOSS_UTILS)
    proxy = _state["proxy"]
    return proxy is not None and lu is not None and vars(lu).get(SHARED) is proxy


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


def _make_resolver(entry_code, loss_keys: frozenset, warned: set):
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
                _logger().warning(
                    "%s: keyword %r reached Liger's fused loss, which does not take it: dropped. "
                    "transformers' own loss ignores it too, but transformers' forward also hands every "
                    "keyword to the decoder and liger-kernel 0.5.6's forward does not (this patch hands "
                    "on FlashAttention's keys only): if %r is meant for the decoder or attention, it has "
                    "no effect here. (Said once per key.)", PATCH_ID, key, key)
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

    fixed_fused_linear_cross_entropy.__wrapped__ = original
    fixed_fused_linear_cross_entropy.__doc__ = (
        f"hfpatches {PATCH_ID}: drops FlashAttention's keywords (neither {SHARED} nor F.{CALLEE} "
        f"accepts them), honours {SHIFT} from {ENTRY}, refuses other loss keys, then calls "
        f"liger-kernel's {SHARED}.")
    return fixed_fused_linear_cross_entropy


# ----------------------------------------------------------------------------- decoder side
def _decoder_keys(decoder) -> tuple[str, ...]:
    """The FlashAttention keys ``decoder.forward`` accepts (cached per class)."""
    cls = type(decoder)
    keys = _decoder_keys_cache.get(cls)
    if keys is None:
        names = _keyword_names(cls.forward)
        keys = tuple(sorted(_flash)) if names is None else tuple(sorted(_flash & names))
        _decoder_keys_cache[cls] = keys
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


def _not_handed_off(pending: dict, torch) -> bool:
    """True when the keys are malformed: then the decoder does not get them (it recomputes the
    boundaries from ``position_ids``, as under Liger 0.5.6 alone) and, once per reason, an INFO
    record says so. Handing them on would turn a working FlashAttention-2 run into trl#3243."""
    why = malformed(pending, torch)
    if why is None:
        return False
    if why not in _state["told"]:
        _state["told"].add(why)
        _logger().info(
            "%s: FlashAttention keys not handed to the decoder: %s (FlashAttention's varlen kernel "
            "would reject them; TRL 0.17's padding-free collator emits this form, huggingface/trl#3243). "
            "The decoder derives the boundaries from position_ids instead, as without this patch.",
            PATCH_ID, why)
    return True


def hand_off(wrapped, instance, args, kwargs):
    """Wrapper of Liger's ``lce_forward``: FlashAttention keys also reach ``self.model``."""
    if not kwargs or _flash.isdisjoint(kwargs) or not _live():
        return wrapped(*args, **kwargs)
    owner = instance if instance is not None else (args[0] if args else None)
    decoder = getattr(owner, "model", None)   # every loss_utils-based lce_forward calls self.model(...)
    import torch

    if not isinstance(decoder, torch.nn.Module):
        return wrapped(*args, **kwargs)
    keys = _decoder_keys(decoder)
    pending = {k: kwargs[k] for k in keys if k in kwargs}
    if not pending or _not_handed_off(pending, torch):
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
    ctx.wrap(mod, "lce_forward", hand_off)
    return fn


def _on_model_import(mod) -> None:
    """Post-import hook for Liger model modules imported after apply (lazy ``apply_*``)."""
    from hfpatches._registry import ENGINE

    with ENGINE.lock:
        ctx = _state["ctx"]
        lu = sys.modules.get(LOSS_UTILS)
        if ctx is None or lu is None or not _live():
            return
        try:
            _wrap_model_module(ctx, mod, getattr(lu, ENTRY))
        except Exception as e:  # never break the user's import because of us
            _logger().warning("could not wrap %s.lce_forward: %s", mod.__name__, e)


def _attach_hand_off(ctx, lu) -> None:
    import pkgutil

    from hfpatches import _hooks

    entry = getattr(lu, ENTRY)
    originals = []
    for name, mod in list(sys.modules.items()):
        if mod is not None and name.startswith(MODEL_PKG + ".") and name != LOSS_UTILS:
            fn = _wrap_model_module(ctx, mod, entry)
            if fn is not None:
                originals.append(fn)
    mp = sys.modules.get(MONKEY_PATCH)
    if mp is not None:
        for name, value in list(vars(mp).items()):
            if any(value is fn for fn in originals):
                ctx.wrap(mp, name, hand_off)
    pkg = sys.modules.get(MODEL_PKG)
    for info in pkgutil.iter_modules(getattr(pkg, "__path__", [])):
        full = f"{MODEL_PKG}.{info.name}"
        if full not in sys.modules and full not in _state["hooked"]:
            _state["hooked"].add(full)
            _hooks.when_imported(full, _on_model_import)
    # Classes that already hold Liger's unwrapped forward (Liger applied before hfpatches).
    early = []
    for name, mod in list(sys.modules.items()):
        if mod is None or not name.startswith("transformers.models."):
            continue
        for attr in list(vars(mod).values()):
            if isinstance(attr, type) and _is_liger_forward(vars(attr).get("forward"), entry):
                early.append(f"{attr.__module__}.{attr.__qualname__}")
    if early:
        _logger().info(
            "%s: Liger's forward was installed before hfpatches on %s: the loss fix covers them; "
            "FlashAttention keys reach their decoder once Liger's apply_liger_kernel_to_* runs "
            "again after hfpatches.apply()", PATCH_ID, ", ".join(sorted(set(early))))


# ----------------------------------------------------------------------------- patch
def apply(ctx) -> None:
    import contextvars
    import inspect

    global _flash, _pending
    lu = ctx.module(LOSS_UTILS)
    _flash = frozenset(flash_keys())
    if _pending is None:
        _pending = contextvars.ContextVar("hfpatches_liger_flash_kwargs", default=None)
    original = vars(lu)[SHARED]
    params = inspect.signature(original).parameters.values()
    own = frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    accepted: dict = {}
    resolve = _make_resolver(getattr(lu, ENTRY).__code__, _transformers_loss_keys(), set())
    replacement = _make_filter(original, own, vars(lu), accepted, _flash, resolve)
    ctx.replace(lu, SHARED, replacement)
    _state.update(proxy=replacement, ctx=ctx, accepted=accepted)
    _attach_hand_off(ctx, lu)


def check() -> str | None:
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


def probe() -> ProbeResult:
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


PATCH = Patch(
    id=PATCH_ID,
    summary="Liger's fused linear cross-entropy: padding-free batches (FlashAttention kwargs) no "
            "longer raise TypeError in train(); the kwargs reach the decoder",
    upstream=("linkedin/Liger-Kernel#650", "linkedin/Liger-Kernel#651", "linkedin/Liger-Kernel#708"),
    requires=("liger-kernel>=0.5.6,<0.5.7",),
    fixed_in="liger-kernel>=0.5.7",
    # Declared on the package: its post-import hook fires once ``liger_kernel.transformers`` has
    # finished importing (loss_utils is imported in the middle of it, whichever module the user
    # names); the attribute path then reaches loss_utils.
    targets=(Target(PACKAGE, f"model.loss_utils.{SHARED}",
                    params=("hidden_states", "lm_head_weight", "target")),),
    probe=probe,
    apply=apply,
    check=check,
    affected="liger-kernel 0.5.6",
    verified_stacks=("affected", "latest"),
)
