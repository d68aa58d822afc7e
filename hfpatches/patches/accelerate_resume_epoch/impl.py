"""Implementation of ``accelerate_resume_epoch`` (declared in ``__init__.py``; rationale in
docs/patches/accelerate_resume_epoch.md)."""
from __future__ import annotations

import sys
from typing import Any

from hfpatches._declare import ProbeResult

MODULE = "accelerate.data_loader"
NAME = "skip_first_batches"
KINDS = ("DataLoaderShard", "DataLoaderDispatcher")   # the loaders that own an epoch (``iteration``)
EPOCH = 1                                             # the probe resumes in this epoch


# ----------------------------------------------------------------------------- the fix
def _applied() -> bool:
    """Is the patch applied now? (``accelerate.data_loader.skip_first_batches`` is a wrapper of
    ours.) A module that imported the wrapper by name while it was applied keeps it after a
    revert: then it passes straight through."""
    mod = sys.modules.get(MODULE)
    current = vars(mod).get(NAME) if mod is not None else None
    return getattr(current, "_self_wrapper", None) is carry_epoch


def _loader_arg(args: tuple, kwargs: dict) -> Any:
    return args[0] if args else kwargs.get("dataloader")


def carry_epoch(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Wrapper of ``skip_first_batches``: the ``DataLoaderShard``/``DataLoaderDispatcher`` it
    builds gets the old loader's ``iteration`` (what accelerate >= 1.15.0 passes to the
    constructor, huggingface/accelerate#4071). Any other result is returned as it is."""
    new = wrapped(*args, **kwargs)
    if not _applied():
        return new
    mod = sys.modules.get(MODULE)
    kinds: tuple[Any, ...] = tuple(k for k in (getattr(mod, n, None) for n in KINDS) if isinstance(k, type))
    old, new_ = _epoch_owner(_loader_arg(args, kwargs), kinds), _epoch_owner(new, kinds)
    if old is not None and new_ is not None and new_ is not old:
        epoch = getattr(old, "iteration", None)
        if isinstance(epoch, int) and getattr(new_, "iteration", None) != epoch:
            new_.iteration = epoch
    return new


def _epoch_owner(loader: Any, kinds: tuple[Any, ...]) -> Any:
    """The ``DataLoaderShard``/``DataLoaderDispatcher`` that owns ``loader``'s epoch: itself, or
    under XLA the one inside accelerate's ``MpDeviceLoaderWrapper`` (``_loader``), which
    ``skip_first_batches`` both takes and returns there. None for anything else."""
    if not kinds:
        return None
    if isinstance(loader, kinds):
        return loader
    inner = getattr(loader, "_loader", None)
    return inner if isinstance(inner, kinds) else None


def _is_ours(value: Any) -> bool:
    return getattr(value, "_self_wrapper", None) is carry_epoch


def apply(ctx) -> None:
    mod = ctx.module(MODULE)
    original = vars(mod)[NAME]
    proxy = ctx.wrap(mod, NAME, carry_epoch)
    # Modules that imported the function by name (``from accelerate import skip_first_batches``:
    # accelerate itself, accelerate.accelerator, transformers.trainer, ...): a patch of the module
    # attribute alone would not reach them. Modules imported later bind the wrapper.
    for name, other in list(sys.modules.items()):
        if other is None or other is mod:
            continue
        try:
            value = vars(other).get(NAME)
        except TypeError:
            continue
        if value is original:
            ctx.replace(other, NAME, proxy)
        elif value is not None and not _is_ours(value) and getattr(value, "__wrapped__", None) is original:
            ctx.log.info("%s: %s.%s is somebody else's wrapper of accelerate's function; left alone",
                         ctx.patch.id, name, NAME)


def check(ctx) -> str | None:
    """The loaders still restart at ``set_epoch(self.iteration)`` in ``__iter__``."""
    mod = sys.modules[MODULE]
    for kind in KINDS:
        cls = getattr(mod, kind, None)
        code = getattr(getattr(cls, "__iter__", None), "__code__", None)
        if code is None or "set_epoch" not in code.co_names or "iteration" not in code.co_names:
            return f"{MODULE}.{kind}.__iter__ no longer calls set_epoch(self.iteration)"
    return None


# ----------------------------------------------------------------------------- probe
class _Inert:
    """Stand-in for accelerate's ``GradientState``: a loader registers itself with it while it is
    iterated (``_add_dataloader``/``_remove_dataloader``); nothing is recorded."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *a, **k: None


def _stand_in_state(mod: Any) -> type:
    no = mod.DistributedType.NO

    class SingleProcess:
        """Stand-in for accelerate's ``PartialState`` (a process-wide singleton that may set up
        torch.distributed): one process, no XLA."""

        distributed_type = no
        num_processes = 1
        process_index = 0
        local_process_index = 0
        is_main_process = True
        device = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

    return SingleProcess


def _rebound(fn: Any, namespace: dict) -> Any:
    """``fn``'s own code and closure, its globals looked up in ``namespace``."""
    import types

    out = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    out.__kwdefaults__ = fn.__kwdefaults__
    return out


