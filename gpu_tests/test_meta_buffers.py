"""meta_buffers on CUDA: init_empty_weights -> to_empty("cuda") -> load_state_dict in bf16 gives
the logits of ``from_pretrained(..., device_map="cuda")`` bit for bit; without the patch it does not.

The recipes compute buffers on the CPU and copy them to the device, as ``from_pretrained`` does
(4.51: buffers computed in ``__init__`` on the CPU, then dispatched; 5.x: ``_init_weights`` on the
CPU, copied into the device buffer), so equality is exact, not within a tolerance.
"""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import hfpatches  # noqa: E402
from hfpatches.demos import meta_buffers as demo  # noqa: E402

PID = "meta_buffers"


def _round_trip(build, sd, include_buffers):
    with demo.nan_for_uninitialised():  # uninitialised memory is NaN: it can never pass by chance
        return demo.meta_round_trip(build, sd, device="cuda", include_buffers=include_buffers)


def _buffers(model) -> dict:
    return {k: (v.dtype, v.device.type) for k, v in model.named_buffers()}


@pytest.mark.parametrize("include_buffers", [False, True], ids=["buffers_real", "buffers_meta"])
def test_smollm2_bf16_cuda_matches_from_pretrained(smollm_dir, include_buffers):
    ref, sd, build = demo.smollm2_case(smollm_dir, device="cuda", dtype=torch.bfloat16)
    batch, labels = demo.lm_batch(smollm_dir, device="cuda")
    want_loss, want = demo.lm_outputs(ref, batch, labels)

    model, res = _round_trip(build, sd, include_buffers)
    assert res.missing_keys == ["lm_head.weight"] and not res.unexpected_keys
    bad_loss, bad = demo.lm_outputs(model, batch, labels)
    assert not torch.equal(bad, want), f"unpatched loss {bad_loss} == from_pretrained {want_loss}: bug not reproduced"
    del model

    rep = hfpatches.apply(only=[PID])
    assert rep[PID].outcome == hfpatches.Outcome.APPLIED, rep[PID].reason
    model, _ = _round_trip(build, sd, include_buffers)
    assert model.dtype == torch.bfloat16 and model.device.type == "cuda"
    assert _buffers(model) == _buffers(ref), "buffer dtypes/devices differ from from_pretrained"
    for name, buf in ref.named_buffers():
        assert torch.equal(dict(model.named_buffers())[name], buf), name
    loss, got = demo.lm_outputs(model, batch, labels)
    assert loss == want_loss and torch.equal(got, want), (
        f"patched loss {loss} vs from_pretrained {want_loss} (unpatched {bad_loss}); "
        f"max |d logits| {demo.max_abs(got, want):.3g}")


def test_minilm_bert_cuda_matches_from_pretrained(minilm_dir):
    ref, sd, build = demo.minilm_case(minilm_dir, device="cuda")
    batch = demo.bert_batch(minilm_dir, device="cuda")
    want = demo.bert_hidden(ref, batch)
    model, _ = _round_trip(build, sd, True)
    # Unpatched: look at the buffer, do not run it: garbage indices trip a device-side assert that
    # would poison the CUDA context for every later test.
    assert not torch.equal(model.embeddings.position_ids, ref.embeddings.position_ids)
    hfpatches.apply(only=[PID])
    model, _ = _round_trip(build, sd, True)
    assert torch.equal(model.embeddings.position_ids, ref.embeddings.position_ids)
    got = demo.bert_hidden(model, batch)
    assert torch.equal(got, want), f"max |d| {demo.max_abs(got, want):.3g}"
