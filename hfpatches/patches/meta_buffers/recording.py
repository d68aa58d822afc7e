"""Recorded construction for ``meta_buffers``: build a module's skeleton on the meta device in this
thread only, record the tensor operations that produced its non-persistent buffers, and replay only
those on a real device (see ``_Recording``). Imported by ``impl`` when a recipe needs it."""
from __future__ import annotations

from typing import Any

from . import PATCH


def _logger() -> Any:
    import logging

    return logging.getLogger(f"hfpatches.{PATCH.id}")


# Why not accelerate.init_empty_weights(include_buffers=False): it replaces nn.Module.register_parameter
# process-wide while it runs, so a model built eagerly in another thread meanwhile gets meta parameters
# (and two overlapping uses can leave it patched). Torch keeps the TorchFunctionMode stack per thread,
# so a mode changes nothing for any other thread; torch.device("meta") is avoided too: its __enter__
# sets the module global torch.utils._device.CURRENT_DEVICE.
_RNG = frozenset({
    "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "normal", "bernoulli",
    "multinomial", "poisson", "dropout", "normal_", "uniform_", "bernoulli_", "random_", "exponential_",
    "geometric_", "cauchy_", "log_normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
    "xavier_uniform_", "xavier_normal_", "orthogonal_", "sparse_"})
_INPLACE = frozenset({"__setitem__", "__set__", "__iadd__", "__isub__", "__imul__", "__itruediv__",
                      "__ifloordiv__", "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__",
                      "__irshift__", "__imatmul__"})
_ESCAPES = frozenset({"untyped_storage", "storage", "_typed_storage", "numpy", "__dlpack__", "data_ptr",
                      "__array__", "share_memory_"})


class _Unreplayable(Exception):
    pass


def _flat(x, out: list) -> list:
    import torch

    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for y in x:
            _flat(y, out)
    elif isinstance(x, dict):
        for y in x.values():
            _flat(y, out)
    return out


def _key(t):
    """Aliasing key: tensors sharing storage (views, ``.data``, a Parameter and its data) share it."""
    try:
        return t.untyped_storage()._cdata
    except Exception:  # noqa: BLE001 - sparse, nested, ...: only itself
        return ("id", id(t))


class _Recording:
    """A constructor run in this thread under a ``TorchFunctionMode`` that puts every factory call
    without an explicit device on meta (what ``torch.device("meta")`` does) and logs every torch
    call in order, with the storages each call read, wrote and produced. A meta buffer's value is
    then recovered by replaying, on the CPU, exactly the logged calls it depends on (through
    aliases and in-place writes). Refused (no value) when that lineage involves random numbers, a
    meta tensor the log did not produce (e.g. made outside torch functions), a real tensor written
    in place, or a call that exposes raw storage (writes the log cannot see)."""

    def __init__(self, result, log):
        self.result, self.log = result, log

    @classmethod
    def of(cls, build) -> _Recording:
        import torch
        from torch.overrides import TorchFunctionMode
        from torch.utils._device import _device_constructors

        factories = _device_constructors()
        log: list = []

        class Record(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                call = kwargs
                if func in factories and kwargs.get("device") is None:
                    call = {**kwargs, "device": torch.device("meta")}
                name = getattr(func, "__name__", "")
                written = []
                first = None
                if (name.endswith("_") and not name.endswith("__")) or name in _INPLACE:
                    first = args[0] if args else kwargs.get("tensor", kwargs.get("input"))
                    _flat(first, written)
                if name in _RNG and isinstance(first, torch.Tensor) and first.is_meta:
                    out = first  # a random fill of a meta tensor computes nothing (and is slow): logged only
                else:
                    out = func(*args, **call)
                if "out" in kwargs:
                    _flat(kwargs["out"], written)
                ins = _flat((args, kwargs), [])
                outs = _flat(out, [])
                log.append((func, args, kwargs, out, name, {_key(t) for t in ins}, {_key(t) for t in outs},
                            {_key(t) for t in written}))
                return out

        with Record():
            result = build()
        return cls(result, log)

    def replay(self, wanted: list) -> dict:
        """``{id(tensor): CPU value}`` for the wanted meta tensors that can be replayed; all at
        once, or, if that is refused, one by one (one bad lineage does not spoil the others)."""
        try:
            return self._replay(wanted)
        except _Unreplayable as e:
            _logger().debug("replay of %d buffer(s) refused: %s", len(wanted), e)
        out = {}
        for t in wanted:
            try:
                out.update(self._replay([t]))
            except _Unreplayable as e:
                _logger().debug("replay refused: %s", e)
        return out

    def _replay(self, wanted: list) -> dict:
        import torch

        wanted = [t for t in wanted if t.is_meta]
        need = {_key(t) for t in wanted}
        steps = []
        for i in range(len(self.log) - 1, -1, -1):  # backwards: what each needed storage depends on
            ins, outs, written = self.log[i][5:]
            if need & outs or need & written:
                steps.append(i)
                need |= ins | outs
        steps.reverse()
        for i in steps:
            if self.log[i][4] in _RNG:
                raise _Unreplayable(f"{self.log[i][4]}: random values cannot be recomputed")
        written_anywhere = set().union(*(e[7] for e in self.log)) if self.log else set()
        for e in self.log:
            if e[4] in _ESCAPES and need & e[5]:
                raise _Unreplayable(f"{e[4]}: raw storage exposed, writes through it are not logged")
        real: dict = {}

        def conv(x):
            if isinstance(x, torch.Tensor):
                r = real.get(id(x))
                if r is not None:
                    return r
                if x.is_meta:
                    raise _Unreplayable("a meta tensor not produced by a logged call")
                if _key(x) in written_anywhere:
                    raise _Unreplayable("a real tensor written in place during construction")
                return x
            if isinstance(x, (list, tuple)):
                y = [conv(v) for v in x]
                return type(x)(*y) if hasattr(x, "_fields") else type(x)(y)
            if isinstance(x, dict):
                return {k: conv(v) for k, v in x.items()}
            return x

        with torch.no_grad():
            for i in steps:
                func, args, kwargs, out = self.log[i][:4]
                res = func(*conv(args), **conv(kwargs))
                for o, r in zip(_flat(out, []), _flat(res, [])):
                    real[id(o)] = r
        got = {}
        for t in wanted:
            r = real.get(id(t))
            if r is None or r.is_meta or r.shape != t.shape or r.dtype != t.dtype:
                continue
            got[id(t)] = r.detach().clone()
        return got


