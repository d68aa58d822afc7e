"""GPU tests of ``packed_attention_boundaries`` (real kernels on CUDA; skip cleanly elsewhere)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_fixed_on_cuda():
    pytest.skip("write me")
