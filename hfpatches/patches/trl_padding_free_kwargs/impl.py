"""Implementation of ``trl_padding_free_kwargs`` (declared in ``__init__.py``; rationale in docs/patches/)."""
from __future__ import annotations

import functools
import sys
import types
import weakref
from typing import Any

from hfpatches._declare import ProbeResult

COLLATOR_MODULE = "trl.trainer.utils"
COLLATOR = "DataCollatorForCompletionOnlyLM"
FA_MODULE = "transformers.integrations.flash_attention"
ENTRY = "_flash_attention_forward"
CU_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k")
MAX_KEYS = ("max_length_q", "max_length_k")
KEYS = CU_KEYS + MAX_KEYS
# _flash_attention_forward(query_states, key_states, value_states, attention_mask, query_length,
#                          is_causal, dropout, position_ids, ...): positions of what is read
_Q, _K, _MASK, _POS = 0, 1, 3, 7


# ----------------------------------------------------------------------------- the fix
def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


def _is_int_tensor(torch: Any, value: Any) -> bool:
    return bool(torch.is_tensor(value) and not value.is_floating_point() and not value.is_complex()
                and value.dtype is not torch.bool)


def _trl_form(torch: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    """The objects to check when the call carries exactly TRL 0.16-0.19's padding-free form (shapes
    and dtypes only, no device sync), else None. TRL's form: ``cu_seq_lens_q``/``_k`` int32 of
    shape (1, n+1), ``max_length_q``/``_k`` integer tensors of shape (1,), one packed row
    (query batch 1), ``position_ids`` of that row, no padding mask."""
    cu_q: Any = kwargs.get("cu_seq_lens_q")
    cu_k: Any = kwargs.get("cu_seq_lens_k")
    max_q: Any = kwargs.get("max_length_q")
    max_k: Any = kwargs.get("max_length_k")
    if not all(torch.is_tensor(v) for v in (cu_q, cu_k)) or cu_q.dtype is not torch.int32 \
            or cu_k.dtype is not torch.int32 or cu_q.dim() != 2 or cu_q.shape[0] != 1 \
            or cu_q.shape[1] < 2 or tuple(cu_k.shape) != tuple(cu_q.shape):
        return None
    if not all(_is_int_tensor(torch, v) and tuple(v.shape) == (1,) for v in (max_q, max_k)):
        return None
    q, k, pos = _arg(args, kwargs, _Q, "query_states"), _arg(args, kwargs, _K, "key_states"), \
        _arg(args, kwargs, _POS, "position_ids")
    if _arg(args, kwargs, _MASK, "attention_mask") is not None or not torch.is_tensor(q) \
            or not torch.is_tensor(k) or q.dim() != 4 or q.shape[0] != 1 or k.shape[:2] != q.shape[:2]:
        return None
    if not _is_int_tensor(torch, pos) or tuple(pos.shape) != (1, q.shape[1]):
        return None
    return cu_q, cu_k, max_q, max_k, pos


def _consistent(torch: Any, cu_q: Any, cu_k: Any, max_q: Any, max_k: Any, pos: Any) -> int | None:
    """The maximum sequence length when the values are TRL's (one device sync), else None:
    ``cu_seq_lens_k`` equal to ``_q``, boundaries from 0, strictly increasing, ending at the row's
    length, the sequences starting exactly where ``position_ids`` restart at 0 (what TRL derives
    them from, and what transformers derives itself from ``position_ids`` without the keys), and
    both maxima equal to the longest sequence."""
    flat = pos.reshape(-1)
    n = flat.numel()
    cq = cu_q.reshape(-1).long()
    starts = cq[:-1].clamp(0, n - 1)
    on_device = torch.cat([cq, cu_k.reshape(-1).long().to(cq.device), max_q.reshape(-1).long().to(cq.device),
                           max_k.reshape(-1).long().to(cq.device),
                           (flat == 0).sum().reshape(1).to(cq.device),
                           (flat.index_select(0, starts.to(flat.device)) == 0).all().long().reshape(1).to(cq.device)])
    vals = on_device.tolist()
    m = cq.numel()
    bounds, bounds_k, (mq, mk, zeros, restart) = vals[:m], vals[m:2 * m], vals[2 * m:]
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if bounds != bounds_k or bounds[0] != 0 or bounds[-1] != n or min(lengths) <= 0:
        return None
    if zeros != m - 1 or restart != 1 or not mq == mk == max(lengths):
        return None
    return int(mq)


_UNSEEN = object()


class _Verdicts:
    """The value check's verdict per batch (the tuple of tensors ``_trl_form`` returns), kept
    while its ``cu_seq_lens_q`` lives: keyed by ``id`` with a weak reference that drops the entry
    when the tensor dies (tensors compare elementwise, so they cannot be dict keys of a
    ``WeakKeyDictionary``: its lookups compare referents with ``==``)."""

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[tuple[Any, ...], int | None]] = {}

    def get(self, objs: tuple[Any, ...]) -> Any:
        entry = self._by_id.get(id(objs[0]))
        if entry is None or any(ref() is not obj for ref, obj in zip(entry[0], objs)):
            return _UNSEEN
        return entry[1]

    def put(self, objs: tuple[Any, ...], verdict: int | None) -> int | None:
        key, by_id = id(objs[0]), self._by_id

        def drop(_ref: Any) -> None:   # the batch's cu_seq_lens_q died: its id may be reused
            by_id.pop(key, None)

        refs = tuple(weakref.ref(o, drop if i == 0 else None) for i, o in enumerate(objs))
        by_id[key] = (refs, verdict)
        return verdict


