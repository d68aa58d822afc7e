"""Lab reproduction for liger_flash_kwargs: a padding-free batch (TRL's collator, FlashAttention
kwargs) through a tiny Llama with Liger's fused linear cross-entropy, model.train(), labels given:
TypeError on the affected releases (the demo's scenario; TRITON_INTERPRET=1 on a CPU)."""
from __future__ import annotations

# both sides of 0.5.6 (the bug appears) and 0.5.7 (fixed), every release up to 0.6.2 (no bug), on
# transformers 4.51.3; 0.6.3 (the pass-through is back) to 0.7.0 on the boundary stack
# (transformers 4.56.2: 0.5.7/0.5.8 do not import there); 0.8.5 needs transformers 5 (latest).
# Also measured, not in the table (one row per release): 0.6.3 and 0.6.4 on the affected stack
# (bug: yes, fixed with the patch), 0.5.10-0.6.2 on the boundary stack (no bug).
LAB_RUNS = [{"versions": "0.5.4,0.5.5,0.5.6,0.5.7,0.5.8,0.5.9,0.5.10,0.6.0,0.6.1,0.6.2"},
            {"versions": "0.6.3,0.6.4,0.6.5,0.7.0", "stack": "boundary"},
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
    # autograd on, as in train(): liger-kernel 0.6.3's FLCE forward has a bug of its own when the
    # input needs no gradient (UnboundLocalError on grad_weight; fixed in 0.6.4)
    with torch.enable_grad(), d.liger_forward("llama"), d.keys_seen(model, keys) as seen:
        try:
            loss = model(**batch).loss.item()
        except TypeError as e:
            return True, f"TypeError: {str(e)[:100]}"
    return False, f"loss {loss:.4f}; kwargs reaching the decoder: {sorted(seen['decoder']) or 'none'}"
