"""``accelerate_resume_epoch``: a mid-epoch resume continues the epoch it stopped in, not epoch 0.

Bug
    ``accelerate.skip_first_batches`` builds a new ``DataLoaderShard``/``DataLoaderDispatcher``
    without the old loader's ``iteration`` (the epoch); its ``__iter__`` calls
    ``set_epoch(self.iteration)``, i.e. ``set_epoch(0)``. Resumed after 3 batches of epoch 1, a
    ``datasets`` iterable dataset with ``.shuffle()`` yields epoch 0's batches (0/5 right); from
    1.7.0 on, ``Trainer.train(resume_from_checkpoint=...)`` too (seedable sampler). Silent:
    samples are trained twice and others never on every mid-epoch resume.
Affected
    accelerate 0.34.2-1.14.0 measured, older not runnable here (fixed in 1.15.0). Table: docs/patches/accelerate_resume_epoch.md.
Upstream
    huggingface/accelerate#4071 (merged, in 1.15.0); reports #2016, #3996.
Probe
    Runs the installed ``skip_first_batches`` on tiny loaders of both kinds at epoch 1 (a
    stand-in for accelerate's process-wide ``PartialState``/``GradientState``, so nothing global
    is created; a local ``torch.Generator``): bug <=> the skipped loader restarts at epoch 0.
What changes
    ``skip_first_batches`` (in ``accelerate.data_loader`` and where it was imported by name:
    ``accelerate``, ``accelerate.accelerator``, ``transformers.trainer``, ...) is wrapped: a
    ``DataLoaderShard``/``DataLoaderDispatcher`` it returns gets the old loader's ``iteration``,
    as accelerate 1.15.0 passes it. Nothing else: a plain ``DataLoader``/``SkipDataLoader``
    result (no epoch of its own; it shares the dataset and sampler) is returned untouched.
"""
from hfpatches._declare import Patch, Target

PATCH = Patch(
    id="accelerate_resume_epoch",
    summary="accelerate's skip_first_batches: a mid-epoch resume (Trainer resume_from_checkpoint, "
            "accelerator.skip_first_batches) continues the current epoch's order instead of replaying epoch 0's",
    upstream=("huggingface/accelerate#4071", "huggingface/accelerate#2016", "huggingface/accelerate#3996"),
    requires=("accelerate<1.15.0",),
    fixed_in="accelerate>=1.15.0",
    # Declared on the package: accelerate.data_loader is imported in the middle of ``import
    # accelerate``; once the package is complete, every accelerate module that imported the
    # function by name exists.
    targets=(Target("accelerate", "data_loader.skip_first_batches", params=("dataloader", "num_batches")),),
)
