"""Demo: flash-attn BERT ``from_pretrained`` on real all-MiniLM-L6-v2, before and after the patch.

Also the shared helpers (config, batch, forward, checkpoint writers) that the tests, GPU tests and
the benchmark use, so every one of them measures the same thing the same way.
"""
from __future__ import annotations

import os
import tempfile

PID = "flash_attn_bert_prefix"
TOL = 5e-5      # fp32 bound on max |delta| of the last hidden state vs transformers (issue acceptance)
FLASH_OFF = dict(use_flash_attn=False, fused_bias_fc=False, fused_mlp=False, fused_dropout_add_ln=False)


def flash_config(model_dir: str, **overrides):
    """transformers ``BertConfig`` of ``model_dir`` with flash-attn's CUDA-only features off
    (override e.g. ``use_flash_attn=True`` on a GPU)."""
    from transformers import BertConfig

    cfg = BertConfig.from_pretrained(model_dir)
    for k, v in {**FLASH_OFF, **overrides}.items():  # from_pretrained(**kw) drops keys it does not know
        setattr(cfg, k, v)
    if getattr(cfg, "position_embedding_type", None) is None:  # transformers 5.x no longer sets it
        cfg.position_embedding_type = "absolute"
    return cfg


def batch(model_dir: str, device="cpu"):
    """Real tokenized sentences with padding (``hfpatches._models.SENTENCES``)."""
    from transformers import AutoTokenizer

    from .._models import SENTENCES

    tok = AutoTokenizer.from_pretrained(model_dir)
    return {k: v.to(device) for k, v in tok(SENTENCES, padding=True, return_tensors="pt").items()}


def flash_hidden(model, b):
    """Last hidden state of a flash-attn ``BertModel`` (or of the ``.bert`` of a task model)."""
    import torch

    bert = getattr(model, "bert", model)
    with torch.no_grad():
        return bert(b["input_ids"], token_type_ids=b["token_type_ids"],
                    attention_mask=b["attention_mask"].bool()).last_hidden_state


def flash_mlm_logits(model, b):
    import torch

    with torch.no_grad():
        return model(b["input_ids"], token_type_ids=b["token_type_ids"],
                     attention_mask=b["attention_mask"]).prediction_logits


def hf_outputs(model_dir: str, b, *, pretraining: bool = False, dtype=None, device="cpu"):
    """transformers' reference: (last hidden state, MLM logits or None)."""
    import torch
    import transformers

    kw = {"torch_dtype": dtype} if dtype is not None else {}
    cls = transformers.BertForPreTraining if pretraining else transformers.BertModel
    model = cls.from_pretrained(model_dir, **kw).to(device).eval()
    with torch.no_grad():
        if pretraining:
            out = model(**b, output_hidden_states=True)
            return out.hidden_states[-1], out.prediction_logits
        return model(**b).last_hidden_state, None


def max_delta(a, b, mask) -> float:
    """max |a - b| over the non-padded positions."""
    m = mask.bool()
    return (a.float() - b.float())[m].abs().max().item()


def write_pretraining_checkpoint(src_dir: str, out_dir: str, *, fmt: str = "safetensors", shards: int = 1,
                                 seed: int = 0) -> str:
    """A ``bert.``-prefixed checkpoint: transformers' ``BertForPreTraining`` with ``src_dir``'s
    backbone and seeded heads. ``fmt``: ``"safetensors"`` (``save_pretrained``, sharded by size
    when ``shards > 1``), ``"bin"`` (``pytorch_model.bin``; ``shards > 1``: shards + index), or
    ``"legacy_bin"`` (a ``.bin`` with ``LayerNorm.gamma``/``beta`` keys)."""
    import json

    import torch
    import transformers

    torch.manual_seed(seed)
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "newly initialized: cls.*" is the point here
    try:
        model = transformers.BertForPreTraining.from_pretrained(src_dir)
    finally:
        transformers.logging.set_verbosity(level)
    if fmt == "safetensors":
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        kw = {"max_shard_size": f"{total // shards // 2**20 + 1}MB"} if shards > 1 else {}
        model.save_pretrained(out_dir, safe_serialization=True, **kw)
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    model.config.save_pretrained(out_dir)
    sd = {}
    for k, v in model.state_dict().items():
        if fmt == "legacy_bin" and k.endswith(("LayerNorm.weight", "LayerNorm.bias")):
            k = k[: -len("weight")] + "gamma" if k.endswith("weight") else k[: -len("bias")] + "beta"
        sd[k] = v.detach().clone()
    keys = list(sd)
    names = ["pytorch_model.bin"] if shards == 1 else \
        [f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin" for i in range(shards)]
    weight_map = {}
    for i, name in enumerate(names):
        part = {k: sd[k] for k in keys[i::shards]}
        weight_map.update(dict.fromkeys(part, name))
        torch.save(part, os.path.join(out_dir, name + ".tmp"))
        os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
    if shards > 1:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
                 "weight_map": weight_map}
        with open(os.path.join(out_dir, "pytorch_model.bin.index.json"), "w") as f:
            json.dump(index, f)
    return out_dir


