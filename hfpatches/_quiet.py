"""One context manager for the small models hfpatches builds (probes, demos): transformers'
logging at ERROR and its progress bars off, optionally flair's logger at WARNING, the caller's
torch RNG untouched, ``TOKENIZERS_PARALLELISM`` as it was; everything restored on exit."""
from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any


class Quiet:
    def __init__(self, *, flair: bool = False, rng: bool = False) -> None:
        self.flair, self.rng = flair, rng
        self._undo: list[Any] = []

    def __enter__(self) -> Quiet:
        from transformers.utils import logging as tlog

        level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
        tlog.set_verbosity_error()
        if bars:
            tlog.disable_progress_bar()
        def restore_transformers() -> None:
            tlog.set_verbosity(level)
            if bars:
                tlog.enable_progress_bar()

        self._undo.append(restore_transformers)
        tok = os.environ.get("TOKENIZERS_PARALLELISM")
        self._undo.append(lambda: os.environ.pop("TOKENIZERS_PARALLELISM", None) if tok is None
                          else os.environ.__setitem__("TOKENIZERS_PARALLELISM", tok))
        if self.flair:
            import logging

            flog = logging.getLogger("flair")
            flevel = flog.level
            flog.setLevel(logging.WARNING)
            self._undo.append(lambda: flog.setLevel(flevel))
        if self.rng:
            import torch

            fork = torch.random.fork_rng(devices=[])
            fork.__enter__()
            self._undo.append(lambda: fork.__exit__(None, None, None))
        return self

    def __exit__(self, *exc: object) -> None:
        while self._undo:
            self._undo.pop()()
