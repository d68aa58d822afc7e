"""Lab reproduction for peft_save_load: a flair TextClassifier on all-MiniLM-L6-v2 (packaged)
with a LoRA peft_config, saved and loaded back with TextClassifier.load: the affected releases
drop the PEFT config from the model file, so the reload fails (missing LoRA keys) (flair#3623)."""
from __future__ import annotations

# below 0.14 (no peft_config in flair), 0.14.0, 0.15.0, 0.15.1 (newest; the fixes are unreleased)
# (flair's own import-time deps missing from the stack come as overlays: semver; for 0.13.1 gensim,
# its smart-open, bpemb; the same overlays for all three)
LAB_RUNS = [{"versions": "0.13.1,0.14.0,0.15.0",
             "with": ["semver==3.0.2", "gensim==4.4.0", "smart-open==7.1.0", "bpemb==0.3.6"]},
            {"versions": "0.15.1"}]


def reproduce() -> tuple[bool | None, str]:
    import os
    import tempfile

    import inspect

    from flair.embeddings import TransformerEmbeddings

    from hfpatches.demos import peft_save_load as d

    if "peft_config" not in inspect.signature(TransformerEmbeddings.__init__).parameters:
        # 0.13.x: an unknown keyword goes on to transformers (LoraConfig lands in the model config)
        return False, "this flair has no peft_config (no PEFT support, nothing to lose)"
    try:
        model = d.build_classifier()
    except TypeError as e:
        if "peft_config" in str(e):
            return False, "this flair has no peft_config (no PEFT support, nothing to lose)"
        raise
    import torch
    from flair.models import TextClassifier

    # LoRA B starts at zero (the adapters change nothing yet): give them weights, so that a reload
    # that lost them shows in the scores, not only one that fails
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    before = d.scores(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.pt")
        with d.quiet():
            model.save(path)
        # flair < 0.15.1 calls torch.load without weights_only; torch >= 2.6 defaults it to True and
        # cannot unpickle a flair model file. Restore the default those releases were written for,
        # for this reload only (0.15.1 passes weights_only=False itself: unchanged there).
        old = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
        os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
        try:
            with d.quiet():
                again = TextClassifier.load(path)
        except RuntimeError as e:
            return True, f"save -> load: RuntimeError: {d.first_line(e, 90)}"
        finally:
            if old is None:
                os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
            else:
                os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = old
    after = d.scores(again)
    diff = d.max_diff(before, after)
    # 1e-5: flair 0.14.0 rebuilds the transformer with eager attention where it saved one on sdpa,
    # about 1e-7 apart even without PEFT; a lost adapter moves the scores by far more
    if diff > 1e-5:
        return True, f"save -> load: scores differ (max |diff| {diff:.1e})"
    return False, f"save -> load: same scores (max |diff| {diff:.1e})"
