"""Version-lab reproduction of ``trainer_grad_accum_scaling`` (run in a fresh interpreter).

The scenario: a ``transformers.Trainer`` subclass with its own ``compute_loss`` on batches without
``labels`` (so ``num_items_in_batch`` is None), a tiny ``LlamaForCausalLM`` (its forward takes
``**kwargs``). One SGD step (lr=1, no clipping): GA=4 x batch 1 against GA=1 x batch 4 over the same
four examples. Bug <=> the update norms differ by more than 1e-3 (4.000 on transformers 4.51.3).
Does not apply hfpatches itself.
"""
from __future__ import annotations


def reproduce() -> tuple[bool | None, str]:
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        return None, f"transformers not importable: {e}"
    from hfpatches.demos import trainer_grad_accum_scaling as scenario

    ratio, loss_ratio, _, _ = scenario.update_ratio("custom")
    return abs(ratio - 1) > 1e-3, f"update ratio {ratio:.4f}, logged loss ratio {loss_ratio:.4f}"


if __name__ == "__main__":
    print(reproduce())
