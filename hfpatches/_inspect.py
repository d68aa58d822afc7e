"""``python -m hfpatches inspect CHECKPOINT [--model dotted.Class] [--config DIR] [--json] [--debug]``:
exit codes 0 fine, 1 the load would leave backbone weights missing or misshaped (``--model``), 2 bad
input (one line on stderr naming the file; traceback with --debug)."""
from __future__ import annotations

import json
import os
import sys

from . import _bert_checkpoint as bc
from ._checkpoint import _one_line, read_checkpoint
from ._summary import render_summary, summarize
from .errors import CheckpointError
from .loading import explain_load


class _UsageError(ValueError):
    pass


def build_meta_model(class_path: str, config_dir: str):
    """``class_path`` (``transformers.BertModel``, ``BertModel``, ``transformers.AutoModelForCausalLM``)
    built from ``config_dir``'s config on the meta device: no memory for weights."""
    import importlib


    mod_name, _, cls_name = class_path.rpartition(".")
    try:
        module = importlib.import_module(mod_name or "transformers")
        cls = getattr(module, cls_name)
    except (ImportError, AttributeError) as e:
        raise _UsageError(f"--model {class_path}: cannot import it ({_one_line(e)}); give a dotted class name "
                          "such as transformers.BertModel") from e
    if not _is_model_class(cls):
        raise _UsageError(f"--model {class_path}: is {_describe(cls)}, not a model class; expected a torch.nn.Module "
                          "subclass or a transformers Auto class, such as transformers.BertModel (nothing was called)")
    if not os.path.isfile(os.path.join(config_dir, "config.json")):
        raise _UsageError(f"{config_dir}: no config.json to build {cls_name} from; pass --config DIR")
    from transformers import AutoConfig

    cfg_cls = getattr(cls, "config_class", None)
    if bc.is_flash_bert(cls):   # flash-attn's BERT classes take a transformers BertConfig (and check it)
        from transformers import BertConfig as cfg_cls
    try:
        if cfg_cls is not None and hasattr(cfg_cls, "from_pretrained") and getattr(cfg_cls, "model_type", None):
            config = cfg_cls.from_pretrained(config_dir)   # what cls.from_pretrained would use
        else:
            config = AutoConfig.from_pretrained(config_dir)
    except Exception as e:
        raise _UsageError(f"{os.path.join(config_dir, 'config.json')}: cannot build a config ({_one_line(e)})") from e
    if bc.is_flash_bert(cls) and getattr(config, "position_embedding_type", None) is None:
        config.position_embedding_type = "absolute"   # transformers 5 dropped the field (BERT is absolute only)
    from ._meta_build import meta_build

    with meta_build():   # this thread only: torch.device("meta") would set a process global
        if hasattr(cls, "from_config") and not hasattr(cls, "base_model_prefix"):  # Auto* classes
            return cls.from_config(config)
        return cls(config)


def _is_model_class(obj) -> bool:
    """An ``nn.Module`` subclass, or a transformers Auto class (``AutoModel``...): the only things
    ``--model`` may name. Anything else (``os.system``) is never called."""
    if not isinstance(obj, type):
        return False
    import torch

    if issubclass(obj, torch.nn.Module):
        return True
    try:
        from transformers.models.auto.auto_factory import _BaseAutoModelClass
    except ImportError:  # pragma: no cover - transformers moved it
        return False
    return issubclass(obj, _BaseAutoModelClass)


def _describe(obj) -> str:
    kind = type(obj).__name__
    return f"a {kind}" if not isinstance(obj, type) else f"the class {obj.__module__}.{obj.__qualname__}"


def _config_dir(checkpoint: str) -> str:
    return checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))


def inspect_main(args) -> int:
    """``python -m hfpatches inspect``: see the module docstring for the exit codes."""
    debug = bool(getattr(args, "debug", False))
    try:
        if getattr(args, "model", None):
            ck = read_checkpoint(args.checkpoint)
            model = build_meta_model(args.model, getattr(args, "config", None) or _config_dir(args.checkpoint))
            report = explain_load(model, ck)
            print(report.to_json() if args.json else report)
            return 0 if report.ok else 1
        s = summarize(args.checkpoint)
        print(json.dumps(s, indent=2) if args.json else render_summary(s))
        return 0
    except Exception as e:  # noqa: BLE001 - every failure is one line unless --debug
        if debug:
            import traceback

            traceback.print_exc()
        msg = _one_line(e) if isinstance(e, (CheckpointError, _UsageError)) else f"{type(e).__name__}: {_one_line(e)}"
        print(f"hfpatches inspect: error: {msg}" + ("" if debug else " (--debug shows the traceback)"), file=sys.stderr)
        return 2
