"""``hfpatches.flair``: the flair helpers of the ``peft_save_load`` patch (``load``,
``unify_dtype``, ...). They live in ``hfpatches/patches/peft_save_load/flair.py``; this name
stays importable and is that very module."""
import sys

from hfpatches.patches.peft_save_load import flair as _flair

sys.modules[__name__] = _flair
