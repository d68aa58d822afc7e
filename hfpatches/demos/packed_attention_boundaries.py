"""Demo: two sequences packed into one row (``position_ids`` restart at 0, no attention mask, what
``DataCollatorWithFlattening`` and TRL's padding-free collators emit) through a tiny Llama with
eager and sdpa attention: how far the second sequence's logits are from the same sequence run
alone, without hfpatches and with it, with ``use_cache`` off and on (the config default).

Also the shared scenario helpers (tiny models of every covered architecture, the packed batch,
the per-sequence comparison of logits and per-token loss) that the tests and GPU tests use.
"""
from __future__ import annotations

PID = "packed_attention_boundaries"
#: two sequences of different lengths (token ids < 32)
SEQS = ([3, 7, 1, 9, 4], [5, 2, 8, 6, 11, 12, 2, 17, 4])

_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
}


def tiny_model(arch: str, impl: str = "sdpa", *, sliding_window: int | None = None, seed: int = 0,
               dtype=None, device="cpu"):
    """A tiny random ``<Arch>ForCausalLM`` (2 layers, hidden 16), eval mode, ``use_cache`` as the
    config's default (True). Weights from a local generator; the caller's RNG is left as it was.
    ``sliding_window``: Mistral/Qwen2/Gemma2/Phi3's window (Qwen2: ``use_sliding_window`` too)."""
    import torch
    import transformers

    cfg_name, cls_name = _CLASSES[arch]
    kw: dict = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0)
    if arch in ("gemma", "gemma2", "qwen3", "mistral"):
        kw["head_dim"] = 8
    if arch == "gemma2":
        kw.update(query_pre_attn_scalar=8, sliding_window=sliding_window or 4096)
    elif sliding_window is not None:
        kw["sliding_window"] = sliding_window
        if arch == "qwen2":
            kw.update(use_sliding_window=True, max_window_layers=0)
    cfg = getattr(transformers, cfg_name)(**kw)
    cfg._attn_implementation = impl
    with torch.random.fork_rng(devices=[]):
        model = getattr(transformers, cls_name)(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval()


def packed(device="cpu", seqs=SEQS) -> dict:
    """``DataCollatorWithFlattening``'s form: one row, restarting ``position_ids``, labels with
    -100 at each sequence's first token, no attention mask."""
    import torch

    ids, pos, labels = [], [], []
    for s in seqs:
        ids += s
        pos += list(range(len(s)))
        labels += [-100] + s[1:]
    return {k: torch.tensor([v], device=device) for k, v in
            (("input_ids", ids), ("position_ids", pos), ("labels", labels))}


def token_losses(logits, ids):
    """Next-token cross-entropy of one sequence (logits (T, V), ids (T,)): T-1 values."""
    import torch

    return torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:], reduction="none")


def gaps(model, *, use_cache=None, train=False, seqs=SEQS, extra=None) -> tuple[float, float]:
    """(max |logit diff|, max |per-token loss diff|) of every packed sequence against it alone."""
    import torch

    was = model.training
    model.train(train)
    batch = packed(model.device, seqs)
    kw = {} if use_cache is None else {"use_cache": use_cache}
    try:
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **kw, **(extra or {}))
            start, lg, ll = 0, 0.0, 0.0
            for s in seqs:
                x = torch.tensor([s], device=model.device)
                alone = model(input_ids=x, **kw).logits[0]
                mine = out.logits[0, start:start + len(s)]
                lg = max(lg, float((mine.float() - alone.float()).abs().max()))
                ll = max(ll, float((token_losses(mine, x[0]) - token_losses(alone, x[0])).abs().max()))
                start += len(s)
    finally:
        model.train(was)
    return lg, ll


def run(say) -> bool:
    import torch

    import hfpatches

    results = {}
    hfpatches.revert([PID])
    for stage in ("without hfpatches", "with hfpatches"):
        if stage == "with hfpatches":
            r = hfpatches.apply(only=[PID])[PID]
            say(f"hfpatches.apply: {r.outcome.value} ({r.reason})")
        import transformers

        worst = 0.0
        for impl in ("eager", "sdpa"):
            model = tiny_model("llama", impl)
            for cache in (False, True):
                lg, ll = gaps(model, use_cache=cache)
                worst = max(worst, lg)
                say(f"{stage}: transformers {transformers.__version__}, {impl}, use_cache={cache}: second "
                    f"sequence vs alone: max |logit diff| {lg:.2e}, per-token loss {ll:.2e}")
        results[stage] = worst
    say(f"(torch {torch.__version__}; two sequences of {len(SEQS[0])} and {len(SEQS[1])} tokens in one row)")
    return results["without hfpatches"] > 1e-3 and results["with hfpatches"] <= 1e-5
