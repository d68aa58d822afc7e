"""Implementation of ``peft_save_load`` (declared in ``__init__.py``; rationale in docs/patches/peft_save_load.md)."""
from __future__ import annotations

from typing import Any

from hfpatches._declare import ProbeResult
from hfpatches._quiet import Quiet

from . import PATCH

PATCH_ID = PATCH.id
TRANSFORMER, NN_MODEL, TAGGER = PATCH.modules
_COMPUTE = ("predict", "forward_loss")


# ----------------------------------------------------------------------------- wrappers
def _to_params(wrapped, instance, args, kwargs):
    params = wrapped(*args, **kwargs)
    if not isinstance(params, dict):
        return params
    from .flair import MULTI_ADAPTER_KEY, backbone_dtype

    model = getattr(instance, "model", None)
    cfgs = getattr(model, "peft_config", None)
    if isinstance(cfgs, dict) and cfgs and params.get("peft_config") is None and MULTI_ADAPTER_KEY not in params:
        import copy

        names = list(cfgs)
        if names == ["default"]:
            params["peft_config"] = copy.deepcopy(cfgs["default"])
        else:
            active = getattr(model, "active_adapter", names[0])
            active = active[0] if isinstance(active, (list, tuple)) else active
            params[MULTI_ADAPTER_KEY] = {"adapters": {n: copy.deepcopy(c) for n, c in cfgs.items()},
                                         "active": active}
    conf = params.get("config_state_dict")
    if isinstance(conf, dict) and model is not None:
        dtype = backbone_dtype(model)
        if dtype is not None:
            name = str(dtype).rpartition(".")[2]
            keys = [k for k in ("torch_dtype", "dtype") if k in conf] or ["torch_dtype"]
            for k in keys:
                conf[k] = name
    return params


def _from_params(wrapped, cls, args, kwargs):
    from .flair import MULTI_ADAPTER_KEY

    params = args[0] if args else kwargs.get("params")
    extra = params.pop(MULTI_ADAPTER_KEY, None) if isinstance(params, dict) else None
    emb = wrapped(*args, **kwargs)
    if extra:
        import copy

        from peft import get_peft_model

        adapters = extra["adapters"]
        names = list(adapters)
        pm = get_peft_model(emb.model, copy.deepcopy(adapters[names[0]]), adapter_name=names[0])
        for n in names[1:]:
            pm.add_adapter(n, copy.deepcopy(adapters[n]))
        pm.set_adapter(extra.get("active", names[0]))
        emb.model = pm
    return emb


def _save(wrapped, instance, args, kwargs):
    from .flair import atomic_save

    args = list(args)
    target = args.pop(0) if args else kwargs.pop("model_file")
    atomic_save(target, lambda tmp: wrapped(tmp, *args, **kwargs))


def _load(wrapped, cls, args, kwargs):
    import os

    from hfpatches.errors import CheckpointError

    from .flair import _STATE_DICT_ERROR, FileCheck, check_state, legacy_message, loading_file, state_dict_error, unify_dtype

    src = args[0] if args else kwargs.get("model_path")
    check = None
    if isinstance(src, (str, os.PathLike)) and os.path.isfile(src):
        check = FileCheck(src)
        if check.info.legacy_peft:
            raise CheckpointError(legacy_message(check.path, check.info))
        check.start()  # the CRC-32 pass runs beside flair's load; waited for before returning
    elif isinstance(src, dict):
        check_state(src)
    try:
        if check is not None:
            with loading_file(check.path):
                model = wrapped(*args, **kwargs)
        else:
            model = wrapped(*args, **kwargs)
    except BaseException as e:
        if check is not None:
            check.result()  # a damaged file explains the failure better than what it caused
        if isinstance(e, RuntimeError) and _STATE_DICT_ERROR in str(e):
            raise state_dict_error(check.path if check else None, e) from e
        raise
    if check is not None:
        check.result()  # a model built from a file that fails its CRC is never returned
    unify_dtype(model)
    return model


def _unified(wrapped, instance, args, kwargs):
    from .flair import unify_dtype

    unify_dtype(instance)
    return wrapped(*args, **kwargs)


def _fill_mean(wrapped, instance, args, kwargs):
    """Mean sub-token pooling in float32 when the inputs are not float32; result in their dtype."""
    import torch

    names = ("all_token_embeddings", "sentence_hidden_states", "word_ids", "token_lengths")
    bound = dict(zip(names, args), **kwargs)
    emb, hidden = bound["all_token_embeddings"], bound["sentence_hidden_states"]
    if emb.dtype == torch.float32 and hidden.dtype == torch.float32:
        return wrapped(*args, **kwargs)
    out = wrapped(emb.float(), hidden.float(), bound["word_ids"], bound["token_lengths"])
    return out.to(emb.dtype)


