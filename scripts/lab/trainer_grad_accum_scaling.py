"""Version-lab reproduction of ``trainer_grad_accum_scaling`` (run in a fresh interpreter).

The scenario: a ``transformers.Trainer`` subclass with its own ``compute_loss`` on batches without
``labels`` (so ``num_items_in_batch`` is None), a tiny ``LlamaForCausalLM`` (its forward takes
``**kwargs``). One SGD step (lr=1, no clipping): GA=4 x batch 1 against GA=1 x batch 4 over the
same four examples; the ratios of the update norms and of the logged losses.

* both 1.000 (+-1e-3): no bug;
* both 4.000 (GA) while a model *without* ``**kwargs`` (the Trainer divides for it) gives 1.000:
  this patch's bug, the case 4.48.1's condition misses (transformers 4.48.1-4.52.x);
* anything else: None with the numbers, a different defect in the same scenario that this patch
  does not fix (4.46.0-4.47.1: the Trainer never divides by GA for any model, so the model
  without ``**kwargs`` is GA x too; 4.47.1's logged loss is right while the update is not). See
  the docs page.

Does not apply hfpatches itself.
"""
from __future__ import annotations

GA = 4
LAB_RUNS = [{"package": "transformers", "versions": "4.46.0,4.46.3", "with": ["tokenizers==0.20.3"]},
            {"package": "transformers", "versions": "4.47.1,4.48.0,4.48.1,4.50.3,4.51.3,4.52.4,4.53.0,4.54.1,4.55.0"},
            {"package": "transformers", "versions": "5.23.0", "stack": "latest"}]


def reproduce() -> tuple[bool | None, str]:
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        return None, f"transformers not importable: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    from hfpatches.demos import trainer_grad_accum_scaling as scenario

    ratio, loss_ratio, _, _ = scenario.update_ratio("custom")
    seen = f"update ratio {ratio:.3f}, logged loss ratio {loss_ratio:.3f}"
    if abs(ratio - 1) < 1e-3 and abs(loss_ratio - 1) < 1e-3:
        return False, seen
    plain, plain_loss, _, _ = scenario.update_ratio("no_kwargs")
    seen += f" (a model whose forward takes no kwargs: {plain:.3f}, {plain_loss:.3f})"
    if max(abs(ratio - GA), abs(loss_ratio - GA)) < GA * 1e-3 and max(abs(plain - 1), abs(plain_loss - 1)) < 1e-3:
        return True, seen
    return None, f"{seen}: a different defect (not this patch's: advisory)"


if __name__ == "__main__":
    print(reproduce())
