"""Lab reproduction for flash_attn_bert_prefix: flash-attn's BertModel.from_pretrained on a
bert.-prefixed checkpoint (transformers' BertForPreTraining.save_pretrained of the packaged
all-MiniLM-L6-v2) and on the unprefixed one: do the weights arrive? (the demo's checkpoints; on a
CPU with the tests' stubs for flash-attn's CUDA-only pieces, built as pure Python)."""
from __future__ import annotations

# flash-attn 2.x releases (sdists built without CUDA; the bug has never been fixed upstream)
LAB_RUNS = [{"versions": "2.5.8,2.6.3,2.7.4.post1,2.8.3,2.8.3.post2"}]


def reproduce() -> tuple[bool | None, str]:
    import os
    import sys
    import tempfile

    import torch
    from safetensors.torch import load_file

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                    "tests"))
    from _stubs import install_flash_attn_cpu_stubs

    install_flash_attn_cpu_stubs()
    import flash_attn.models.bert as fb

    from hfpatches._models import minilm_dir
    from hfpatches.demos import flash_attn_bert_prefix as d

    src = minilm_dir()
    cfg = d.flash_config(src)
    want = load_file(os.path.join(src, "model.safetensors"))
    key = next(k for k in want if k.endswith("word_embeddings.weight"))
    bad = []
    with tempfile.TemporaryDirectory() as tmp:
        pre = d.write_pretraining_checkpoint(src, os.path.join(tmp, "pretraining"))
        for label, path in (("unprefixed", src), ("bert.-prefixed", pre)):
            try:
                model = fb.BertModel.from_pretrained(path, cfg)
            except KeyError as e:
                bad.append(f"{label}: KeyError {e}")
                continue
            if not torch.equal(model.embeddings.word_embeddings.weight, want[key]):
                bad.append(f"{label}: random weights (did not arrive)")
    return bool(bad), "; ".join(bad) or "both checkpoints load their weights"