def _load(fb_cls, path, cfg):
    """(model, None) or (None, 'ErrorType: message')."""
    try:
        return fb_cls.from_pretrained(path, cfg).eval(), None
    except Exception as e:  # the demo shows whatever the installed code does
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:140]}"


def run(say) -> bool:
    import hfpatches

    try:
        import flash_attn.models.bert as fb
    except Exception as e:  # ImportError without CUDA, or its AssertionError from the Triton LayerNorm
        say(f"flash_attn.models.bert does not import here ({type(e).__name__}: {e}); nothing to show")
        return True
    from .._models import minilm_dir

    src = minilm_dir()
    cfg = flash_config(src)
    b = batch(src)
    mask = b["attention_mask"]
    say("reference: transformers BertModel on all-MiniLM-L6-v2 (unprefixed checkpoint), "
        f"{mask.shape[0]} padded sentences, fp32")
    ref_hidden, _ = hf_outputs(src, b)
    with tempfile.TemporaryDirectory(prefix="hfpatches-demo-") as tmp:
        say("writing a bert.-prefixed checkpoint (transformers BertForPreTraining.save_pretrained) ...")
        pre = write_pretraining_checkpoint(src, os.path.join(tmp, "pretraining"))
        pre_hidden, pre_logits = hf_outputs(pre, b, pretraining=True)

        def hidden_vs(ref):
            return lambda m: (max_delta(flash_hidden(m, b), ref, mask), "")

        def prefixed_twice(m):
            h1 = flash_hidden(m, b)
            h2 = flash_hidden(_load(fb.BertModel, pre, cfg)[0], b)
            same = bool((h1 == h2).all())
            return max_delta(h1, pre_hidden, mask), f"; two loads {'bit-identical' if same else 'DIFFER (random weights)'}"

        cases = [
            ("BertModel.from_pretrained(all-MiniLM-L6-v2)", fb.BertModel, src, hidden_vs(ref_hidden)),
            ("BertModel.from_pretrained(bert.-prefixed)", fb.BertModel, pre, prefixed_twice),
            ("BertForPreTraining.from_pretrained(bert.-prefixed), MLM logits", fb.BertForPreTraining, pre,
             lambda m: (max_delta(flash_mlm_logits(m, b), pre_logits, mask), "")),
        ]

        def show(tag) -> list[float]:
            deltas = []
            for label, cls, path, measure in cases:
                m, err = _load(cls, path, cfg)
                if err:
                    say(f"{tag} {label}: {err}")
                    deltas.append(float("inf"))
                    continue
                d, extra = measure(m)
                deltas.append(d)
                say(f"{tag} {label}: max |delta| vs HF = {d:.2e}{extra}")
            return deltas

        hfpatches.revert([PID])  # unpatched, whatever ran before
        show("unpatched:")
        with hfpatches.patched(PID) as rep:
            res = rep[PID]
            if res.outcome.value != "APPLIED":
                say(f"patch outcome on this stack: {res.outcome.value} ({res.reason})")
                ok = res.outcome.value in ("NOT_AFFECTED", "NOT_INSTALLED")
                if ok:
                    deltas = show("unpatched (not affected):")
                    ok = max(deltas) <= TOL
                return ok
            say(f"patch: {res.outcome.value} ({res.reason})")
            deltas = show("patched:  ")
    ok = max(deltas) <= TOL
    say(f"patched max |delta| {max(deltas):.2e} (bound {TOL:.0e}): {'fixed' if ok else 'NOT FIXED'}")
    return ok
