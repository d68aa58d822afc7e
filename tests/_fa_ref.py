"""CPU-test-only stand-in for flash-attn's kernels inside transformers' FlashAttention-2 path.

Never imported by the package. ``flash_attn_varlen_func`` / ``flash_attn_func`` are pure-torch
references (per-sequence causal attention with ``scaled_dot_product_attention`` in float32), and
they check their arguments the way the CUDA kernel does (csrc/flash_attn/flash_api.cpp,
``mha_varlen_fwd``): ``cu_seqlens_*`` must be int32, contiguous and of shape (batch_size + 1,)
with ``batch_size = cu_seqlens_q.numel() - 1`` -- a (1, n+1) tensor fails with the kernel's
message "cu_seqlens_q must have shape (batch_size + 1)". ``max_seqlen_*`` is taken as an int
(a 1-element tensor converts through ``__index__``, as in the pybind call) and must bound every
sequence (the kernel tiles by it; a too-small value gives wrong results there, an error here).

``install(monkeypatch)`` puts them into ``transformers.modeling_flash_attention_utils`` for one
test, where its ``_flash_attention_forward`` finds them at call time: 4.51-4.53 look up the module
globals ``flash_attn_varlen_func`` / ``flash_attn_func`` (4.53: ``flash_attn_2_*``); 4.54-4.55
keep ``_lazy_imports``' result in module globals ``_flash_fn`` / ``_flash_varlen_fn`` / ... ;
4.56-4.57 call ``lazy_import_flash_attention``, which returns its cache ``_flash_fn`` /
``_flash_varlen_fn`` / ``_pad_fn`` / ``_unpad_fn`` / ``_process_flash_kwargs_fn`` once filled.
Those caches are filled here, so flash-attn (its import needs CUDA) is never imported.
``installed()`` is the same as a context manager for child processes. ``calls`` records what the
varlen function got.
"""
from __future__ import annotations

import contextlib

import torch

MODULE = "transformers.modeling_flash_attention_utils"


class Reference:
    def __init__(self):
        self.calls: list[dict] = []

    @staticmethod
    def _attend(q, k, v, scale, causal):
        """q (L, H, D), k/v (L, Hk, D) -> (L, H, D); grouped-query heads repeated like the kernel."""
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1).float(), k.transpose(0, 1).float(), v.transpose(0, 1).float(),
            is_causal=causal, scale=scale)
        return out.transpose(0, 1).to(q.dtype)

    def varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
               deterministic=False, return_attn_probs=False, block_table=None):
        self.calls.append({"cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k,
                           "max_seqlen_q": max_seqlen_q, "max_seqlen_k": max_seqlen_k})
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if cu.dtype != torch.int32:
                raise RuntimeError(f"{name} must have dtype int32")
            if not cu.is_contiguous():
                raise RuntimeError(f"{name} must be contiguous")
            if tuple(cu.shape) != (cu_seqlens_q.numel(),):
                raise RuntimeError(f"{name} must have shape (batch_size + 1)")
        if dropout_p:
            raise NotImplementedError("the reference has no dropout")
        mq, mk = max_seqlen_q.__index__(), max_seqlen_k.__index__()
        bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        out = torch.empty_like(q)
        for (sq, eq), (sk, ek) in zip(zip(bounds_q[:-1], bounds_q[1:]), zip(bounds_k[:-1], bounds_k[1:])):
            if eq - sq > mq or ek - sk > mk:
                raise RuntimeError(f"a sequence of {eq - sq} tokens exceeds max_seqlen_q={mq}")
            out[sq:eq] = self._attend(q[sq:eq], k[sk:ek], v[sk:ek], softmax_scale, causal)
        return out

    def dense(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        if dropout_p:
            raise NotImplementedError("the reference has no dropout")
        return torch.stack([self._attend(q[b], k[b], v[b], softmax_scale, causal) for b in range(q.shape[0])])


def _padding(mod):
    """transformers' own pure-torch pad/unpad (flash-attn's need its import)."""
    pad = getattr(mod, "_pad_input", None) or getattr(mod, "_fa3_pad_input")
    unpad = getattr(mod, "_unpad_input", None) or getattr(mod, "_fa3_unpad_input")
    return pad, unpad


def _values(mod, ref: Reference) -> dict:
    """The module globals to set so that ``mod._flash_attention_forward`` calls ``ref``."""
    names = set(mod._flash_attention_forward.__code__.co_names)
    if "_loaded_implementation" in vars(mod):
        raise NotImplementedError(f"{MODULE}: the stand-in knows transformers 4.51-4.57's lookups only")
    if "lazy_import_flash_attention" in names:   # 4.56-4.57: its cache, once filled, is returned
        pad, unpad = _padding(mod)
        return {"_flash_fn": ref.dense, "_flash_varlen_fn": ref.varlen, "_pad_fn": pad, "_unpad_fn": unpad,
                "_process_flash_kwargs_fn": mod._lazy_define_process_function(ref.varlen)}
    if "_lazy_imports" in names:                 # 4.54-4.55: the cache it keeps in globals()
        pad, unpad = _padding(mod)
        return {"_flash_fn": ref.dense, "_flash_varlen_fn": ref.varlen, "_pad_fn": pad, "_unpad_fn": unpad,
                "_is_fa3": False, "_flash_supports_window": True}
    # 4.51-4.53 (4.53 picks flash_attn_2_* / pad_input_fa2 for attn_implementation="flash_attention_2")
    out = {"flash_attn_varlen_func": ref.varlen, "flash_attn_func": ref.dense,
           "_flash_supports_window_size": False}
    if "flash_attn_2_varlen_func" in names:
        pad, unpad = _padding(mod)
        out.update(flash_attn_2_varlen_func=ref.varlen, flash_attn_2_func=ref.dense, HAS_FA3=False,
                   pad_input=pad, unpad_input=unpad, pad_input_fa2=pad, unpad_input_fa2=unpad)
    return out


def install(monkeypatch) -> Reference:
    import importlib

    mod = importlib.import_module(MODULE)
    ref = Reference()
    for k, v in _values(mod, ref).items():
        monkeypatch.setattr(mod, k, v, raising=False)
    return ref


@contextlib.contextmanager
def installed():
    import importlib

    mod = importlib.import_module(MODULE)
    ref = Reference()
    missing = object()
    values = _values(mod, ref)
    saved = {k: vars(mod).get(k, missing) for k in values}
    try:
        for k, v in values.items():
            setattr(mod, k, v)
        yield ref
    finally:
        for k, v in saved.items():
            if v is missing:
                delattr(mod, k)
            else:
                setattr(mod, k, v)
