"""Lab reproduction for collator_keep_eos: DataCollatorForLanguageModeling(mlm=False) with pad ==
eos on four examples ending in a real EOS ("pt" and "np"): how many real EOS get label -100."""
from __future__ import annotations

# 4.39.3 (below requires: does not import beside tokenizers 0.19) to 5.23.0 (latest)
LAB_RUNS = [{"versions": "4.39.3,4.40.0,4.44.2", "with": ["tokenizers==0.19.1"]},
            {"versions": "4.45.2,4.46.0,4.46.3", "with": ["tokenizers==0.20.3"]},
            {"versions": "4.51.3"},
            {"versions": "4.56.2,4.57.6", "stack": "boundary"},
            {"versions": "5.23.0", "stack": "latest"}]


def reproduce() -> tuple[bool | None, str]:
    from hfpatches.demos import collator_keep_eos as d

    parts, bad = [], False
    for rt in ("pt", "np"):
        r = d.collate(return_tensors=rt)
        bad = bad or r["real_eos_masked"] > 0 or r["padding_labelled"] > 0
        parts.append(f"{rt}: {r['real_eos_masked']} of {r['real_eos']} real EOS masked")
    return bad, ", ".join(parts)
