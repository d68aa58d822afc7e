"""GPU regression suite: real CUDA kernels (flash-attn, Liger Triton), bf16, numeric parity.

Run on a CUDA machine with ``bash gpu_tests/run.sh`` (see README). Without CUDA every test here
is skipped with the reason, so ``pytest gpu_tests`` is always safe to run.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HFPATCHES_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(ROOT / "tests"))


def _cuda_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__}, torch.version.cuda={torch.version.cuda})"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _cuda_reason()
    if reason is None:
        return
    mark = pytest.mark.skip(reason=f"gpu_tests need CUDA: {reason}")
    for item in items:
        item.add_marker(mark)


def pytest_report_header(config):
    reason = _cuda_reason()
    if reason:
        return f"gpu_tests: SKIPPING ALL — {reason}"
    import torch

    return f"gpu_tests: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"


@pytest.fixture(autouse=True)
def _revert_everything():
    yield
    import hfpatches

    hfpatches.revert()


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    from hfpatches._models import minilm_dir as f

    return f()


@pytest.fixture(scope="session")
def smollm_dir() -> str:
    from hfpatches._models import smollm2_dir

    return smollm2_dir()
