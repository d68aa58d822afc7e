"""liger_flash_kwargs on CUDA: Liger's real Triton kernels (fused linear cross-entropy, RMSNorm,
RoPE, SwiGLU -- no references), SmolLM2-135M in bf16, ``attn_implementation`` sdpa and, where
flash-attn's CUDA extension is installed, flash_attention_2.

* the TypeError reproduced without the patch (liger-kernel 0.5.6), and with it the loss of plain
  transformers on the same packed batch, within bf16 tolerance;
* the packed batch's loss (forward + backward through the real kernels) equals the same sequences
  run one by one, within bf16 tolerance.

Batches: TRL's padding-free collator exactly as built (TRL 0.17 gives ``cu_seq_lens_*`` a batch
dimension, which ``flash_attn_varlen_func`` rejects, huggingface/trl#3243: the patch does not hand
that form to the decoder), and the same batch in transformers' documented form (1-D int32
``cu_seq_lens_*``, int ``max_length_*``), which the patch hands to the decoder.

Tolerance: bf16 keeps 8 bits of mantissa (relative step 2**-8 ~ 4e-3 per rounding) and the
activations go through 30 layers, whose kernels differ between the compared runs (Liger's vs
transformers' RMSNorm/RoPE/SwiGLU; varlen vs single-sequence attention): the losses are compared
at 2e-2 relative, the fp32 CPU tests check the same paths at 1e-6.
"""
from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("liger_kernel")
pytest.importorskip("trl")

import hfpatches  # noqa: E402
from hfpatches.demos import liger_flash_kwargs as demo  # noqa: E402

PID = demo.PID
KEYS = sorted(("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"))
BF16_REL = 2e-2
ATTNS = ["sdpa", "flash_attention_2"]
FORMS = ["trl", "documented"]
TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


def _fa2_missing() -> str | None:
    from _stubs import flash_attn_cuda_available  # gpu_tests/conftest.py puts tests/ on sys.path

    if not flash_attn_cuda_available():
        return "flash-attn's CUDA extension (flash_attn_2_cuda) is not installed"
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return "transformers reports flash_attention_2 as unavailable"
    return None


def _need(attn: str) -> None:
    if attn == "flash_attention_2":
        why = _fa2_missing()
        if why:
            pytest.skip(why)


@pytest.fixture(scope="module")
def trl_batch():
    batch, producer = demo.packed_batch(demo.tokenizer(), device="cuda")
    assert set(KEYS) <= set(batch), (producer, sorted(batch))
    return batch


def _batch(trl_batch, form):
    return trl_batch if form == "trl" else demo.documented_form(trl_batch)


def _model(attn):
    return demo.smollm2(device="cuda", dtype=torch.bfloat16, attn_implementation=attn)


def _in_range() -> bool:
    import liger_kernel.transformers  # noqa: F401  (else the patch is DEFERRED)

    rep = hfpatches.apply(only=[PID])[PID]
    hfpatches.revert([PID])
    assert rep.outcome in (hfpatches.Outcome.APPLIED, hfpatches.Outcome.NOT_AFFECTED), rep.reason
    return rep.outcome == hfpatches.Outcome.APPLIED


def _handed_on(batch) -> bool:
    from hfpatches.patches.liger_flash_kwargs.impl import malformed

    return malformed({k: batch[k] for k in KEYS}, torch) is None


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("attn", ATTNS)
def test_typeerror_without_patch_then_plain_transformers_loss(trl_batch, attn, form):
    _need(attn)
    batch = _batch(trl_batch, form)
    if attn == "flash_attention_2" and not _handed_on(batch):
        pytest.skip("plain transformers (the reference here) itself fails on TRL 0.17's keys with "
                    "flash_attention_2: 'cu_seqlens_q must have shape (batch_size + 1)' "
                    "(huggingface/trl#3243); covered by test_packed_loss_matches_one_by_one")
    in_range = _in_range()
    model = _model(attn)
    with torch.no_grad():
        r = demo.parity(model, "llama", batch, grads=False, flce_only=False)
    if in_range:
        assert r["before_error"] and "unexpected keyword argument 'cu_seq_lens_q'" in r["before_error"], r
        assert r["before_decoder_keys"] == [], r
        assert r["outcome"] == "APPLIED", r
        assert r["after_decoder_keys"] == (KEYS if _handed_on(batch) else []), r
    else:
        assert r["before_error"] is None and r["outcome"] == "NOT_AFFECTED", r
        assert r["before_decoder_keys"] == KEYS, r
    assert r["after_error"] is None, r
    assert math.isfinite(r["after_loss"]) and r["rel"] <= BF16_REL, r


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("attn", ATTNS)
def test_packed_loss_matches_one_by_one(trl_batch, attn, form):
    _need(attn)
    if attn == "sdpa" and TRANSFORMERS_MAJOR < 5:
        pytest.skip("transformers 4.x sdpa attends across the sequences of a packed row (it builds no "
                    "mask from position_ids; TRL warns that padding-free needs flash_attention_2): "
                    "packed != one by one there with or without Liger")
    batch = _batch(trl_batch, form)
    in_range = _in_range()
    model = _model(attn)
    with hfpatches.patched(PID), demo.liger_forward("llama", flce_only=False, model=model):
        with demo.keys_seen(model, KEYS) as seen:
            out = model(**batch)
            out.loss.backward()           # the real FLCE/RMSNorm/RoPE/SwiGLU backward kernels
        packed = out.loss.item()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            single = demo.one_by_one_loss(model, batch)
    assert math.isfinite(packed) and demo.rel(packed, single) <= BF16_REL, (packed, single)
    if in_range:
        assert sorted(seen["decoder"]) == (KEYS if _handed_on(batch) else []), seen
    else:   # liger >= 0.6 hands them to the decoder itself
        assert sorted(seen["decoder"]) == KEYS, seen
