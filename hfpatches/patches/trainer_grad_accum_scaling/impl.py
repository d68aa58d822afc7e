"""Implementation of ``trainer_grad_accum_scaling`` (declared in ``__init__.py``; rationale in
docs/patches/trainer_grad_accum_scaling.md)."""
from __future__ import annotations

import contextlib
import sys
from typing import Any

from hfpatches._declare import ProbeResult, raw_getattr

from . import PATCH

__all__ = ["needs_division"]

PATCH_ID = PATCH.id
TRAINER_MODULE = "transformers.trainer"


def needs_division(trainer: Any, num_items_in_batch: Any) -> bool:
    """The case transformers 4.48.1-4.52.x leaves undivided and 4.53.0 divides by GA: the model
    accepts loss kwargs (so the installed code trusts it to normalise), but there is no
    ``num_items_in_batch`` to normalise by, and no ``compute_loss_func``."""
    return (num_items_in_batch is None
            and getattr(trainer, "compute_loss_func", None) is None
            and bool(getattr(trainer, "model_accepts_loss_kwargs", False)))


class _Undivided:
    """A view of a trainer for one ``training_step`` call: ``model_accepts_loss_kwargs`` reads
    False, every other attribute is the trainer's own (read and written through), methods are
    the trainer's bound methods (``self.compute_loss`` is the subclass's, called on the trainer
    itself, which still says True). The trainer is never modified."""

    __slots__ = ("_trainer",)
    model_accepts_loss_kwargs = False

    def __init__(self, trainer: Any) -> None:
        object.__setattr__(self, "_trainer", trainer)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_trainer"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(object.__getattribute__(self, "_trainer"), name, value)

    def __delattr__(self, name: str) -> None:
        delattr(object.__getattribute__(self, "_trainer"), name)


def _split(instance: Any, args: tuple, kwargs: dict) -> tuple[Any, tuple, Any]:
    """(trainer, arguments after self, num_items_in_batch) of a ``training_step`` call, whether
    it came bound (``trainer.training_step(...)``) or through the class (``Trainer.training_step(trainer, ...)``)."""
    if instance is None:
        instance, args = args[0], args[1:]
    num = kwargs.get("num_items_in_batch", args[2] if len(args) > 2 else None)
    return instance, args, num


def make_training_step(function: Any):
    """The wrapper of ``Trainer.training_step``; ``function`` is the unpatched function."""

    def training_step(wrapped, instance, args, kwargs):
        trainer, rest, num = _split(instance, args, kwargs)
        if not needs_division(trainer, num):
            return wrapped(*args, **kwargs)          # the original call, untouched
        return function(_Undivided(trainer), *rest, **kwargs)

    return training_step


# ----------------------------------------------------------------------------- probe
class _Accelerator:
    distributed_type = "NO"

    def __init__(self) -> None:
        self.losses: list = []

    def backward(self, loss: Any, **kwargs: Any) -> None:
        self.losses.append(loss)


class _Args:
    gradient_accumulation_steps = 2
    torch_empty_cache_steps = None
    optim = "sgd"
    n_gpu = 1
    past_index = -1
    device = "cpu"


class _State:
    global_step = 0


class _StandInTrainer:
    """What ``Trainer.training_step`` (4.46-5.x) reads of ``self``: GA=2, a model that accepts
    loss kwargs, no ``compute_loss_func``, no apex, an accelerator that records the loss it is
    handed instead of running backward."""

    model_accepts_loss_kwargs = True
    compute_loss_func = None
    loss_is_scaled_for_ga = None       # transformers >= 5: None = decide from the above
    current_gradient_accumulation_steps = 2
    use_apex = False
    optimizer = None
    args = _Args()
    state = _State()

    def __init__(self, loss: Any) -> None:
        self.accelerator = _Accelerator()
        self._loss = loss

    def _prepare_inputs(self, inputs: Any) -> Any:
        return inputs

    def _prepare_context_parallel_inputs(self, model: Any, inputs: Any) -> tuple:
        return contextlib.nullcontext, inputs

    def compute_loss_context_manager(self) -> Any:
        return contextlib.nullcontext()

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        return self._loss


def probe() -> ProbeResult:
    import torch

    trainer_cls = sys.modules[TRAINER_MODULE].Trainer
    stand_in = _StandInTrainer(torch.tensor(1.0))
    try:
        returned = trainer_cls.training_step(stand_in, torch.nn.Module(), {}, None)
    except (AttributeError, TypeError) as e:      # a Trainer that reads more of self than we know
        return ProbeResult(None, f"the installed Trainer.training_step could not run on a stand-in "
                                 f"trainer ({type(e).__name__}: {e})")
    if len(stand_in.accelerator.losses) != 1:
        return ProbeResult(None, f"the installed Trainer.training_step called backward "
                                 f"{len(stand_in.accelerator.losses)} times on a stand-in trainer")
    handed = float(stand_in.accelerator.losses[0])
    seen = (f"GA=2, a model accepting loss kwargs, num_items_in_batch=None: loss 1.0 -> backward "
            f"{handed:g}, returned {float(returned):g}")
    return ProbeResult(handed != 0.5, seen)


def apply(ctx: Any) -> None:
    trainer = ctx.module(TRAINER_MODULE).Trainer
    # what the wrapper wraps (ctx.wrap wraps the value stored now): the installed function
    ctx.wrap(trainer, "training_step", make_training_step(raw_getattr(trainer, "training_step")))
