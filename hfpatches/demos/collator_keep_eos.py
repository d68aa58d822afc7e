"""Demo: ``DataCollatorForLanguageModeling(mlm=False)`` with ``pad_token = eos_token`` -- every
real EOS labelled -100 without hfpatches (the model never learns to stop), only the padding with
the opt-in patch. Also the scenario the tests and the version lab use."""
from __future__ import annotations

PID = "collator_keep_eos"


def examples(eos: int, *, as_dicts: bool = True) -> list:
    """Four examples of different lengths, each ending in its real EOS."""
    seqs = [[3, 4, 5, eos], [6, eos], [3, 3, eos], [4, 5, 6, 3, 4, eos]]
    return [{"input_ids": s} for s in seqs] if as_dicts else seqs


def collate(*, return_tensors: str = "pt", as_dicts: bool = True, padding_side: str = "right",
            pad_is_eos: bool = True, pad_to_multiple_of=None) -> dict:
    """Collate the four examples; returns the batch and the number of real EOS tokens labelled -100."""
    from transformers import DataCollatorForLanguageModeling

    from ..patches.collator_keep_eos.impl import tiny_tokenizer

    tok = tiny_tokenizer(pad_is_eos=pad_is_eos, padding_side=padding_side)
    eos = tok.eos_token_id
    exs = examples(eos, as_dicts=as_dicts)
    collator = DataCollatorForLanguageModeling(tokenizer=tok, mlm=False, return_tensors=return_tensors,
                                               pad_to_multiple_of=pad_to_multiple_of)
    batch = collator(exs)
    ids, labels = batch["input_ids"].tolist(), batch["labels"].tolist()
    width = len(ids[0])
    real_eos_masked = 0
    padding_labelled = 0
    for row, ex in enumerate(exs):
        n = len(ex["input_ids"] if as_dicts else ex)
        start = 0 if padding_side == "right" else width - n
        real_eos_masked += labels[row][start + n - 1] == -100
        pads = range(n, width) if padding_side == "right" else range(0, width - n)
        padding_labelled += sum(labels[row][c] != -100 for c in pads) if pad_is_eos else 0
    return {"batch": batch, "real_eos_masked": int(real_eos_masked), "real_eos": len(exs),
            "padding_labelled": int(padding_labelled)}


def run(say) -> bool:
    import importlib.util

    import hfpatches

    if importlib.util.find_spec("transformers") is None:
        r = hfpatches.apply(only=[PID])[PID]
        say(f"{r.outcome.value}: {r.reason}")
        return True
    import transformers.data.data_collator  # noqa: F401  (the patch attaches now)

    say("word-level tokenizer with pad_token = eos_token; 4 examples ending in EOS, lengths 2-6; "
        "DataCollatorForLanguageModeling(mlm=False)")
    hfpatches.revert([PID])
    before = {rt: collate(return_tensors=rt) for rt in ("pt", "np")}
    say("without hfpatches: " + ", ".join(f"{rt}: {r['real_eos_masked']} of {r['real_eos']} real EOS labelled -100"
                                          for rt, r in before.items()))
    rep = hfpatches.apply(only=[PID])[PID]
    say(f"hfpatches.apply(only=[{PID!r}]): {rep.outcome.value} ({rep.reason}) -- opt-in, upstream keeps this by design")
    after = {rt: collate(return_tensors=rt) for rt in ("pt", "np")}
    say("with hfpatches:    " + ", ".join(f"{rt}: {r['real_eos_masked']} of {r['real_eos']} real EOS labelled -100, "
                                          f"{r['padding_labelled']} padding positions labelled" for rt, r in after.items()))
    hfpatches.revert([PID])
    ok = all(r["real_eos_masked"] == 0 and r["padding_labelled"] == 0 for r in after.values())
    return ok and all(r["real_eos_masked"] > 0 for r in before.values())
