"""Every environment variable hfpatches reads, in one place.

Precedence everywhere: arguments > environment > defaults.
"""
from __future__ import annotations

import os

# The ``#:`` comment above each user variable is its row of the README's environment table
# (``scripts/matrix.py --write`` generates the table from ``ALL`` and these comments).

#: ``a,b``: apply only these patches (opt-in patches included).
ONLY = "HFPATCHES_ONLY"
#: ``a,b`` or ``*``: leave these patches (or all) alone.
DISABLE = "HFPATCHES_DISABLE"
#: ``1``: ``FAILED``/``TARGET_CHANGED``/``CONFLICT`` raise ``PatchError`` (for a deferred patch: at the
#: target's import); anything but APPLIED / ALREADY_APPLIED / NOT_AFFECTED / NOT_INSTALLED / DISABLED
#: counts. Under ``HFPATCHES_AUTO`` the interpreter refuses to start on a bad setting.
STRICT = "HFPATCHES_STRICT"
#: ``0``: trust the version ranges, skip the behavioural probes.
PROBE = "HFPATCHES_PROBE"
#: ``path``: run manifest: every interpreter writes its own JSON record (record id, pid, host, rank,
#: versions, outcomes, live fixes, the timeline of what was live and how it ended), rewritten only
#: when one of its outcomes changes and once at exit. A directory (existing, or ending in ``/``)
#: holds the records; any other path ``FILE`` is a small index with the records in ``FILE.d/``.
#: Symlinks are followed, devices/FIFOs refused; a write failure is one WARNING, never an error.
REPORT = "HFPATCHES_REPORT"
#: ``1``: apply at interpreter start (installed ``hfpatches_auto.pth``), no code change;
#: ``0``/``false``/``no``/``off``/empty: off (nothing of hfpatches is imported).
AUTO = "HFPATCHES_AUTO"
#: ``1``: switch on the opt-in ``strict_loads`` patch.
STRICT_LOADS = "HFPATCHES_STRICT_LOADS"
#: ``1``: switch on the opt-in ``collator_keep_eos`` patch.
COLLATOR_KEEP_EOS = "HFPATCHES_COLLATOR_KEEP_EOS"
#: ``backbone`` (default) or ``float32``: the compute dtype policy of ``peft_save_load`` (default:
#: the transformer keeps its dtype, the head trains in float32; see below).
DTYPE_POLICY = "HFPATCHES_DTYPE_POLICY"
DTYPE_POLICIES = ("backbone", "float32")
#: ``dir``: where the real test/demo weights (dequantized SmolLM2) are cached; default
#: ``~/.cache/hfpatches``.
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
ALL = (ONLY, DISABLE, STRICT, PROBE, REPORT, AUTO, STRICT_LOADS, COLLATOR_KEEP_EOS, DTYPE_POLICY, CACHE)

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
    get_bool(COLLATOR_KEEP_EOS, False)
    dtype_policy()
    get_list(ONLY)
    get_list(DISABLE)
