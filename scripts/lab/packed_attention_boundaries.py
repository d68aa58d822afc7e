"""Version-lab reproduction of ``packed_attention_boundaries`` (run in a fresh interpreter; never
applies hfpatches itself): two sequences packed into one row of a tiny Llama (restarting
``position_ids``, no attention mask), eager and sdpa, eval, ``use_cache`` off and on (the config
default): bug present <=> a packed sequence's logits differ from it alone by more than 1e-4."""
from __future__ import annotations

# 4.39.3-4.42.4 need an older tokenizers (and 4.41/4.42 numpy<2) beside the affected stack
LAB_RUNS = [{"versions": "4.39.3,4.40.0,4.40.2,4.41.0,4.41.2,4.42.4",
             "with": ["tokenizers==0.19.1", "numpy==1.26.4"]},
            {"versions": "4.43.4,4.44.2", "with": ["tokenizers==0.19.1"]},
            {"versions": "4.45.2,4.46.3", "with": ["tokenizers==0.20.3"]},
            {"versions": "4.47.0,4.47.1,4.48.0,4.50.3,4.51.3,4.52.4,4.53.0,4.53.1,4.55.0"},
            {"versions": "4.56.2,4.57.6", "stack": "boundary"},
            {"versions": "5.23.0", "stack": "latest"}]


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
