"""Run ``python -m hfpatches demo`` on a machine without CUDA (the README's main job).

flash-attn cannot be imported without its CUDA extension. Only for this run, the test-only
stand-ins from tests/_stubs.py replace the pieces that cannot run without a GPU (the compiled
``flash_attn_2_cuda`` module, the Triton LayerNorm that queries the GPU at import, and
torchvision's StochasticDepth); the BERT model itself runs flash-attn's real pure-torch code.
On a CUDA machine with a real flash-attn build nothing is stubbed.
"""
import os
import sys

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(root, "tests"))
os.environ.setdefault("HFPATCHES_CACHE", os.path.join(root, ".cache"))

from _stubs import flash_attn_cuda_available, install_flash_attn_cpu_stubs  # noqa: E402

import importlib.util  # noqa: E402

if not flash_attn_cuda_available() and importlib.util.find_spec("flash_attn") is not None:
    install_flash_attn_cpu_stubs()
    print("note: no CUDA here - flash-attn's CUDA-only modules are replaced by the test stand-ins "
          "in tests/_stubs.py for this demo (not part of the package)")

from hfpatches._demo import main  # noqa: E402

sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None))