def _sandbox(mod: Any) -> tuple[dict, dict]:
    """A copy of the module's namespace where the process-wide singletons are stand-ins and the
    two loader classes are subclasses whose ``__init__`` is accelerate's own code run in it."""
    namespace = dict(vars(mod))
    state = _stand_in_state(mod)
    namespace.update(PartialState=state, GradientState=_Inert)
    kinds = {}
    for kind in KINDS:
        real = getattr(mod, kind)
        init = vars(real).get("__init__")
        if type(init) is not type(_rebound):
            raise TypeError(f"{kind}.__init__ is not a plain function ({type(init).__name__})")
        kinds[kind] = type(f"Probe{kind}", (real,), {"__init__": _rebound(init, namespace),
                                                     "__module__": __name__})
    namespace.update(kinds)
    return namespace, kinds


def _runnable(public: Any, mod: Any, namespace: dict) -> Any:
    """``public`` (accelerate's function, or our wrapper of it) runnable in the sandbox; None when
    it is somebody else's."""
    if _is_ours(public):
        inner = _runnable(public.__wrapped__, mod, namespace)
        if inner is None:
            return None
        wrapper = public._self_wrapper
        return lambda *a, **k: wrapper(inner, None, a, k)
    if type(public) is type(_rebound) and public.__globals__ is vars(mod):
        return _rebound(public, namespace)
    return None


def _epoch_dataset() -> Any:
    import torch

    class Epochs(torch.utils.data.IterableDataset):
        """Three items; remembers every ``set_epoch``."""

        def __init__(self) -> None:
            self.epochs: list[int] = []

        def set_epoch(self, epoch: int) -> None:
            self.epochs.append(epoch)

        def __iter__(self):
            return iter(range(3))

    return Epochs()


def probe(ctx) -> ProbeResult:
    mod = sys.modules[MODULE]
    public = vars(mod).get(NAME)
    try:
        namespace, kinds = _sandbox(mod)
    except (AttributeError, TypeError) as e:
        return ProbeResult(None, f"could not build the probe's loaders: {e}")
    run = _runnable(public, mod, namespace)
    if run is None:
        return ProbeResult(None, f"{MODULE}.{NAME} is not accelerate's function (somebody else's wrapper)")
    try:
        return _run(run, kinds)
    except Exception as e:  # the installed code did something the stand-ins do not cover
        return ProbeResult(None, f"{NAME} could not run on the probe's loaders: {type(e).__name__}: {e}")


def _run(run: Any, kinds: dict) -> ProbeResult:
    import torch

    seen = []
    bug = False
    for kind, cls in kinds.items():
        data = _epoch_dataset()
        # a local generator: torch's loader iterator draws its base seed from it, not from the global RNG
        old = cls(data, batch_size=1, generator=torch.Generator())
        old.set_epoch(EPOCH)
        new = run(old, 1)
        epoch = getattr(new, "iteration", None)
        if kind == "DataLoaderShard" and isinstance(new, cls):
            del data.epochs[:]
            batches = list(new)
            epoch = data.epochs[-1] if data.epochs else epoch
            seen.append(f"{kind} iterates at epoch {epoch} ({len(batches)} of 3 batches)")
        else:
            seen.append(f"{kind} restarts at epoch {epoch}")
        bug = bug or epoch != EPOCH
    return ProbeResult(bug, f"{NAME}(a loader at epoch {EPOCH}, 1): " + ", ".join(seen))
