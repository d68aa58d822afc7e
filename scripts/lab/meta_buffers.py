"""Lab reproduction for meta_buffers: a tiny Llama built under accelerate.init_empty_weights,
to_empty(cpu), load_state_dict (the demo's meta round trip); its non-persistent buffers (rotary
inv_freq) are compared with a model built normally. torch's fill_uninitialized_memory makes
uninitialised memory NaN, so lost values can never pass by chance."""
from __future__ import annotations

# transformers releases beside the tokenizers each needs: 4.46 (0.20), 4.51/4.55 (affected stack's
# 0.21), 4.56/4.57 (boundary stack's 0.22); 5.x on the latest stack
LAB_RUNS = [{"versions": "3.5.1"},   # below requires' transformers>=4.0 (does it even import?)
            {"versions": "4.46.0", "with": ["tokenizers==0.20.3"]},
            {"versions": "4.51.3,4.55.0"},
            {"versions": "4.56.2,4.57.6", "stack": "boundary"},
            {"versions": "5.0.0,5.23.0", "stack": "latest"}]


def reproduce() -> tuple[bool | None, str]:
    import torch
    import transformers

    from hfpatches.demos import meta_buffers as d

    cfg = d.tiny_llama_config()
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    sd = ref.state_dict()
    with d.nan_for_uninitialised():
        model, _res = d.meta_round_trip(lambda: transformers.LlamaForCausalLM(cfg), sd)
    got = dict(model.named_buffers())
    names = [n for n, _b in ref.named_buffers()]
    lost = [n for n, b in ref.named_buffers() if n not in got or not torch.equal(b, got[n])]
    return bool(lost), f"{len(lost)} of {len(names)} non-persistent buffers lost ({', '.join(lost[:2]) or 'none'})"
