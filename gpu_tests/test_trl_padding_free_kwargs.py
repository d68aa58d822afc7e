"""trl_padding_free_kwargs on CUDA: flash-attn's real varlen kernel, SmolLM2-135M in bf16.

* TRL 0.17's padding-free batch through a real ``Trainer``'s input preparation, and in a custom
  loop (``model(**batch)``, no Trainer): without the patch the kernel rejects the (1, n+1)
  ``cu_seq_lens`` (huggingface/trl#3243); with it the batch reaches the layers as TRL built it and
  transformers' FlashAttention-2 entry hands the kernel the documented form: each sequence's
  logits equal the same sequence run alone, and the packed loss (forward + backward) equals the
  sequences run one by one;
* one real ``trl.SFTTrainer`` step with the padding-free collator and flash_attention_2, without
  and with the patch; and with Liger's kernels (``use_liger_kernel=True``) and liger_flash_kwargs
  live too.

Tolerance: bf16 (8 mantissa bits, relative step ~4e-3) through 30 layers, and the compared runs
use different kernels (varlen vs single-sequence attention): logits within 0.1 absolute (logits
are O(10)), losses within 2e-2 relative -- the fp32 CPU tests check the same paths at 1e-5/1e-6.
"""
from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("trl")

import hfpatches  # noqa: E402
from hfpatches.demos import liger_flash_kwargs as liger_demo  # noqa: E402
from hfpatches.demos import trl_padding_free_kwargs as demo  # noqa: E402

PID = demo.PID
LOGITS_ATOL = 0.1
BF16_REL = 2e-2


@pytest.fixture(autouse=True)
def _need_fa2():
    from _stubs import flash_attn_cuda_available  # gpu_tests/conftest.py puts tests/ on sys.path

    if not flash_attn_cuda_available():
        pytest.skip("flash-attn's CUDA extension (flash_attn_2_cuda) is not installed")


@pytest.fixture(scope="module")
def tok():
    return liger_demo.tokenizer()            # SmolLM2's real tokenizer (packaged GGUF, cached)


@pytest.fixture(scope="module")
def batch(tok):
    b = demo.packed_batch(tok)
    if b is None:
        pytest.skip("the installed TRL has no DataCollatorForCompletionOnlyLM (removed in 0.20)")
    return b


@pytest.fixture(scope="module")
def model():
    return liger_demo.smollm2(device="cuda", dtype=torch.bfloat16, attn_implementation="flash_attention_2")


def test_real_kernel_rejects_trl_form_and_accepts_the_fix(batch, model, tmp_path):
    trainer = demo.make_trainer(model, str(tmp_path))
    hfpatches.revert([PID])
    inputs = trainer._prepare_inputs(batch)
    assert tuple(inputs["cu_seq_lens_q"].shape) == (1, 4)
    with torch.no_grad(), pytest.raises((RuntimeError, TypeError)) as err:
        model(**inputs)
    assert "cu_seqlens" in str(err.value) or "max_seqlen" in str(err.value), err.value
    rep = hfpatches.apply(only=[PID])[PID]
    assert rep.outcome == hfpatches.Outcome.APPLIED, rep.reason
    inputs = trainer._prepare_inputs(batch)
    model.zero_grad(set_to_none=True)
    with demo.attention_kwargs(model) as seen:
        out = model(**inputs)
        out.loss.backward()
    assert len(seen) == model.config.num_hidden_layers     # the batch reaches the layers as TRL built it
    assert all(s["cu_seq_lens_q"] is inputs["cu_seq_lens_q"] and s["max_length_q"] is inputs["max_length_q"]
               for s in seen)
    assert math.isfinite(out.loss.item())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad(set_to_none=True)
    gap = demo.per_sequence_gap(model, inputs, out.logits.detach())
    assert gap <= LOGITS_ATOL, gap
    with torch.no_grad():
        alone = liger_demo.one_by_one_loss(model, inputs)
    assert liger_demo.rel(out.loss.item(), alone) <= BF16_REL, (out.loss.item(), alone)


