"""CPU-test-only stand-ins for the parts of flash-attn that cannot run without a GPU.

Never imported by the package. What is replaced, and why (../shared/design/BUGS.md):
* ``flash_attn_2_cuda``: the compiled CUDA extension (absent from a CUDA-less build). An empty
  module: models built with ``use_flash_attn=False`` never call it.
* ``flash_attn.ops.triton.layer_norm``: calls ``torch.cuda.get_device_properties`` at import.
  Replaced by a module whose ``layer_norm_fn``/``rms_norm_fn`` are None (flash-attn's own
  "not available" value); used only with ``fused_dropout_add_ln=True``.
* ``torchvision.ops.StochasticDepth``: PyPI torchvision does not import beside torch 2.13 CPU.
  Identity when ``p == 0`` or in eval mode (flash-attn's BERT uses p == 0), else the real formula.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types


def _module(name: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return mod


def flash_attn_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn_2_cuda") is not None


def install_flash_attn_cpu_stubs() -> None:
    """Make ``import flash_attn.models.bert`` work on a CPU-only machine. Idempotent."""
    if flash_attn_cuda_available() or "flash_attn_2_cuda" in sys.modules:
        return
    import torch

    sys.modules["flash_attn_2_cuda"] = _module("flash_attn_2_cuda")
    ln = _module("flash_attn.ops.triton.layer_norm")
    ln.layer_norm_fn = None
    ln.rms_norm_fn = None
    ln.RMSNorm = None
    ln.LayerNorm = None
    sys.modules["flash_attn.ops.triton.layer_norm"] = ln
    try:
        import torchvision.ops  # noqa: F401
    except Exception:
        class StochasticDepth(torch.nn.Module):
            def __init__(self, p: float, mode: str):
                super().__init__()
                self.p, self.mode = p, mode

            def forward(self, x):
                if self.p == 0.0 or not self.training:
                    return x
                keep = 1.0 - self.p
                shape = [x.shape[0]] + [1] * (x.ndim - 1) if self.mode == "row" else [1] * x.ndim
                noise = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
                return x * noise / keep

        for name in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[name]
        tv, ops = _module("torchvision"), _module("torchvision.ops")
        ops.StochasticDepth = StochasticDepth
        tv.ops = ops
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = tv, ops
