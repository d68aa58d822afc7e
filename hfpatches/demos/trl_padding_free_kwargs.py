"""Demo: TRL's padding-free collator (``DataCollatorForCompletionOnlyLM(padding_free=True)``)
and FlashAttention-2: what the varlen kernel gets from transformers' entry without hfpatches and
with it (the patch's probe); on a CUDA machine with flash-attn also a custom loop's
``model(**batch)`` itself (RuntimeError without hfpatches, per-sequence outputs equal to running
each sequence alone with it).

Also the shared scenario helpers (word-level tokenizer, packed batch, tiny Llama, attention key
recorder, per-sequence comparison) that the tests and GPU tests use.
"""
from __future__ import annotations

import contextlib
from typing import Any
import warnings

from . import _common

PID = "trl_padding_free_kwargs"
KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
RESPONSE_TEMPLATE, PAIRS = _common.RESPONSE_TEMPLATE, _common.PAIRS


def tokenizer():
    """A word-level tokenizer trained in memory on ``PAIRS`` (no hub, ~50 tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator([p + c for p, c in PAIRS],
                              trainers.WordLevelTrainer(special_tokens=["<pad>", "<eos>", "<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def collator(tok):
    """TRL's ``DataCollatorForCompletionOnlyLM(RESPONSE_TEMPLATE, padding_free=True)``, or None
    where the installed TRL has no such collator (>= 0.20)."""
    try:
        from trl.trainer.utils import DataCollatorForCompletionOnlyLM
    except ImportError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DataCollatorForCompletionOnlyLM(RESPONSE_TEMPLATE, tokenizer=tok, padding_free=True)


def packed_batch(tok, pairs=PAIRS):
    """``pairs`` packed into one row by TRL's collator (None without it)."""
    coll = collator(tok)
    return None if coll is None else coll([tok(p + c) for p, c in pairs])


def tiny_llama(vocab_size: int, *, attn_implementation: str = "sdpa", seed: int = 0, dtype=None,
               device="cpu"):
    """A tiny random ``LlamaForCausalLM`` (2 layers, hidden 32, grouped-query heads), train mode,
    no KV cache. Built with sdpa, then switched to ``attn_implementation`` (the attention modules
    read it from the config at every forward; no flash-attn availability check on a CPU)."""
    from .liger_flash_kwargs import tiny_model

    model = tiny_model("llama", vocab_size, seed=seed, dtype=dtype, device=device)
    model.config._attn_implementation = attn_implementation
    return model


def form(value) -> str:
    """``(1, 4) int32`` / ``int`` -- how a FlashAttention keyword looks."""
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"{tuple(shape)} {str(value.dtype).replace('torch.', '')}"
    return type(value).__name__


@contextlib.contextmanager
def attention_kwargs(model, keys=KEYS):
    """Record, for every ``*.self_attn`` module call, the FlashAttention keywords it received
    (forward pre-hooks with ``with_kwargs=True``); yields the list, one dict per call."""
    seen: list[dict] = []

    def record(module, args, kwargs):
        seen.append({k: kwargs[k] for k in keys if k in kwargs})

    handles = [m.register_forward_pre_hook(record, with_kwargs=True)
               for name, m in model.named_modules() if name.endswith("self_attn")]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def segments(batch) -> list[tuple[int, int]]:
    """The sequence boundaries of a packed batch, from its position_ids (independent of the keys)."""
    pos = batch["position_ids"].reshape(-1).tolist()
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return list(zip(starts[:-1], starts[1:]))


def per_sequence_gap(model, batch, packed_logits) -> float:
    """Largest |packed logits - logits of the same sequence run alone| over all sequences."""
    import torch

    worst = 0.0
    with torch.no_grad():
        for s, e in segments(batch):
            alone = model(input_ids=batch["input_ids"][:, s:e],
                          position_ids=batch["position_ids"][:, s:e]).logits
            worst = max(worst, float((packed_logits[:, s:e].float() - alone.float()).abs().max()))
    return worst


def make_trainer(model, output_dir: str):
    """A real ``transformers.Trainer`` (nothing trained): its ``_prepare_inputs`` is what turns a
    dataloader batch into the model's keywords."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=output_dir, report_to=[], use_cpu=model.device.type == "cpu",
                             disable_tqdm=True)
    return Trainer(model=model, args=args)


def run(say) -> bool:
    import importlib.util

    import hfpatches

    if importlib.util.find_spec("trl") is None:
        r = hfpatches.apply(only=[PID])[PID]
        say(f"{r.outcome.value}: {r.reason}")
        return True
    import torch
    import transformers.trainer  # noqa: F401  (the patch attaches once both target modules are imported)
    import trl.trainer.utils

    tok = tokenizer()
    batch = packed_batch(tok)
    if batch is None:
        r = hfpatches.apply(only=[PID])[PID]
        say(f"trl {trl.__version__} has no DataCollatorForCompletionOnlyLM; {r.outcome.value}: {r.reason}")
        try:
            from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
        except ImportError:
            return r.outcome.value == "NOT_AFFECTED"
        b = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(
            [tok(p + c) for p, c in PAIRS])
        say("its padding-free collator (DataCollatorForLanguageModeling(padding_free=True)) emits "
            + (", ".join(f"{k} {form(b[k])}" for k in KEYS if k in b) or "no FlashAttention keys"))
        cu, mx = b.get("cu_seq_lens_q"), b.get("max_length_q")
        documented = cu is None or (cu.dim() == 1 and cu.dtype == torch.int32 and isinstance(mx, int))
        return r.outcome.value == "NOT_AFFECTED" and documented
    say(f"batch: trl {trl.__version__} DataCollatorForCompletionOnlyLM(padding_free=True): {len(PAIRS)} "
        f"Q/A pairs in one row of {batch['input_ids'].shape[1]} tokens; "
        + ", ".join(f"{k} {form(batch[k])}" for k in ("cu_seq_lens_q", "max_length_q")))
    from hfpatches._engine import run_probe

    cuda = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", None)
    model = tiny_llama(len(tok), device=device, dtype=dtype, attn_implementation="flash_attention_2").eval()
    feed = {k: v.to(device) for k, v in batch.items()}
    hfpatches.revert([PID])
    results: dict[str, dict[str, Any]] = {}
    for stage in ("without hfpatches", "with hfpatches"):
        if stage == "with hfpatches":
            r = hfpatches.apply(only=[PID])[PID]
            say(f"hfpatches.apply: {r.outcome.value} ({r.reason})")
        p = run_probe(PID)
        say(f"{stage}: {p.detail}")
        results[stage] = {"bug": p.bug_present}
        if cuda:   # a custom loop: the collator's batch straight into the model, no Trainer
            try:
                with torch.no_grad():
                    logits = model(**feed).logits
                gap = per_sequence_gap(model, feed, logits)
                say(f"  model(**batch), flash_attention_2 (real kernel): runs; max |packed - each sequence alone| = {gap:.2e}")
                results[stage]["gap"] = gap
            except RuntimeError as e:
                say(f"  model(**batch), flash_attention_2 (real kernel): RuntimeError: {str(e).splitlines()[0]}")
                results[stage]["error"] = str(e)
    if not cuda:
        say("(no CUDA + flash-attn here: the kernel itself is exercised by gpu_tests/test_trl_padding_free_kwargs.py)")
    before, after = results["without hfpatches"], results["with hfpatches"]
    ok = before["bug"] is True and after["bug"] is False
    if cuda:
        ok = ok and "error" in before and after.get("gap", 1.0) <= 5e-2
    return ok
