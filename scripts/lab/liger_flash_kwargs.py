"""Lab reproduction for liger_flash_kwargs: a padding-free batch (TRL's collator, FlashAttention
kwargs) through a tiny Llama with Liger's fused linear cross-entropy, model.train(), labels given:
TypeError on the affected releases (the demo's scenario; TRITON_INTERPRET=1 on a CPU)."""
from __future__ import annotations

# both sides of 0.5.6 (the bug appears) and 0.5.7 (fixed); later ones on the stacks that take them
LAB_RUNS = [{"versions": "0.5.4,0.5.5,0.5.6,0.5.7,0.5.8"},
            {"versions": "0.6.3", "stack": "boundary"},
            {"versions": "0.8.5", "stack": "latest"}]


def reproduce() -> tuple[bool | None, str]:
    import torch

    from hfpatches.demos import liger_flash_kwargs as d

    tok = d.tokenizer()
    batch, _producer = d.packed_batch(tok)
    keys = d.flash_keys_in(batch)
    if not keys:
        return None, "the collator emitted no FlashAttention kwargs"
    model = d.tiny_model("llama", len(tok))
    with torch.no_grad(), d.liger_forward("llama"), d.keys_seen(model, keys) as seen:
        try:
            loss = model(**batch).loss.item()
        except TypeError as e:
            return True, f"TypeError: {str(e)[:100]}"
    return False, f"loss {loss:.4f}; kwargs reaching the decoder: {sorted(seen['decoder']) or 'none'}"
