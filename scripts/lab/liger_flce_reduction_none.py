"""Lab reproduction for liger_flce_reduction_none: Liger's fused linear cross-entropy with
reduction="none" and per-token weights, gradients against plain torch in float64 (the demo's
scenario; Triton kernel under TRITON_INTERPRET=1 on a CPU)."""
from __future__ import annotations


def reproduce() -> tuple[bool | None, str]:
    from hfpatches.demos import liger_flce_reduction_none as d

    x, w, b, y, tw = d.inputs()
    ref = d.torch_reference(x, w, b, y, tw)
    got, why = None, ""
    for path in ("module", "function"):  # 0.5.9-0.6.2: the module rejects "none", the Function sums
        try:
            got = d.liger_run(x, w, b, y, tw, path=path)
            break
        except Exception as e:  # noqa: BLE001 - a release without reduction="none"
            why = f"{path}: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    if got is None:
        return False, f"reduction='none' not supported ({why})"
    if got["loss"].dim() != 1:
        return False, f"reduction='none' returns a {got['loss'].dim()}-D loss (no per-token loss; {why})"
    r = d.compare(got, ref)
    bad = max(r["x"], r["w"]) > 1e-2 * r["scale"]
    return bad, f"{path}: max |grad_input - torch| {r['x']:.3g}, |grad_weight - torch| {r['w']:.3g} (scale {r['scale']:.3g})"


# both sides of 0.5.3 (reduction="none" added), 0.5.9 and 0.6.3 (dropped, back), 0.8.2 (fixed)
LAB_RUNS = [{"versions": "0.5.2,0.5.3,0.5.6,0.5.7,0.5.8,0.5.9,0.5.10,0.6.0,0.6.1,0.6.2,0.6.3,0.8.1,0.8.2,0.8.5"}]