def _compute_owners(nn_model):
    """flair's model classes that define their own predict / forward_loss (abstract ones skipped)."""
    from .flair import model_classes

    out = []
    for c in model_classes(nn_model.Model):
        if not c.__module__.startswith("flair."):
            continue
        for name in _COMPUTE:
            fn = vars(c).get(name)
            if fn is not None and not getattr(fn, "__isabstractmethod__", False):
                out.append((c, name))
    return sorted(out, key=lambda cn: (cn[0].__module__, cn[0].__qualname__, cn[1]))


def apply(ctx: Any) -> None:
    tr = ctx.module(TRANSFORMER)
    nn_model = ctx.module(NN_MODEL)
    ctx.wrap(tr.TransformerEmbeddings, "to_params", _to_params)
    ctx.wrap(tr.TransformerEmbeddings, "from_params", _from_params)
    ctx.wrap(tr, "fill_mean_token_embeddings", _fill_mean)
    ctx.wrap(nn_model.Model, "save", _save)
    ctx.wrap(nn_model.Model, "load", _load)
    for owner, name in _compute_owners(nn_model):
        ctx.wrap(owner, name, _unified)


# ----------------------------------------------------------------------------- probe
_TINY: dict = {}
_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c", "good", "bad", "film", "##s"]


def _tiny_embedding():
    """The probe's tiny bf16 LoRA document embedding (built once per process)."""
    if "emb" in _TINY:
        return _TINY["emb"]
    import importlib.util
    import os
    import tempfile

    import torch
    from flair.embeddings import TransformerDocumentEmbeddings
    from transformers import BertConfig, BertModel, BertTokenizerFast

    has_peft = importlib.util.find_spec("peft") is not None
    with tempfile.TemporaryDirectory(prefix="hfpatches-flair-probe-") as d:
        vocab = os.path.join(d, "vocab.txt")
        with open(vocab, "w") as fh:
            fh.write("\n".join(_VOCAB) + "\n")
        BertTokenizerFast(vocab_file=vocab).save_pretrained(d)
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=len(_VOCAB), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=8, max_position_embeddings=16)
        BertModel(cfg).save_pretrained(d)
        kw = {}
        if has_peft:
            from peft import LoraConfig

            kw["peft_config"] = LoraConfig(r=2, lora_alpha=4, target_modules=["query"])
        emb = TransformerDocumentEmbeddings(d, fine_tune=True, transformers_model_kwargs={"torch_dtype": torch.bfloat16},
                                            **kw)
    _TINY["emb"], _TINY["peft"] = emb, has_peft
    return emb


def probe(ctx: Any) -> ProbeResult:
    import sys

    import torch
    from flair.data import Dictionary, Sentence
    from flair.models import TextClassifier

    found, fixed = [], []
    with Quiet(flair=True, rng=True):
        emb = _tiny_embedding()
        if _TINY["peft"]:
            params = emb.to_params()
            if params.get("peft_config") is None and params.get("hfpatches_peft") is None:
                found.append("to_params() drops the PEFT config (#3623)")
            else:
                fixed.append("to_params() carries the PEFT config")
        labels = Dictionary(add_unk=False)
        for v in ("good", "bad"):
            labels.add_item(v)
        clf = TextClassifier(emb, label_dictionary=labels, label_type="probe")
        object.__setattr__(clf, "_hfpatches_dtype_policy", "backbone")  # the probe ignores the env switch
        try:
            clf.predict(Sentence("a good film"))
            fixed.append("bf16 predict works")
        except RuntimeError as e:
            if "dtype" not in str(e):
                raise
            found.append(f"bf16 predict fails ({str(e).splitlines()[0][:80]})")
        fill = sys.modules[TRANSFORMER].fill_mean_token_embeddings
        hidden = torch.arange(12, dtype=torch.bfloat16).reshape(1, 3, 4)
        try:
            out = fill(torch.zeros(1, 2, 4, dtype=torch.bfloat16), hidden, torch.tensor([[0, 0, 1]]),
                       torch.tensor([2]))
        except RuntimeError as e:
            found.append(f"bf16 mean pooling fails ({str(e).splitlines()[0][:60]})")
        else:
            want = torch.stack([hidden[0, :2].float().mean(0), hidden[0, 2].float()]).to(torch.bfloat16)
            if out.dtype != torch.bfloat16 or not torch.equal(out[0], want):
                found.append("bf16 mean pooling gives wrong values")
            else:
                fixed.append("bf16 mean pooling works")
    if found:
        return ProbeResult(True, "; ".join(found))
    return ProbeResult(False, "; ".join(fixed))
