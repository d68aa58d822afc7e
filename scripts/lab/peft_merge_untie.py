"""Lab reproduction for peft_merge_untie: tiny tied Llama, LoRA on q/v + modules_to_save
["lm_head"] and ["embed_tokens"], 3 SGD steps, merge_and_unload(), save_pretrained(),
from_pretrained(): max |logits(merged in memory) - logits(reloaded)|."""
from __future__ import annotations


def reproduce() -> tuple[bool | None, str]:
    import warnings

    from hfpatches.demos import peft_merge_untie as d

    parts, bad = [], False
    for save in ("lm_head", "embed_tokens"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = d.scenario(save=save)
        bad = bad or r["diff"] > 1e-3 * max(1.0, r["scale"])
        parts.append(f"{save}: max |d logits| {r['diff']:.3g}, config tied={r['tied']}")
    return bad, "; ".join(parts)
