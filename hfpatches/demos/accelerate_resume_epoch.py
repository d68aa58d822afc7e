"""Demo: resuming mid-epoch with accelerate's ``skip_first_batches`` replays epoch 0's order.

Two scenarios on real libraries, no model download:

* loaders: a ``datasets`` iterable dataset with ``.shuffle()`` (its order depends on
  ``set_epoch``) prepared by accelerate as a ``DataLoaderShard`` and as a
  ``DataLoaderDispatcher``; an uninterrupted run of epochs 0 and 1 against a resume after 3
  batches of epoch 1 (a fresh loader, ``set_epoch(1)``, ``skip_first_batches(loader, 3)``).
* Trainer: ``transformers.Trainer`` on a map-style dataset (accelerate's seedable sampler), 2
  epochs of 8 steps, a checkpoint at step 11 (3 steps into epoch 1), then
  ``train(resume_from_checkpoint=...)``: the 5 resumed batches against the uninterrupted run's.

Also the shared scenario helpers the tests and the version lab use.
"""
from __future__ import annotations

from typing import Any

PID = "accelerate_resume_epoch"
N_ITEMS, BATCH, SKIP = 16, 2, 3          # 8 batches per epoch; resume after 3 batches of epoch 1
KINDS = ("DataLoaderShard", "DataLoaderDispatcher")


def shuffled_iterable():
    """A ``datasets`` iterable dataset of 16 ids, shuffled (buffer 16, seed 0): its order depends
    on the epoch given by ``set_epoch``."""
    import datasets

    ds = datasets.Dataset.from_dict({"x": list(range(N_ITEMS))}).to_iterable_dataset(num_shards=1)
    return ds.shuffle(seed=0, buffer_size=N_ITEMS)


def prepared(kind: str):
    """A fresh loader over :func:`shuffled_iterable`, prepared by accelerate as ``kind``
    (single process; ``PartialState`` is created as ``prepare`` would)."""
    import torch
    from accelerate.data_loader import prepare_data_loader

    dl = torch.utils.data.DataLoader(shuffled_iterable(), batch_size=BATCH)
    dispatch = kind == "DataLoaderDispatcher"
    out = prepare_data_loader(dl, device=torch.device("cpu"), put_on_device=dispatch, dispatch_batches=dispatch)
    assert type(out).__name__ == kind, type(out).__name__
    return out


def _ids(loader) -> list[list[int]]:
    return [[int(v) for v in b["x"]] for b in loader]


def loader_case(kind: str) -> dict:
    """Uninterrupted epochs 0 and 1, and a resume after ``SKIP`` batches of epoch 1 (a fresh
    loader, ``set_epoch(1)``, the installed ``skip_first_batches``)."""
    from accelerate import data_loader

    dl = prepared(kind)
    epochs = []
    for epoch in (0, 1):
        dl.set_epoch(epoch)
        epochs.append(_ids(dl))
    fresh = prepared(kind)
    fresh.set_epoch(1)
    resumed = _ids(data_loader.skip_first_batches(fresh, SKIP))
    return {"epoch0": epochs[0], "epoch1": epochs[1], "resumed": resumed,
            "want": epochs[1][SKIP:], "replay": epochs[0][SKIP:]}


class _Items:
    """A map-style dataset of ``N_ITEMS`` examples ``{"x": i}``."""

    def __len__(self):
        return N_ITEMS

    def __getitem__(self, i):
        return {"x": i}


def _recording_model(seen: list):
    import torch

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            if self.training:
                seen.append([int(v) for v in x])
            return {"loss": (self.w * x.float()).sum() * 0 + self.w.sum() ** 2}

    return Recorder()


def trainer_case() -> dict:
    """``transformers.Trainer``, 2 epochs x 8 steps, checkpoint at step 11, resumed from it:
    the batches of the uninterrupted run and of the resumed one (5 batches)."""
    import tempfile

    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    def run(out, resume=None):
        seen: list = []
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH, num_train_epochs=2,
                                 save_strategy="steps", save_steps=8 + SKIP, report_to=[],
                                 use_cpu=True, seed=0, learning_rate=0.0, logging_strategy="no",
                                 save_only_model=False, disable_tqdm=True, dataloader_num_workers=0)
        trainer: Any = Trainer(model=_recording_model(seen), args=args, train_dataset=_Items())
        trainer.remove_callback(PrinterCallback)     # no metrics printed
        trainer.train(resume_from_checkpoint=resume)
        return seen

    with tempfile.TemporaryDirectory() as out:
        full = run(out)
        resumed = run(out, resume=f"{out}/checkpoint-{8 + SKIP}")
    n = len(resumed)
    return {"epoch0": full[:8], "epoch1": full[8:], "resumed": resumed,
            "want": full[-n:] if n else [], "replay": full[8 - n:8] if n else []}


def score(case: dict) -> tuple[int, int, int]:
    """(resumed batches equal to the uninterrupted run's, equal to epoch 0's, resumed batches)."""
    got, want, replay = case["resumed"], case["want"], case["replay"]
    return (sum(a == b for a, b in zip(got, want)), sum(a == b for a, b in zip(got, replay)), len(got))


def describe(name: str, case: dict) -> str:
    ok, rep, n = score(case)
    return f"{name}: {ok}/{n} resumed batches equal the uninterrupted run's, {rep}/{n} equal epoch 0's"


def run(say) -> bool:
    import importlib.util

    import hfpatches

    if importlib.util.find_spec("accelerate") is None:
        r = hfpatches.apply(only=[PID])[PID]
        say(f"{r.outcome.value}: {r.reason}")
        return True
    import accelerate

    hfpatches.revert([PID])
    ok = True
    have_datasets = importlib.util.find_spec("datasets") is not None
    results = {}
    for stage in ("without hfpatches", "with hfpatches"):
        if stage == "with hfpatches":
            r = hfpatches.apply(only=[PID])[PID]
            say(f"hfpatches.apply: {r.outcome.value} ({r.reason})")
        lines = []
        for kind in KINDS if have_datasets else ():
            lines.append((kind, loader_case(kind)))
        if importlib.util.find_spec("transformers") is not None:
            lines.append(("Trainer resume_from_checkpoint", trainer_case()))
        for name, case in lines:
            say(f"accelerate {accelerate.__version__}, {stage}: {describe(name, case)}")
        results[stage] = lines
    for name, case in results["with hfpatches"]:
        good, _, n = score(case)
        ok = ok and good == n
    return ok
