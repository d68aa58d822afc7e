"""Shared fixtures for the CPU suite (runs unchanged on every stack: .venvs/<stack> for each name in
``hfpatches._declare.STACKS``)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# Real weights are dequantized once and cached inside the repository (git-ignored), so CI reuses them.
os.environ.setdefault("HFPATCHES_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from hfpatches import _env  # noqa: E402

for _v in _env.ALL:
    if _v != _env.CACHE:
        os.environ.pop(_v, None)
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
# Deterministic numerics: BLAS/OpenMP reductions are split by thread count, and MKL shrinks its
# team under load (MKL_DYNAMIC), so fp32 results moved with `-n 2` on 2 cores. One thread in every
# test process and in every child process (they inherit the environment); see _one_thread below.
for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_v] = "1"


def _version(dist: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


_STACK_ENV = "HFPATCHES_TEST_STACK"  # set by the Makefile; tests only (not a user switch)


def current_stack() -> str:
    """The stack under test (a name in ``_declare.STACKS``): ``$HFPATCHES_TEST_STACK`` (the Makefile
    exports it), else the name of the venv this interpreter runs in (``.venvs/<stack>``). Tests that
    depend on what is installed should ask the installed versions, not this name."""
    from hfpatches._declare import STACKS

    name = os.environ.get(_STACK_ENV) or Path(sys.prefix).name
    if os.environ.get(_STACK_ENV) and name not in STACKS:
        raise RuntimeError(f"{_STACK_ENV}={name!r} is none of {STACKS}")
    return name  # another venv (not one of ours): its own name, so no stack-specific test claims it


@pytest.fixture(scope="session")
def stack() -> str:
    return current_stack()


def in_range(patch_id: str) -> bool:
    """The installed versions satisfy every ``requires`` line of ``patch_id`` (the bug's range).
    Tests that expect the bug on one stack and not on another decide by this, not by the stack's
    name (the boundary stack sits on one side or the other, patch by patch)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    from hfpatches._registry import registry

    for line in registry()[patch_id].requires:
        req = Requirement(line)
        v = _version(req.name)
        if v is None or not req.specifier.contains(Version(v), prereleases=True):
            return False
    return True


def range_stack(patch_id: str) -> str:
    """'affected' where ``patch_id``'s bug range holds for the installed versions, else 'latest':
    for test modules written against the two original stacks (they override the ``stack``
    fixture with this, so the boundary stack gets the expectations its versions call for)."""
    return "affected" if in_range(patch_id) else "latest"


def pytest_report_header(config):
    from hfpatches._doctor import STACK

    return f"stack: {current_stack()} ({', '.join(f'{n}={_version(n)}' for n in STACK)})"


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    from hfpatches._models import minilm_dir as f

    return f()


@pytest.fixture(scope="session")
def smollm_dir() -> str:
    """fp32 safetensors SmolLM2-135M (dequantized from the packaged GGUF once, then cached)."""
    from hfpatches._models import smollm2_dir

    return smollm2_dir()


@pytest.fixture
def flash_attn_cpu():
    """Import flash-attn's BERT on CPU (stubs for its CUDA-only pieces; tests only)."""
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:  # its import needs the stubs first
        pytest.skip("flash-attn is not installed")
    from _stubs import install_flash_attn_cpu_stubs

    install_flash_attn_cpu_stubs()
    import flash_attn.models.bert as fb

    return fb


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """torch.set_num_threads(1) too, in case torch was imported before this conftest."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _revert_everything():
    """No test leaks a live patch into the next one."""
    yield
    import hfpatches

    hfpatches.revert()


def run_py(code: str, *, env: dict | None = None, check: bool = True, timeout: int = 600,
           python: str | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (same venv unless ``python``); return the result."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]), **(env or {})}
    for k, v in list(full_env.items()):
        if v is None:
            del full_env[k]
    proc = subprocess.run([python or sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                          capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    if check and proc.returncode != 0:
        raise AssertionError(f"subprocess failed (rc={proc.returncode})\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


@pytest.fixture
def py():
    return run_py
