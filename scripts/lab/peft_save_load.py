"""Lab reproduction for peft_save_load: a flair TextClassifier on all-MiniLM-L6-v2 (packaged)
with a LoRA peft_config, saved and loaded back with TextClassifier.load: the affected releases
drop the PEFT config from the model file, so the reload fails (missing LoRA keys) (flair#3623)."""
from __future__ import annotations

# below 0.14 (no peft_config in flair), 0.14.0, 0.15.0, 0.15.1 (newest; the fixes are unreleased)
LAB_RUNS = [{"versions": "0.13.1,0.14.0,0.15.0,0.15.1"}]


def reproduce() -> tuple[bool | None, str]:
    import os
    import tempfile

    from hfpatches.demos import peft_save_load as d

    try:
        model = d.build_classifier()
    except TypeError as e:
        if "peft_config" in str(e):
            return False, "this flair has no peft_config (no PEFT support, nothing to lose)"
        raise
    from flair.models import TextClassifier

    before = d.scores(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.pt")
        with d.quiet():
            model.save(path)
        try:
            with d.quiet():
                again = TextClassifier.load(path)
        except RuntimeError as e:
            return True, f"save -> load: RuntimeError: {d.first_line(e, 90)}"
    after = d.scores(again)
    if after != before:
        return True, f"save -> load: scores differ (max |diff| {d.max_diff(before, after):.1e})"
    return False, "save -> load: identical scores"
