"""Lab reproduction for ``accelerate_resume_epoch``: resume after 3 batches of epoch 1 against the
uninterrupted run -- a ``datasets`` iterable dataset with ``.shuffle()`` through accelerate's
``DataLoaderShard`` and ``DataLoaderDispatcher`` (``skip_first_batches``), and
``transformers.Trainer.train(resume_from_checkpoint=...)`` (seedable sampler). Bug <=> any resumed
batch differs from the uninterrupted run's. Never applies hfpatches itself."""
from __future__ import annotations

# how `make lab` reruns this table: both sides of 1.15.0, the stack's 1.6.0, the Trainer change at 1.7.0
LAB_RUNS = [{"versions": "0.34.2,1.0.1,1.5.2,1.6.0,1.7.0,1.10.1,1.14.0,1.15.0,1.16.0"}]


def reproduce() -> tuple[bool | None, str]:
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        return None, "accelerate not installed"
    from hfpatches.demos import accelerate_resume_epoch as d

    cases = []
    if importlib.util.find_spec("datasets") is not None:
        cases += [(kind, d.loader_case(kind)) for kind in d.KINDS]
    if importlib.util.find_spec("transformers") is not None:
        cases.append(("Trainer", d.trainer_case()))
    if not cases:
        return None, "neither datasets nor transformers installed"
    bug = False
    parts = []
    for name, case in cases:
        ok, replay, n = d.score(case)
        bug = bug or ok != n
        parts.append(f"{name} {ok}/{n}" + (f" (epoch 0's: {replay}/{n})" if replay else ""))
    return bug, "resumed = uninterrupted: " + ", ".join(parts)


if __name__ == "__main__":
    print(reproduce())
