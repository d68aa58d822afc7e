"""Implementation of ``collator_keep_eos`` (declared in ``__init__.py``; rationale in
docs/patches/collator_keep_eos.md)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hfpatches._declare import ProbeResult

from . import PATCH

PATCH_ID = PATCH.id
MODULE = "transformers.data.data_collator"
CLASS = "DataCollatorForLanguageModeling"


def _applies(collator: Any) -> bool:
    tok = getattr(collator, "tokenizer", None)
    pad = getattr(tok, "pad_token_id", None)
    return (not getattr(collator, "mlm", True)) and pad is not None and pad == getattr(tok, "eos_token_id", None)


def _ints(x: Any) -> list[int]:
    """A 1-D sequence (list, tuple, numpy array, torch tensor) as a list of ints."""
    tolist = getattr(x, "tolist", None)
    return [int(v) for v in (tolist() if callable(tolist) else x)]


def _unmarked(ids: list[int], eos: Any) -> list[bool]:
    """Which tokens of an example *without* an ``attention_mask`` count as real: all but the EOS
    tokens in a run of two or more, which is what padding with EOS before the collator looks like
    (nothing says where such padding starts, so the whole run keeps upstream's -100: padding never
    gets a label; a lone EOS does)."""
    real = [True] * len(ids)
    if eos is None:
        return real
    for i, v in enumerate(ids):
        if v == eos and ((i > 0 and ids[i - 1] == eos) or (i + 1 < len(ids) and ids[i + 1] == eos)):
            real[i] = False
    return real


def padding_mask(examples: Any, width: int, side: str, eos: Any = None) -> list[list[bool]]:
    """``True`` where a row of the collated batch (``width`` columns) is padding: the positions
    the collator added (right or left of the example, as ``side``) and the positions an example's
    own ``attention_mask`` marks 0; without one, runs of two or more ``eos`` (``_unmarked``).
    Everything else is a token of the example."""
    rows = []
    for ex in examples:
        if isinstance(ex, Mapping):
            ids = _ints(ex["input_ids"])
            n = len(ids)
            own = ex.get("attention_mask")
            real = [bool(v) for v in _ints(own)] if own is not None else _unmarked(ids, eos)
        else:
            ids = _ints(ex)
            n = len(ids)
            real = _unmarked(ids, eos)
        if len(real) != n or n > width:
            raise ValueError(f"{PATCH_ID}: an example of {n} tokens does not fit the collated width {width}")
        pad = [True] * (width - n)
        mask = [not r for r in real]
        rows.append(mask + pad if side == "right" else pad + mask)
    return rows


def keep_eos(batch: Any, examples: Any, tokenizer: Any) -> None:
    """In ``batch["labels"]`` (torch or numpy), give real EOS tokens their label back."""
    ids, labels = batch["input_ids"], batch["labels"]
    width = ids.shape[-1]
    eos = tokenizer.eos_token_id
    pad = padding_mask(examples, width, tokenizer.padding_side, eos)
    if hasattr(ids, "new_tensor"):       # torch
        import torch

        padded: Any = torch.tensor(pad, dtype=torch.bool, device=ids.device)
    else:
        import numpy as np

        padded = np.asarray(pad, dtype=bool).reshape(ids.shape)
    restore = (ids == eos) & ~padded & (labels == -100)
    labels[restore] = ids[restore]


def _make_wrapper() -> Any:
    def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        batch = wrapped(*args, **kwargs)
        if instance is None or not _applies(instance):
            return batch
        examples = args[0] if args else next(iter(kwargs.values()))
        keep_eos(batch, examples, instance.tokenizer)
        return batch

    return wrapper


def apply(ctx: Any) -> None:
    cls = getattr(ctx.module(MODULE), CLASS)
    for name in ("torch_call", "numpy_call"):
        ctx.wrap(cls, name, _make_wrapper())


# ----------------------------------------------------------------------------- probe
def tiny_tokenizer(*, pad_is_eos: bool = True, padding_side: str = "right") -> Any:
    """A word-level tokenizer built in memory (no hub): ``<eos>`` is the pad token when ``pad_is_eos``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(("<pad>", "<eos>", "<unk>", "a", "b", "c", "d"))}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<eos>" if pad_is_eos else "<pad>", padding_side=padding_side)


def probe(ctx: Any) -> ProbeResult:
    from hfpatches._quiet import Quiet

    with Quiet():
        tok = tiny_tokenizer()
        collator = getattr(ctx.module(MODULE), CLASS)(tokenizer=tok, mlm=False)
        eos = tok.eos_token_id
        batch = collator([{"input_ids": [3, 4, eos]}, {"input_ids": [5, eos]}])
    labels, ids = batch["labels"].tolist(), batch["input_ids"].tolist()
    real = [(0, 2), (1, 1)]                  # the two real EOS tokens
    masked = sum(labels[r][c] == -100 for r, c in real)
    if ids[1][2] != eos or labels[1][2] != -100:
        return ProbeResult(None, f"the collator did not pad as expected here (input_ids {ids}, labels {labels})")
    return ProbeResult(masked > 0, f"{masked} of 2 real EOS tokens labelled -100 (pad == eos; padding -100)")