def test_custom_loop_real_kernel(batch, model):
    """No Trainer: the collator's batch moved to the GPU by hand, ``model(**batch)``, backward.
    Unpatched the kernel rejects it; patched it trains, each sequence's logits match the sequence
    alone and the loss matches the sequences one by one (bf16 tolerances)."""
    feed = {k: v.to("cuda") for k, v in batch.items()}
    hfpatches.revert([PID])
    with torch.no_grad(), pytest.raises((RuntimeError, TypeError)) as err:
        model(**feed)
    assert "cu_seqlens" in str(err.value) or "max_seqlen" in str(err.value), err.value
    assert hfpatches.apply(only=[PID])[PID].outcome == hfpatches.Outcome.APPLIED
    try:
        model.zero_grad(set_to_none=True)
        out = model(**feed)
        out.loss.backward()
        assert math.isfinite(out.loss.item())
        assert any(p.grad is not None for p in model.parameters())
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        model.zero_grad(set_to_none=True)
        gap = demo.per_sequence_gap(model, feed, out.logits.detach())
        assert gap <= LOGITS_ATOL, gap
        with torch.no_grad():
            alone = liger_demo.one_by_one_loss(model, feed)
        assert liger_demo.rel(out.loss.item(), alone) <= BF16_REL, (out.loss.item(), alone)
    finally:
        hfpatches.revert([PID])


def _sft_step(tok, tmp, *, liger: bool):
    import warnings

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    warnings.filterwarnings("ignore")
    model = liger_demo.smollm2(device="cuda", dtype=torch.bfloat16, attn_implementation="flash_attention_2")
    data = Dataset.from_dict({"text": [p + c for p, c in demo.PAIRS]})
    args = SFTConfig(output_dir=tmp, max_steps=1, per_device_train_batch_size=len(demo.PAIRS),
                     learning_rate=1e-5, report_to=[], save_strategy="no", logging_steps=1, bf16=True,
                     disable_tqdm=True, dataloader_num_workers=0, seed=0, use_liger_kernel=liger)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                         data_collator=demo.collator(tok))
    with liger_demo.keys_seen(model, demo.KEYS) as seen:
        loss = trainer.train().training_loss
    return loss, seen


def test_sft_trainer_step(batch, tok, tmp_path):
    import transformers.trainer  # noqa: F401

    hfpatches.revert([PID])
    with pytest.raises((RuntimeError, TypeError), match="cu_seqlens|max_seqlen"):
        _sft_step(tok, str(tmp_path), liger=False)
    assert hfpatches.apply(only=[PID])[PID].outcome == hfpatches.Outcome.APPLIED
    loss, seen = _sft_step(tok, str(tmp_path), liger=False)
    assert math.isfinite(loss) and 0.1 < loss < 20, loss
    assert sorted(seen["attention"]) == sorted(demo.KEYS)


def test_sft_trainer_step_with_liger(batch, tok, tmp_path):
    """Liger's real kernels (use_liger_kernel=True) + both patches: padding-free + Liger + FA2
    trains. liger_flash_kwargs hands on only the documented form, so with TRL's batch the decoder
    derives the same boundaries from position_ids."""
    pytest.importorskip("liger_kernel")
    import liger_kernel.transformers  # noqa: F401  (both patches attach now, not DEFERRED)
    import transformers.trainer  # noqa: F401

    ids = ["liger_flash_kwargs", PID]
    try:
        rep = hfpatches.apply(only=ids)
        if rep["liger_flash_kwargs"].outcome != hfpatches.Outcome.APPLIED:
            pytest.skip(f"liger_flash_kwargs: {rep['liger_flash_kwargs'].outcome.value} on this stack")
        assert rep[PID].outcome == hfpatches.Outcome.APPLIED, rep[PID].reason
        # Liger has no revert: liger_forward puts transformers' Llama module and class back afterwards
        # (the Trainer's use_liger_kernel applies Liger again inside, after hfpatches)
        with liger_demo.liger_forward("llama", flce_only=False):
            loss, seen = _sft_step(tok, str(tmp_path), liger=True)
    finally:
        hfpatches.revert(ids)
    assert math.isfinite(loss) and 0.1 < loss < 20, loss
