"""Implementation of ``peft_merge_untie`` (declared in ``__init__.py``; rationale in
docs/patches/peft_merge_untie.md)."""
from __future__ import annotations

import sys
import warnings
from typing import Any

from hfpatches._declare import ProbeResult

from . import PATCH

PATCH_ID = PATCH.id
MODULE = "peft.tuners.tuners_utils"
METHOD = "_unload_and_optionally_merge"
QUIET = "_hfpatches_quiet_untie"     # set on the probe's own model: untie without the warning
WARNING = ("hfpatches peft_merge_untie: after merging, the input and output embeddings are different "
           "tensors with different values (a trained modules_to_save copy), but the config said "
           "tie_word_embeddings=True; set it to False{where} so that save_pretrained/from_pretrained "
           "keep both (as peft>=0.19 does, huggingface/peft#3126).")


def tuner_classes(base: Any) -> list[Any]:
    """``base`` and its subclasses (recursively) that define ``_unload_and_optionally_merge`` themselves."""
    seen: list[Any] = []
    todo = [base]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return [c for c in seen if METHOD in vars(c)]


def tied_configs(config: Any) -> list[Any]:
    """The config objects that say ``tie_word_embeddings=True``: the config itself and the text
    sub-config ``get_text_config(decoder=True)`` reads (what transformers' ``tie_weights`` reads)."""
    found: list[Any] = []
    candidates = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            candidates.append(get_text(decoder=True))
        except TypeError:
            candidates.append(get_text())
    for c in candidates:
        if c is not None and getattr(c, "tie_word_embeddings", False) is True and all(c is not f for f in found):
            found.append(c)
    return found


def diverged(model: Any) -> bool:
    """Input and output embedding weights are different tensors with different values."""
    import torch

    try:
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    ow, iw = getattr(out_emb, "weight", None), getattr(in_emb, "weight", None)
    if not isinstance(ow, torch.Tensor) or not isinstance(iw, torch.Tensor):
        return False
    if ow is iw or (ow.device == iw.device and ow.data_ptr() == iw.data_ptr() and ow.shape == iw.shape):
        return False      # still tied: one tensor
    if ow.shape != iw.shape or ow.device != iw.device or ow.dtype != iw.dtype:
        return True
    with torch.no_grad():
        return not torch.equal(ow, iw)


def untie_after_merge(model: Any, log: Any) -> list[str]:
    """Untie ``model``'s config(s) when its embeddings diverged; return the configs changed."""
    config = getattr(model, "config", None)
    configs = tied_configs(config) if config is not None else []
    if not configs or not diverged(model):
        return []
    names = []
    for c in configs:
        c.tie_word_embeddings = False
        names.append("config" if c is config else f"text config ({type(c).__name__})")
    where = f" ({' and '.join(names)})" if len(names) > 1 else ""
    log.info("%s: %s untied after merge_and_unload (embeddings diverged)", PATCH_ID, ", ".join(names))
    if not getattr(model, QUIET, False):
        warnings.warn(WARNING.format(where=where), UserWarning, stacklevel=4)
    return names


def _make_wrapper(cls: Any, log: Any) -> Any:
    import inspect

    sig = inspect.signature(vars(cls)[METHOD])
    merge_default = sig.parameters["merge"].default if "merge" in sig.parameters else True

    def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        result = wrapped(*args, **kwargs)
        try:
            merge = sig.bind(instance, *args, **kwargs).arguments.get("merge", merge_default)
        except TypeError:
            merge = merge_default
        if merge:
            untie_after_merge(result if hasattr(result, "get_input_embeddings") else instance.model, log)
        return result

    return wrapper


def _base(ctx: Any) -> Any:
    return ctx.module(MODULE).BaseTuner


def apply(ctx: Any) -> None:
    for cls in tuner_classes(_base(ctx)):
        ctx.wrap(cls, METHOD, _make_wrapper(cls, ctx.log))


