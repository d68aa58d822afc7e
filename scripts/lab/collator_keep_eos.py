"""Lab reproduction for collator_keep_eos: DataCollatorForLanguageModeling(mlm=False) with pad ==
eos on four examples ending in a real EOS ("pt" and "np"): how many real EOS get label -100."""
from __future__ import annotations


def reproduce() -> tuple[bool | None, str]:
    from hfpatches.demos import collator_keep_eos as d

    parts, bad = [], False
    for rt in ("pt", "np"):
        r = d.collate(return_tensors=rt)
        bad = bad or r["real_eos_masked"] > 0 or r["padding_labelled"] > 0
        parts.append(f"{rt}: {r['real_eos_masked']} of {r['real_eos']} real EOS masked")
    return bad, ", ".join(parts)
