"""flash_attn_bert_prefix on CUDA: the patched load feeds real flash-attn kernels (fp16/bf16) and
flash-attn's pure-torch CUDA path, compared with transformers on real all-MiniLM-L6-v2.

* ``test_flash_kernels_*``: ``use_flash_attn=True`` (flash-attn's varlen kernel on the padded batch);
  needs flash-attn's compiled CUDA extension, skipped with the reason when it is absent.
* ``test_pure_torch_cuda_path``: ``use_flash_attn=False`` on the GPU, fp32/fp16/bf16; needs only
  an importable flash-attn (the CPU stand-ins in tests/_stubs.py are used when its extension is
  absent - tests only).

Error metric for half precision: max |delta| over non-padded positions divided by
max(1, max |reference|), against transformers in fp32 on the same GPU; bound 2e-2 (bf16 alone
rounds the ~6.0-sized MiniLM activations by up to ~2e-2 absolute, so an absolute bound would test
bf16, not the load). fp32: absolute 1e-4.
"""
from __future__ import annotations

import importlib.util

import pytest

import hfpatches

PID = "flash_attn_bert_prefix"
pytestmark = pytest.mark.gpu
HALF_BOUND = 2e-2
FP32_BOUND = 1e-4


def _has_cuda_extension() -> bool:
    return importlib.util.find_spec("flash_attn_2_cuda") is not None


@pytest.fixture(scope="module")
def fb():
    if importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed in this environment")
    from _stubs import install_flash_attn_cpu_stubs

    install_flash_attn_cpu_stubs()   # no-op when the CUDA extension is there
    import flash_attn.models.bert as mod

    return mod


@pytest.fixture(scope="module")
def demo():
    from hfpatches.demos import flash_attn_bert_prefix as d

    return d


@pytest.fixture(scope="module")
def ref(demo, minilm_dir):
    """transformers' fp32 BertModel on the GPU: (batch on cuda, last hidden state)."""
    b = demo.batch(minilm_dir, device="cuda")
    hidden, _ = demo.hf_outputs(minilm_dir, b, device="cuda")
    return b, hidden


def _error(demo, out, ref_hidden, mask) -> float:
    return demo.max_delta(out, ref_hidden, mask) / max(1.0, ref_hidden.abs().max().item())


def _load_patched(fb, cls, path, cfg):
    with hfpatches.patched(PID) as rep:
        assert rep[PID].outcome == hfpatches.Outcome.APPLIED, rep[PID].reason
        return cls.from_pretrained(path, cfg)


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("cls_name", ["BertModel", "BertForPreTraining"])
def test_flash_kernels_match_transformers(fb, demo, ref, minilm_dir, cls_name, dtype_name):
    import torch

    if not _has_cuda_extension():
        pytest.skip("flash-attn's CUDA extension (flash_attn_2_cuda) is absent: this flash-attn was built "
                    "without CUDA; test_pure_torch_cuda_path covers the GPU path it has")
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip(f"flash-attn 2 kernels need compute capability >= 8.0, this GPU has "
                    f"{torch.cuda.get_device_capability()}")
    dtype = getattr(torch, dtype_name)
    b, ref_hidden = ref
    cls = getattr(fb, cls_name)
    with pytest.raises(KeyError):   # unpatched: the bug, on the GPU stack too
        cls.from_pretrained(minilm_dir, demo.flash_config(minilm_dir, use_flash_attn=True))
    model = _load_patched(fb, cls, minilm_dir, demo.flash_config(minilm_dir, use_flash_attn=True))
    model = model.to(device="cuda", dtype=dtype).eval()
    err = _error(demo, demo.flash_hidden(model, b), ref_hidden, b["attention_mask"])
    print(f"{cls_name} use_flash_attn=True {dtype_name}: scaled max |delta| vs transformers fp32 = {err:.2e}")
    assert err <= HALF_BOUND


@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16"])
def test_pure_torch_cuda_path(fb, demo, ref, minilm_dir, dtype_name):
    import torch

    dtype = getattr(torch, dtype_name)
    b, ref_hidden = ref
    model = _load_patched(fb, fb.BertModel, minilm_dir, demo.flash_config(minilm_dir))
    model = model.to(device="cuda", dtype=dtype).eval()
    out = demo.flash_hidden(model, b)
    if dtype == torch.float32:
        d = demo.max_delta(out, ref_hidden, b["attention_mask"])
        print(f"use_flash_attn=False fp32 on CUDA: max |delta| vs transformers = {d:.2e}")
        assert d <= FP32_BOUND
    else:
        err = _error(demo, out, ref_hidden, b["attention_mask"])
        print(f"use_flash_attn=False {dtype_name} on CUDA: scaled max |delta| = {err:.2e}")
        assert err <= HALF_BOUND


def test_load_under_a_cuda_default_device(fb, demo, ref, minilm_dir):
    """The meta build + assign lands the checkpoint on the default device the user chose."""
    import torch

    b, ref_hidden = ref
    with torch.device("cuda"):
        model = _load_patched(fb, fb.BertModel, minilm_dir, demo.flash_config(minilm_dir))
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    d = demo.max_delta(demo.flash_hidden(model.eval(), b), ref_hidden, b["attention_mask"])
    assert d <= FP32_BOUND


def test_prefixed_checkpoint_mlm_logits_on_cuda(fb, demo, minilm_dir, tmp_path):
    import torch

    pre = demo.write_pretraining_checkpoint(minilm_dir, str(tmp_path / "pretraining"))
    b = demo.batch(minilm_dir, device="cuda")
    ref_hidden, ref_logits = demo.hf_outputs(pre, b, pretraining=True, device="cuda")
    model = _load_patched(fb, fb.BertForPreTraining, pre, demo.flash_config(pre)).to("cuda").eval()
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert demo.max_delta(demo.flash_hidden(model, b), ref_hidden, b["attention_mask"]) <= FP32_BOUND
    logits = demo.flash_mlm_logits(model, b)
    assert demo.max_delta(logits, ref_logits, b["attention_mask"]) <= FP32_BOUND * 10
    assert torch.isfinite(logits).all()