def check(ctx: Any) -> str | None:
    import inspect

    base = _base(ctx)
    classes = tuner_classes(base)
    if not classes:
        return f"no tuner class defines {METHOD} (peft restructured merging)"
    lora = [c for c in classes if c.__name__ == "LoraModel"] or [c for c in classes if c is base]
    if not lora:
        return f"neither LoraModel nor BaseTuner defines {METHOD}"
    params = inspect.signature(vars(lora[0])[METHOD]).parameters
    if "merge" not in params:
        return f"{lora[0].__name__}.{METHOD} has no 'merge' parameter ({', '.join(params)})"
    return None


# ----------------------------------------------------------------------------- probe
class _Untied(Exception):
    """Raised by the probe's config watch when peft's own merge unties the config (peft >= 0.19)."""


class _WatchedConfig:
    """The probe's model config during its merge_and_unload: every read goes to the real config;
    peft's own ``tie_word_embeddings = False`` (its fix, huggingface/peft#3126: a UserWarning comes
    right after it) stops the probe's merge with ``_Untied`` there, so the probe says "fixed" without
    that warning, quiet under every warnings filter. This patch's own untie goes through."""

    def __init__(self, real: Any) -> None:
        object.__setattr__(self, "_real", real)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_real"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        caller = sys._getframe(1).f_globals.get("__name__", "?")
        if name == "tie_word_embeddings" and value is False and caller != __name__:
            raise _Untied(caller)
        setattr(object.__getattribute__(self, "_real"), name, value)

    def get_text_config(self, *args: Any, **kwargs: Any) -> Any:
        real = object.__getattribute__(self, "_real")
        text = real.get_text_config(*args, **kwargs)
        return self if text is real else text


def _quiet_model_class(cls: Any) -> Any:
    """``cls``, or where transformers deprecated ``is_gradient_checkpointing`` (a FutureWarning on
    every read, an exception under ``-W error``) in favour of ``is_activation_checkpointing``, a
    subclass of it (for the probe's own model only) whose ``is_gradient_checkpointing`` reads the new
    name: ``PeftModel.__init__`` reads the old one. No warnings filter is touched (process-global)."""
    if not isinstance(getattr(cls, "is_activation_checkpointing", None), property):
        return cls
    return type(cls.__name__, (cls,), {"__module__": __name__, "__doc__": cls.__doc__,
                                       "is_gradient_checkpointing": property(lambda self: self.is_activation_checkpointing)})


def probe(ctx: Any) -> ProbeResult:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from hfpatches._quiet import Quiet

    # No warnings filter is touched (process-global): the model is built untied and tied by hand, it
    # declares no tied keys (an attribute of this instance only) and its config says tied only after
    # get_peft_model, so peft's own "tied layer in the adapter" warnings (0.16-0.18) have nothing to
    # say; the merge is then exactly the user's case.
    with Quiet(rng=True):
        cfg = transformers.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                                       max_position_embeddings=16, tie_word_embeddings=False)
        torch.manual_seed(0)
        model: Any = _quiet_model_class(transformers.LlamaForCausalLM)(cfg)
        model.lm_head.weight = model.model.embed_tokens.weight      # tied, as tie_weights() does
        model._tied_weights_keys = []
        object.__setattr__(model, QUIET, True)
        pm = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
        model.config.tie_word_embeddings = True
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "modules_to_save" in name and name.endswith("lm_head.modules_to_save.default.weight"):
                    p.add_(1.0)            # the "trained" head
        real = model.config
        model.config = _WatchedConfig(real)
        try:
            merged = pm.merge_and_unload()
        except _Untied as e:
            return ProbeResult(False, f"merge_and_unload unties the config itself ({e.args[0]} sets "
                                      f"tie_word_embeddings=False) as the embeddings diverged")
        finally:
            model.config = real
    tied = [type(c).__name__ for c in tied_configs(merged.config)]
    differ = diverged(merged)
    if not differ:
        return ProbeResult(False, "after merge_and_unload the embeddings are still one tensor here")
    if tied:
        return ProbeResult(True, "merge_and_unload left lm_head and embed_tokens different while the config "
                                 "still says tie_word_embeddings=True (a reload re-ties them)")
    return ProbeResult(False, "merge_and_unload untied the config (tie_word_embeddings=False) as the embeddings diverged")
