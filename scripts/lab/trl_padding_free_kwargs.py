"""Lab reproduction for trl_padding_free_kwargs: TRL's DataCollatorForCompletionOnlyLM(
padding_free=True) batch through a real transformers.Trainer's _prepare_inputs into a tiny Llama;
the FlashAttention keywords each attention module receives must be in transformers' documented
form (1-D cu_seq_lens, int max_length) -- the affected releases hand them over 2-D / as tensors."""
from __future__ import annotations

# both sides of 0.16.0 (the collator's FlashAttention keys) and 0.20 (the collator removed)
LAB_RUNS = [{"versions": "0.15.2,0.16.0,0.17.0,0.18.1,0.19.1"},
            {"versions": "0.19.1,0.20.0,0.21.0", "stack": "boundary"}]   # transformers 4.56.2


def reproduce() -> tuple[bool | None, str]:
    import tempfile

    import torch

    from hfpatches.demos import trl_padding_free_kwargs as d

    tok = d.tokenizer()
    batch = d.packed_batch(tok)
    if batch is None:
        return False, "no DataCollatorForCompletionOnlyLM in this TRL (removed in 0.20)"
    keys = [k for k in d.KEYS if k in batch]
    if not keys:
        return False, f"the collator emits no FlashAttention keys ({', '.join(sorted(batch))})"
    model = d.tiny_llama(len(tok))
    with tempfile.TemporaryDirectory() as out:
        trainer = d.make_trainer(model, out)
        inputs = trainer._prepare_inputs(batch)
        with torch.no_grad(), d.attention_kwargs(model) as seen:
            model(**inputs)
    got = seen[0] if seen else {}
    bad = [k for k in keys if k not in got
           or (k.startswith("cu_") and getattr(got[k], "dim", lambda: 1)() != 1)
           or (k.startswith("max_") and not isinstance(got[k], int))]
    shown = ", ".join(f"{k} {d.form(got[k])}" for k in keys if k in got)
    return bool(bad), f"attention receives {shown or 'no FlashAttention keys'}"
