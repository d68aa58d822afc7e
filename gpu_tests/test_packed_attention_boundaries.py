"""packed_attention_boundaries on CUDA: sdpa in bf16, a tiny Llama/Qwen2/Mistral, packed vs alone.

bf16 tolerance: logits within 5e-2 absolute (the CPU fp32 tests check the same paths at 1e-5).
"""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import hfpatches  # noqa: E402
from hfpatches.demos import packed_attention_boundaries as demo  # noqa: E402

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("cache", [False, True])
def test_sdpa_bf16_packed_equals_alone(arch, cache):
    model = demo.tiny_model(arch, "sdpa", dtype=torch.bfloat16, device="cuda")
    hfpatches.revert([demo.PID])
    un = demo.gaps(model, use_cache=cache)[0]
    rep = hfpatches.apply(only=[demo.PID])[demo.PID]
    try:
        assert rep.outcome.value == "APPLIED", rep
        assert demo.gaps(model, use_cache=cache)[0] <= 5e-2
        assert demo.gaps(model, use_cache=cache, train=True)[0] <= 5e-2
    finally:
        hfpatches.revert([demo.PID])
    assert un > 0.1 or not cache and un <= 5e-2
