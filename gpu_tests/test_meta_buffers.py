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


ROPE_SCALINGS = {  # the same as tests/test_meta_buffers.py
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "longrope": {"rope_type": "longrope", "factor": 4.0, "short_factor": [1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.0, 2.5],
                 "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 9.0], "original_max_position_embeddings": 16},
}


@pytest.mark.parametrize("rope", sorted(ROPE_SCALINGS))
def test_per_module_rope_scaling_cuda_matches_eager(rope):
    """Issue 12 item 11 on CUDA: FSDP-style ``to_empty(device="cuda", recurse=False)`` module by
    module on a tiny Llama with llama3 / yarn / longrope RoPE. Unpatched the rotary buffers are
    garbage (NaN here); patched they equal the eager model's moved to CUDA bit for bit (computed on
    the CPU as the constructor does, then copied), and so do the logits."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rope_scaling=ROPE_SCALINGS[rope])
    torch.manual_seed(0)
    ref = LlamaForCausalLM(cfg).eval()
    sd = ref.state_dict()
    ref = ref.to("cuda")
    want = dict(ref.named_buffers())
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1)).to("cuda")

    def build():
        with init_empty_weights(include_buffers=True):
            model = LlamaForCausalLM(cfg)
        with demo.nan_for_uninitialised():
            for m in list(model.modules()):
                m.to_empty(device="cuda", recurse=False)
        return model

    bad = build()
    assert not all(torch.equal(b, want[n]) for n, b in bad.named_buffers()), "unpatched: bug not reproduced"
    del bad
    rep = hfpatches.apply(only=[PID])
    assert rep[PID].outcome == hfpatches.Outcome.APPLIED, rep[PID].reason
    model = build()
    for name, buf in model.named_buffers():
        assert buf.device.type == "cuda" and torch.equal(buf, want[name]), name
    model.tie_weights()
    model.load_state_dict(sd)
    with torch.no_grad():
        got, exp = model.eval()(ids).logits, ref(ids).logits
    assert torch.equal(got, exp), f"max |d| {demo.max_abs(got, exp):.3g}"
