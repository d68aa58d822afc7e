"""Lab reproduction for liger_ce_reduction_none: ``LigerCrossEntropyLoss(reduction="none")`` with
per-token weights, logits gradient against torch in float64 (the demo's scenario; the real Triton
kernel under TRITON_INTERPRET=1 on a CPU). Plain, label smoothing, z-loss and class weights."""
from __future__ import annotations

CASES = {"plain": {}, "label_smoothing": {"label_smoothing": 0.1}, "z_loss": {"lse_square_scale": 1e-2},
         "ce_weight": "ce_weight"}


def reproduce() -> tuple[bool | None, str]:
    import torch

    from hfpatches.demos import liger_ce_reduction_none as d

    parts, bad = [], False
    for name, opts in CASES.items():
        options = {"ce_weight": torch.linspace(0.5, 1.5, 16)} if opts == "ce_weight" else dict(opts)
        try:
            r = d.scenario(options=options)
        except Exception as e:  # noqa: BLE001 - a release without the option / without "none"
            parts.append(f"{name}: {type(e).__name__}")
            continue
        if float("inf") in (r["z"], r["loss"]):
            return False, "reduction='none' returns no per-token loss"
        bad = bad or r["z"] > 1e-2 * r["scale"]
        parts.append(f"{name} {r['z']:.2g}")
    if all(":" in p for p in parts):   # the module takes none of the options: the Function, plain
        r = d.scenario(path="function")
        if float("inf") in (r["z"], r["loss"]):
            return False, "reduction='none' returns no per-token loss (the summed scalar)"
        bad, parts = r["z"] > 1e-2 * r["scale"], [f"plain (Function) {r['z']:.2g}"]
    return bad, "max |grad - torch| " + ", ".join(parts)