def _entry(verdicts: Any, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Wrapper of transformers' ``_flash_attention_forward`` as the attention integration calls it:
    TRL's form -> transformers' documented form (``cu_seq_lens_*`` 1-D int32 views, ``max_length_*``
    int); every other call goes through untouched. The value check runs once per batch (the same
    tensors reach every layer): its verdict is kept per ``cu_seq_lens_q`` object, weakly."""
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is None or getattr(cu_q, "ndim", 1) != 2:
        return wrapped(*args, **kwargs)
    torch = sys.modules["torch"]
    found = _trl_form(torch, args, kwargs)
    if found is None:
        return wrapped(*args, **kwargs)
    longest = verdicts.get(found)
    if longest is _UNSEEN:
        longest = verdicts.put(found, _consistent(torch, *found))
    if longest is None:
        return wrapped(*args, **kwargs)
    cu_k = found[1]
    flat_q = cu_q.reshape(-1).contiguous()
    flat_k = flat_q if cu_k is cu_q else cu_k.reshape(-1).contiguous()
    return wrapped(*args, **{**kwargs, "cu_seq_lens_q": flat_q, "cu_seq_lens_k": flat_k,
                             "max_length_q": longest, "max_length_k": longest})


def apply(ctx: Any) -> None:
    mod = ctx.module(FA_MODULE)
    verdicts = ctx.state.setdefault("verdicts", _Verdicts())
    ctx.wrap(mod, ENTRY, functools.partial(_entry, verdicts))


def check(ctx: Any) -> str | None:
    """The integration must look ``_flash_attention_forward`` up in its module at call time (what
    the wrapper replaces); a copy bound elsewhere would bypass it."""
    outer = getattr(ctx.module(FA_MODULE), "flash_attention_forward", None)
    if ENTRY not in getattr(getattr(outer, "__code__", None), "co_names", ()):
        return f"{FA_MODULE}.flash_attention_forward no longer calls {ENTRY} from its module"
    return None


# ----------------------------------------------------------------------------- probe
class _QuietWarnings:
    """The ``warnings`` module as the probe's copies of TRL's functions see it: ``warn`` records
    instead of warning. Nothing process-global is touched (no filter, no registry)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def warn(self, message: Any, category: Any = None, stacklevel: int = 1, source: Any = None) -> None:
        self.seen.append(str(message))

    def __getattr__(self, name: str) -> Any:
        import warnings

        return getattr(warnings, name)


def _rebound(fn: Any, **names: Any) -> Any:
    """A copy of the plain function ``fn`` (same code, defaults, closure) whose module globals are
    a copy with ``names`` replaced; None when ``fn`` is not a plain function."""
    if type(fn) is not types.FunctionType:
        return None
    new = types.FunctionType(fn.__code__, {**fn.__globals__, **names}, fn.__name__, fn.__defaults__,
                             fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    return new


def _tiny_tokenizer() -> tuple[Any, dict[str, int]]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(("<pad>", "<eos>", "<unk>", "q", "a", "x", "y", "z"))}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>"), vocab


def packed_by_collator(ctx: Any) -> Any:
    """Three tiny examples packed by the installed TRL collator (``padding_free=True``), or a
    reason (str) when it cannot run quietly. TRL's ``__init__`` and ``torch_call`` run as copies
    whose ``warnings`` records instead of warning (TRL 0.17's DeprecationWarning in ``__init__``),
    so no warnings filter matters and nothing the user sees later changes."""
    cls = getattr(ctx.module(COLLATOR_MODULE), COLLATOR)
    quiet = _QuietWarnings()
    init, call = (_rebound(vars(cls).get(n), warnings=quiet) for n in ("__init__", "torch_call"))
    if init is None or call is None:
        return f"{COLLATOR}.__init__/torch_call are not plain functions"
    tok, vocab = _tiny_tokenizer()
    collator = cls.__new__(cls)
    init(collator, [vocab["a"]], tokenizer=tok, padding_free=True)
    return call(collator, [{"input_ids": [3, 5, 4, 6]}, {"input_ids": [3, 4, 7]},
                           {"input_ids": [3, 3, 4, 5, 6]}])


class _Kernel:
    """Stands for flash-attn's kernels in the probe's copy of transformers' entry: records what
    the varlen kernel would get."""

    def __init__(self) -> None:
        self.got: dict[str, Any] = {}

    def varlen(self, q: Any, k: Any, v: Any, **kw: Any) -> Any:
        self.got = kw
        return q.clone()

    def dense(self, q: Any, *a: Any, **kw: Any) -> Any:
        return q.clone()


def _no_flash_kwargs(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return {}


def _unused(*args: Any, **kwargs: Any) -> Any:   # pad/unpad: the probe's call has no padding mask
    raise RuntimeError("not used by the probe")


_VARLEN = ("flash_attn_varlen_func", "flash_attn_2_varlen_func", "flash_attn_3_varlen_func")
_DENSE = ("flash_attn_func", "flash_attn_2_func", "flash_attn_3_func")
_PADDING = ("pad_input", "unpad_input", "pad_input_fa2", "unpad_input_fa2", "pad_input_fa3", "unpad_input_fa3")


def _stand_ins(fn: Any, kernel: _Kernel) -> dict[str, Any] | str:
    """The module globals through which ``fn`` (transformers' ``_flash_attention_forward``) finds
    flash-attn's kernels, each standing for ``kernel``; a reason (str) when it finds them some
    way the probe does not know. Only the copy's globals name them: the module and its caches are
    left as they are (flash-attn's import needs CUDA). By release: 4.51-4.53 call module globals
    ``flash_attn_varlen_func`` (4.53 also ``flash_attn_2_varlen_func``, ``pad_input``, ``HAS_FA3``,
    ...); 4.54-4.55 call ``_lazy_imports(implementation)`` and cache its result in ``globals()``
    (the copy's); 4.56-4.57 call ``lazy_import_flash_attention(implementation)`` -> ((dense, varlen,
    pad, unpad), kwargs builder)."""
    names = set(fn.__code__.co_names)
    source = fn.__globals__   # transformers.modeling_flash_attention_utils
    if "_loaded_implementation" in source:
        return (f"{FA_MODULE}.{ENTRY} looks its kernels up by a loaded implementation the probe "
                "does not know (newer than transformers 4.57)")
    if "lazy_import_flash_attention" in names:
        return {"lazy_import_flash_attention":
                lambda *a, **k: ((kernel.dense, kernel.varlen, _unused, _unused), _no_flash_kwargs)}
    if "_lazy_imports" in names:
        return {"_lazy_imports": lambda *a, **k: (kernel.dense, kernel.varlen, _unused, _unused, False),
                "_flash_fn": kernel.dense, "_flash_varlen_fn": kernel.varlen, "_pad_fn": _unused,
                "_unpad_fn": _unused, "_is_fa3": False, "_flash_supports_window": False}
    if "flash_attn_varlen_func" in names:
        return {**dict.fromkeys(_VARLEN, kernel.varlen), **dict.fromkeys(_DENSE, kernel.dense),
                **dict.fromkeys(_PADDING, _unused), "_flash_supports_window_size": False, "HAS_FA3": False}
    return f"{FA_MODULE}.{ENTRY} finds flash-attn's kernels in a way the probe does not know"


def _through_entry(ctx: Any, batch: Any) -> Any:
    """What flash-attn's varlen kernel gets when transformers' FlashAttention-2 entry, as it is
    live now (wrappers included, ours or not), is called the way the attention integration calls
    it with ``batch``'s keywords: a dict, or a reason (str). The entry runs as a copy whose
    module globals name a recorder as the kernel (the real one needs CUDA)."""
    import torch

    fn = getattr(ctx.module(FA_MODULE), ENTRY)
    layers = []
    while hasattr(fn, "__wrapped__") and hasattr(fn, "_self_wrapper"):   # wrapt FunctionWrapper
        layers.append(fn._self_wrapper)
        fn = fn.__wrapped__
    kernel = _Kernel()
    stand_ins = _stand_ins(fn, kernel)
    if isinstance(stand_ins, str):
        return stand_ins
    call = _rebound(fn, **stand_ins)
    if call is None:
        return f"{FA_MODULE}.{ENTRY} is a {type(fn).__name__}, not a function the probe can run"
    for wrapper in reversed(layers):
        call = functools.partial(lambda w, inner, *a, **k: w(inner, None, a, k), wrapper, call)
    n = batch["input_ids"].shape[1]
    q = torch.zeros(1, n, 1, 8)
    call(q, q, q, None, query_length=n, is_causal=True, position_ids=batch["position_ids"],
         **{k: batch[k] for k in KEYS if k in batch})
    return kernel.got


def _describe(k: str, v: Any) -> str:
    import torch

    if torch.is_tensor(v):
        return f"{k} a {tuple(v.shape)} {str(v.dtype).replace('torch.', '')} tensor"
    name = type(v).__name__
    return f"{k} an {name}" if name[0] in "aeiou" else f"{k} a {name}"


def probe(ctx: Any) -> ProbeResult:
    import torch

    batch = packed_by_collator(ctx)
    if isinstance(batch, str):
        return ProbeResult(None, batch)
    keys = [k for k in KEYS if k in batch]
    if not keys:
        return ProbeResult(False, f"the installed {COLLATOR}(padding_free=True) emits no FlashAttention keys")
    given = ", ".join(_describe(k, batch[k]) for k in ("cu_seq_lens_q", "max_length_q") if k in batch)
    got = _through_entry(ctx, batch)
    if isinstance(got, str):
        return ProbeResult(None, got)
    if not got:
        return ProbeResult(False, f"{COLLATOR}(padding_free=True) emits {given}; transformers' "
                           f"FlashAttention-2 entry does not call the varlen kernel with them")
    cu, mx = got.get("cu_seqlens_q"), got.get("max_seqlen_q")
    ok = (torch.is_tensor(cu) and cu.dim() == 1 and cu.dtype is torch.int32 and type(mx) is int)
    reached = ", ".join(_describe(k, got[k]) for k in ("cu_seqlens_q", "max_seqlen_q") if k in got)
    if ok:
        return ProbeResult(False, f"{COLLATOR}(padding_free=True) emits {given}; FlashAttention-2's "
                           f"varlen kernel gets {reached}")
    return ProbeResult(True, f"{COLLATOR}(padding_free=True) emits {given}; transformers' "
                       f"FlashAttention-2 entry hands the varlen kernel {reached}")
