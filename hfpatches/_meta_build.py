"""Build a model on the meta device in this thread only, with nothing process-global touched.

``with torch.device("meta")`` sets ``torch.utils._device.CURRENT_DEVICE`` (a module global that
torch.compile reads in every thread) and ``accelerate.init_empty_weights`` replaces
``nn.Module.register_parameter`` process-wide; both leak into other threads. A
``TorchFunctionMode`` lives on the calling thread's mode stack only. Used by
``flash_attn_bert_prefix`` (meta build, then assign) and ``hfpatches.loading`` (``explain_load``).
"""
from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any

_MODE: list[Any] = []  # [the TorchFunctionMode class], made on first use (torch is imported lazily)
INIT_FUNCTIONS = ("uniform_", "normal_", "constant_", "kaiming_uniform_")   # torch.nn.init's dispatching ones
FILL_METHODS = ("normal_", "uniform_", "zero_", "fill_")                   # torch.Tensor's in-place fills


def meta_build():
    """A fresh context manager that, in this thread only, builds on the meta device and makes the
    value-filling initialisers a no-op on meta tensors.

    It is a ``torch.overrides.TorchFunctionMode``: torch keeps the mode stack per thread, so entering
    it changes nothing for other threads, and nothing global (``torch.nn.init``, ``torch.Tensor``) is
    patched. It returns the tensor untouched only when that tensor is on the meta device, where a fill
    computes nothing; any other tensor, and every other function, goes through unchanged. It also does what
    ``with torch.device("meta")`` would (a factory call without ``device=``
    builds on meta) without that context manager's process-global side effect
    (``torch.utils._device.CURRENT_DEVICE``, which torch.compile in another thread reads)."""
    if not _MODE:
        import torch
        from torch.overrides import TorchFunctionMode
        from torch.utils._device import _device_constructors

        skip = frozenset([getattr(torch.nn.init, n) for n in INIT_FUNCTIONS if hasattr(torch.nn.init, n)]
                         + [getattr(torch.Tensor, n) for n in FILL_METHODS])
        factories = _device_constructors()
        meta = torch.device("meta")

        class SkipMetaInit(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in factories and kwargs.get("device") is None:
                    kwargs["device"] = meta
                if func in skip:
                    # nn.init passes the tensor as a keyword (tensor=), Tensor methods as self
                    t = args[0] if args else kwargs.get("tensor")
                    if isinstance(t, torch.Tensor) and t.is_meta:
                        return t
                return func(*args, **kwargs)

        _MODE.append(SkipMetaInit)
    return _MODE[0]()
