"""A ``.bin`` that pickles code is refused by ``torch.load(weights_only=True)``; hfpatches' refusal
keeps what torch found (the global it refused, e.g. ``posix.system``) in the error, on every
torch message format (torch 2.13 words it "Trying to load unsupported GLOBAL posix.system whose
module posix is blocked", older releases "Unsupported global: GLOBAL posix.system ...")."""
from __future__ import annotations

import os
import pickle

import pytest

from hfpatches.errors import CheckpointError

torch = pytest.importorskip("torch")


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_bin(tmp_path) -> tuple[str, str]:
    marker = str(tmp_path / "PWNED")
    path = str(tmp_path / "pytorch_model.bin")
    torch.save({"w": torch.zeros(2), "x": _Evil(marker)}, path)
    return path, marker


def test_refusal_names_the_global_torch_refused(tmp_path):
    from hfpatches.loading import read_checkpoint

    path, marker = _evil_bin(tmp_path)
    with pytest.raises(pickle.UnpicklingError) as torch_error:
        torch.load(path, weights_only=True)
    culprit = f"{os.system.__module__}.system"                          # posix.system on Linux
    assert culprit in str(torch_error.value)                            # torch names it ...
    for target in (path, str(tmp_path)):
        with pytest.raises(CheckpointError) as e:
            read_checkpoint(target)
        msg = str(e.value)
        assert path in msg and culprit in msg, msg                      # ... and so does our refusal
        assert "weights_only=True" in msg
    assert not os.path.exists(marker)                                   # nothing ran


@pytest.mark.parametrize("torch_text", [
    "Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` argument in "
    "`torch.load` from `False` to `True`. Re-running `torch.load` with `weights_only` set to `False` will likely "
    "succeed, but it can result in arbitrary code execution. Do it only if you got the file from a trusted "
    "source.\n\n\nTrying to load unsupported GLOBAL posix.system whose module posix is blocked.\n\nCheck the "
    "documentation of torch.load to learn more about types accepted by default with weights_only "
    "https://pytorch.org/docs/stable/generated/torch.load.html.",
    "Weights only load failed. This file can still be loaded, to do so you have two options, do those steps only "
    "if you trust the source of the checkpoint. \n\t(1) In PyTorch 2.6, we changed the default value of the "
    "`weights_only` argument in `torch.load` from `False` to `True`. Re-running `torch.load` with `weights_only` "
    "set to `False` will likely succeed, but it can result in arbitrary code execution. Do it only if you got the "
    "file from a trusted source.\n\t(2) Alternatively, to load with `weights_only=True` please check the "
    "recommended steps in the following error message.\n\tWeightsUnpickler error: Unsupported global: GLOBAL "
    "posix.system was not an allowed global by default. Please use `torch.serialization.add_safe_globals("
    "[posix.system])` or the `torch.serialization.safe_globals([posix.system])` context manager to allowlist "
    "this global if you trust this class/function.\n\nCheck the documentation of torch.load to learn more about "
    "types accepted by default with weights_only https://pytorch.org/docs/stable/generated/torch.load.html.",
    "Weights only load failed. Some future torch wording we do not know.\nUnpickler refused: posix.system\n",
])
def test_every_torch_wording_keeps_the_culprit(tmp_path, monkeypatch, torch_text):
    from hfpatches.loading import read_checkpoint

    path, _ = _evil_bin(tmp_path)

    def refusing_load(*a, **kw):
        raise pickle.UnpicklingError(torch_text)

    monkeypatch.setattr(torch, "load", refusing_load)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    assert "posix.system" in str(e.value) and path in str(e.value), str(e.value)
