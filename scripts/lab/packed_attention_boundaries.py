"""Version-lab reproduction of ``packed_attention_boundaries`` (run in a fresh interpreter; never
applies hfpatches itself): two sequences packed into one row of a tiny Llama (restarting
``position_ids``, no attention mask), eager and sdpa, eval, ``use_cache`` off and on (the config
default): bug present <=> a packed sequence's logits differ from it alone by more than 1e-4."""
from __future__ import annotations


def reproduce() -> tuple[bool | None, str]:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        return None, f"cannot import: {e}"
    from hfpatches._quiet import Quiet
    from hfpatches.demos.packed_attention_boundaries import gaps, tiny_model

    worst: dict[str, float] = {}
    with Quiet():
        for impl in ("eager", "sdpa"):
            model = tiny_model("llama", impl)
            for cache in (False, True):
                worst[f"{impl}/cache={'on' if cache else 'off'}"] = gaps(model, use_cache=cache)[0]
    bad = [k for k, v in worst.items() if v > 1e-4]
    detail = ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
    return bool(bad), f"max |logit diff| {detail}"


if __name__ == "__main__":
    print(reproduce())
