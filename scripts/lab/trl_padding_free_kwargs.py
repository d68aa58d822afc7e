"""Lab reproduction for trl_padding_free_kwargs: TRL's DataCollatorForCompletionOnlyLM(
padding_free=True) batch straight into a tiny Llama with attn_implementation="flash_attention_2"
(a custom loop: ``model(**batch)``, no Trainer). flash-attn's kernels are replaced by the CPU
stand-in of the test suite (tests/_fa_ref.py: checks its arguments like the CUDA kernel), put into
``transformers.modeling_flash_attention_utils`` (where each release 4.51-4.57 looks them up) in
this throwaway interpreter only. Bug: the
kernel rejects the batch ("cu_seqlens_q must have shape (batch_size + 1)"); fixed: it runs and
each packed sequence's logits equal the sequence run alone (1e-5)."""
from __future__ import annotations

import sys
from pathlib import Path

# both sides of 0.16.0 (the collator's FlashAttention keys) and 0.20 (the collator removed), on
# the affected stack (transformers 4.51.3); then TRL 0.19.1 (the boundary stack) on every
# transformers minor it supports up to 4.57: their FlashAttention-2 entry finds flash-attn's
# kernels in three different ways (module globals, _lazy_imports, lazy_import_flash_attention)
LAB_RUNS = [{"versions": "0.15.2,0.16.0,0.17.0,0.18.1,0.19.1,0.20.0"},
            {"package": "transformers", "versions": "4.51.3,4.52.4,4.53.1,4.54.1,4.55.0", "stack": "boundary",
             "with": ["tokenizers==0.21.4"]},
            {"package": "transformers", "versions": "4.56.2,4.57.6", "stack": "boundary"}]


def reproduce() -> tuple[bool | None, str]:
    import torch

    from hfpatches.demos import trl_padding_free_kwargs as d

    tok = d.tokenizer()
    batch = d.packed_batch(tok)
    if batch is None:
        return False, "no DataCollatorForCompletionOnlyLM in this TRL (removed in 0.20)"
    if "cu_seq_lens_q" not in batch:
        return False, f"the collator emits no FlashAttention keys ({', '.join(sorted(batch))})"
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    try:
        from _fa_ref import installed
    except ImportError as e:
        return None, f"no FlashAttention stand-in: {e}"
    model = d.tiny_llama(len(tok), attn_implementation="flash_attention_2").eval()
    form = f"cu_seq_lens_q {d.form(batch['cu_seq_lens_q'])}, max_length_q {d.form(batch['max_length_q'])}"
    with installed() as ref, torch.no_grad():
        try:
            logits = model(**batch).logits
        except RuntimeError as e:
            return True, f"{form}: {str(e).splitlines()[0]}"
        if not ref.calls:
            return None, f"{form}: the stand-in kernel was not called (another FlashAttention path)"
        gap = d.per_sequence_gap(model, batch, logits)
    return gap > 1e-5, f"{form}: runs, per-sequence gap {gap:.1e}"


if __name__ == "__main__":
    print(reproduce())
