"""Every environment variable hfpatches reads, in one place.

Precedence everywhere: arguments > environment > defaults.
"""
from __future__ import annotations

import os

#: Comma list of patch ids: apply only these (opt-in patches included).
ONLY = "HFPATCHES_ONLY"
#: Comma list of patch ids to leave alone, or ``*`` for all of them.
DISABLE = "HFPATCHES_DISABLE"
#: ``1``: anything but APPLIED / ALREADY_APPLIED / NOT_AFFECTED / NOT_INSTALLED / DISABLED raises.
STRICT = "HFPATCHES_STRICT"
#: ``0``: skip the behavioural probes and trust the version ranges.
PROBE = "HFPATCHES_PROBE"
#: Run manifest: a directory (existing, or ending in ``/``) gets one JSON record per process;
#: any other path ``FILE`` is an index, with the records in ``FILE.d/`` (see ``_manifest.py``).
#: Each process rewrites only its own record, when one of its outcomes changes.
REPORT = "HFPATCHES_REPORT"
#: ``1``: apply at interpreter start (through the installed ``hfpatches_auto.pth``).
AUTO = "HFPATCHES_AUTO"
#: ``1``: switch on the opt-in ``strict_loads`` patch.
STRICT_LOADS = "HFPATCHES_STRICT_LOADS"
#: ``backbone`` (default) or ``float32``: the compute dtype policy of ``peft_save_load``.
DTYPE_POLICY = "HFPATCHES_DTYPE_POLICY"
DTYPE_POLICIES = ("backbone", "float32")
#: Directory for the real test/demo weights (dequantized SmolLM2); default ``~/.cache/hfpatches``.
CACHE = "HFPATCHES_CACHE"

#: Launcher conventions, read (never set) for the run manifest: (rank, local rank, world size)
#: variables, most specific first. torchrun and multi-process ``accelerate launch`` set the torch
#: ones; Open MPI, MPICH / Intel MPI and MVAPICH (accelerate's mpirun path) theirs; ``srun`` SLURM's.
RANK_SOURCES = (
    ("RANK", "LOCAL_RANK", "WORLD_SIZE"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("PMI_RANK", "MPI_LOCALRANKID", "PMI_SIZE"),
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_SIZE"),
    ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"),
)
#: What tells one launch from another (and a torchelastic restart), recorded with the rank.
RUN_VARS = ("SLURM_JOB_ID", "SLURM_STEP_ID", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
            "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "SLURM_NODEID")

#: Every variable a user sets (tests clear these for a clean slate).
ALL = (ONLY, DISABLE, STRICT, PROBE, REPORT, AUTO, STRICT_LOADS, DTYPE_POLICY, CACHE)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def get_bool(name: str, default: bool) -> bool:
    """Read a boolean switch; a malformed value is an error, never a guess."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    val = raw.strip().lower()
    if val in _TRUE:
        return True
    if val in _FALSE:
        return False if val else default
    raise ValueError(f"{name}={raw!r} is not a boolean: use 1 or 0 (also true/false, yes/no, on/off)")


def get_list(name: str) -> tuple[str, ...] | None:
    """Read a comma list (``None`` when unset or empty). ``*`` is returned as ``('*',)``."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    items = tuple(p.strip() for p in raw.split(",") if p.strip())
    if not items:
        raise ValueError(f"{name}={raw!r} names no patch id: unset it, or list ids like 'meta_buffers,peft_save_load'")
    for item in items:
        if item != "*" and not item.replace("_", "").isalnum():
            raise ValueError(f"{name}={raw!r}: {item!r} is not a patch id (ids are like 'meta_buffers')")
    return items


def get_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    val = raw.strip().lower()
    if val not in choices:
        raise ValueError(f"{name}={raw!r} is not one of {', '.join(choices)}")
    return val


def get_path(name: str) -> str | None:
    raw = os.environ.get(name)
    return (raw.strip() or None) if raw is not None else None


def get_raw(name: str) -> str | None:
    """The value as set (None when unset); for variables with no syntax to check."""
    return os.environ.get(name)


def get_set(names) -> dict[str, str]:
    """``{name: value}`` of those ``names`` that are set, as set."""
    get = os.environ.get
    return {k: v for k, v in ((k, get(k)) for k in names) if v is not None}


def set_raw(name: str, value: str) -> None:
    os.environ[name] = value


def dtype_policy() -> str:
    """``HFPATCHES_DTYPE_POLICY``, validated (a ValueError naming the valid values)."""
    return get_choice(DTYPE_POLICY, DTYPE_POLICIES, DTYPE_POLICIES[0])


def validate() -> None:
    """Check every switch ``apply()`` depends on, so a typo fails at apply time, never later."""
    get_bool(STRICT, False)
    get_bool(PROBE, True)
    get_bool(STRICT_LOADS, False)
    dtype_policy()
    get_list(ONLY)
    get_list(DISABLE)
