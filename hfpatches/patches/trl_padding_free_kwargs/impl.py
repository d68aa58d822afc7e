"""Implementation of ``trl_padding_free_kwargs`` (declared in ``__init__.py``; rationale in docs/patches/)."""
from __future__ import annotations

import sys

from hfpatches._declare import ProbeResult

__all__ = ["documented"]

PATCH_ID = "trl_padding_free_kwargs"
COLLATOR_MODULE = "trl.trainer.utils"
COLLATOR = "DataCollatorForCompletionOnlyLM"
TRAINER_MODULE = "transformers.trainer"
CU_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k")
MAX_KEYS = ("max_length_q", "max_length_k")
KEYS = CU_KEYS + MAX_KEYS


def _fixed(value, torch, cu: bool):
    """The documented form of one value in TRL's form, or None when it is not in TRL's form."""
    if not torch.is_tensor(value) or value.is_floating_point() or value.is_complex() \
            or value.dtype is torch.bool:
        return None
    if cu:
        if value.dim() != 2 or value.shape[0] != 1:
            return None
        flat = value.reshape(-1)
        return flat if flat.dtype is torch.int32 else flat.to(torch.int32)
    if value.numel() != 1:
        return None
    return int(value.reshape(()).item())   # one host sync per step (it was one per layer)


def documented(batch):
    """``batch`` with TRL 0.16-0.19's padding-free FlashAttention keys in transformers' documented
    form (``cu_seq_lens_*`` 1-D int32, ``max_length_*`` int); ``batch`` itself when none is in
    that form. A shallow copy (``copy.copy``: same mapping type) otherwise: every other value is
    the same object, and ``cu_seq_lens_k`` stays the same object as ``cu_seq_lens_q`` when it was."""
    try:
        present = [k for k in KEYS if k in batch]
    except TypeError:
        return batch
    if not present:
        return batch
    torch = sys.modules.get("torch")
    if torch is None:
        return batch
    done: dict[int, object] = {}
    changes = {}
    for k in present:
        v = batch[k]
        if id(v) in done:
            changes[k] = done[id(v)]
            continue
        new = _fixed(v, torch, k in CU_KEYS)
        if new is not None:
            changes[k] = done[id(v)] = new
    if not changes:
        return batch
    import copy

    out = copy.copy(batch)
    for k, v in changes.items():
        out[k] = v
    return out


def _prepare_inputs(wrapped, instance, args, kwargs):
    """Wrapper of ``Trainer._prepare_inputs``: the model gets the documented form."""
    return documented(wrapped(*args, **kwargs))


# ----------------------------------------------------------------------------- probe
class _StandInTrainer:
    """What ``Trainer._prepare_inputs`` uses of ``self``: no device move, no ``mems``."""

    _past = None
    _signature_columns = ("input_ids",)

    class args:
        past_index = -1

    @staticmethod
    def _prepare_input(data):
        return data


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(("<pad>", "<eos>", "<unk>", "q", "a", "x", "y", "z"))}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>"), vocab


def packed_by_collator():
    """Three tiny examples packed by the installed TRL collator (``padding_free=True``). No
    warning filter is touched (process-global): TRL 0.17's DeprecationWarning is hidden by
    Python's default filters; pad != eos and every example holds the response token, so the
    collator's UserWarnings do not fire."""
    collator_cls = getattr(sys.modules[COLLATOR_MODULE], COLLATOR)
    tok, vocab = _tiny_tokenizer()
    collator = collator_cls([vocab["a"]], tokenizer=tok, padding_free=True)
    return collator([{"input_ids": [3, 5, 4, 6]}, {"input_ids": [3, 4, 7]},
                     {"input_ids": [3, 3, 4, 5, 6]}])


def _describe(k, v, torch) -> str:
    if torch.is_tensor(v):
        return f"{k} a {tuple(v.shape)} {str(v.dtype).replace('torch.', '')} tensor"
    return f"{k} an {type(v).__name__}" if type(v).__name__[0] in "aeiou" else f"{k} a {type(v).__name__}"


def probe() -> ProbeResult:
    import torch

    batch = packed_by_collator()
    keys = [k for k in KEYS if k in batch]
    if not keys:
        return ProbeResult(False, f"the installed {COLLATOR}(padding_free=True) emits no FlashAttention keys")
    trainer = sys.modules[TRAINER_MODULE].Trainer
    out = trainer._prepare_inputs(_StandInTrainer(), batch)
    bad = [k for k in keys if _fixed(out[k], torch, k in CU_KEYS) is not None]
    shown = [k for k in ("cu_seq_lens_q", "max_length_q") if k in batch]
    given = ", ".join(_describe(k, batch[k], torch) for k in shown)
    if bad:
        return ProbeResult(True, f"{COLLATOR}(padding_free=True) emits {given}; Trainer._prepare_inputs "
                           f"hands the model {', '.join(_describe(k, out[k], torch) for k in shown)}")
    return ProbeResult(False, f"{COLLATOR}(padding_free=True) emits {given}; the model gets "
                       + ", ".join(_describe(k, out[k], torch) for k in ("cu_seq_lens_q", "max_length_q")
                                   if k in out))


def apply(ctx) -> None:
    trainer = ctx.module(TRAINER_MODULE).Trainer
    ctx.wrap(trainer, "_prepare_inputs", _prepare_inputs)
