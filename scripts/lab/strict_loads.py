"""Lab reproduction for strict_loads: a tiny BERT saved with PEFT-wrapped key names (the usual
mistake: a PeftModel's state_dict written as a plain checkpoint), then BertModel.from_pretrained:
the bug is that it returns a model with random backbone weights (a logged warning only); with the
opt-in patch it raises LoadError."""
from __future__ import annotations

# the range's lower boundary (4.40: tokenizers 0.19 beside it), the stacks, transformers 5 (latest)
LAB_RUNS = [{"versions": "4.39.3,4.40.0", "with": ["tokenizers==0.19.1"]},
            {"versions": "4.46.0", "with": ["tokenizers==0.20.3"]},
            {"versions": "4.51.3,4.55.0"},
            {"versions": "5.0.0,5.23.0", "stack": "latest"}]


def reproduce() -> tuple[bool | None, str]:
    import os
    import tempfile

    from safetensors.torch import save_file
    from transformers import BertModel

    from hfpatches.demos.strict_loads import tiny_bert_config
    from hfpatches.errors import LoadError

    with tempfile.TemporaryDirectory() as tmp:
        cfg = tiny_bert_config()
        # PEFT's names (base_model.model.<name>), written by hand: no peft import on old releases
        sd = {f"base_model.model.{k}": v for k, v in BertModel(cfg).state_dict().items()}
        cfg.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        try:
            model, info = BertModel.from_pretrained(tmp, output_loading_info=True)
        except LoadError as e:
            return False, f"LoadError: {str(e).splitlines()[0][:100]}"
    missing = len(info["missing_keys"])
    return missing > 0, f"from_pretrained returned a model, {missing} of {len(model.state_dict())} weights missing"
