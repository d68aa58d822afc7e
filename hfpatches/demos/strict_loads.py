"""Demo: a checkpoint with PEFT names loads into ``BertModel`` as random weights, silently; with
``strict_loads`` the same load raises ``LoadError`` carrying the ``LoadReport``.

Real model: all-MiniLM-L6-v2. Also the tiny-checkpoint writers the tests use (real transformers
classes, tiny configs), so tests and demo build their fixtures the same way.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

PID = "strict_loads"


# ----------------------------------------------------------------------------- tiny checkpoints
def tiny_bert_config(**over):
    """A fresh tiny ``BertConfig`` (a new object each call: ``resize_token_embeddings`` mutates it)."""
    from transformers import BertConfig

    kw = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
              max_position_embeddings=64)
    return BertConfig(**{**kw, **over})


def tiny_llama_config(**over):
    from transformers import LlamaConfig

    kw = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True)
    return LlamaConfig(**{**kw, **over})


def write_checkpoints(root: str) -> dict[str, str]:
    """Generated checkpoints (directories with config.json + weights) under ``root``:

    ``pretraining``  BertForPreTraining (``bert.`` prefix + ``cls.`` heads)
    ``resized``      BertForMaskedLM with vocab 104 (config: 99) and a 128-row position table (64)
    ``bf16``         BertModel saved in bfloat16
    ``llama``        LlamaForCausalLM with tied embeddings (no ``lm_head.weight`` in the file)
    ``peft``         BertModel under LoRA (r=4, query/value): the full PEFT state dict + the config
    """
    import torch
    import transformers
    from safetensors.torch import save_file

    tf: Any = transformers  # the classes are typed as untyped lazy attributes in some releases
    BertForMaskedLM, BertForPreTraining, BertModel, LlamaForCausalLM = (
        tf.BertForMaskedLM, tf.BertForPreTraining, tf.BertModel, tf.LlamaForCausalLM)

    from hfpatches._quiet import Quiet as _Quiet

    out = {k: os.path.join(root, k) for k in ("pretraining", "resized", "bf16", "llama", "peft")}
    with torch.random.fork_rng(devices=[]), _Quiet():
        torch.manual_seed(0)
        BertForPreTraining(tiny_bert_config()).save_pretrained(out["pretraining"])
        BertForMaskedLM(tiny_bert_config(vocab_size=104, max_position_embeddings=128)).save_pretrained(out["resized"])
        BertModel(tiny_bert_config()).to(torch.bfloat16).save_pretrained(out["bf16"])
        LlamaForCausalLM(tiny_llama_config()).save_pretrained(out["llama"])
        cfg = tiny_bert_config()
        sd = lora_state_dict(BertModel(cfg))
        cfg.save_pretrained(out["peft"])
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out["peft"], "model.safetensors"),
                  metadata={"format": "pt"})
    return out


def lora_state_dict(model) -> dict:
    """The full state dict of ``model`` wrapped by peft LoRA (r=4 on query/value): PEFT names."""
    import warnings

    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():  # peft 0.21 on transformers 5.x: a FutureWarning of theirs
        warnings.simplefilter("ignore", FutureWarning)
        return dict(get_peft_model(model, LoraConfig(r=4, target_modules=["query", "value"])).state_dict())


# ----------------------------------------------------------------------------- demo
def _embed(model, batch):
    import torch

    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def run(say) -> bool:
    from hfpatches._quiet import Quiet as _Quiet

    with _Quiet():  # transformers' own "newly initialized" warnings and progress bars, restored after
        return _run(say)


def _run(say) -> bool:
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification, BertModel

    import hfpatches
    from hfpatches._models import SENTENCES, minilm_dir
    from hfpatches.errors import LoadError

    hfpatches.revert([PID])  # the "before" half must run unpatched even if the environment switched it on
    src = minilm_dir()
    tok = AutoTokenizer.from_pretrained(src)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    ref = _embed(BertModel.from_pretrained(src).eval(), batch)
    with tempfile.TemporaryDirectory(prefix="hfpatches-demo-strict-") as tmp:
        # the usual mistake: model.state_dict() of the PeftModel saved as a plain checkpoint
        say("writing all-MiniLM-L6-v2 under LoRA (r=4, query/value) as a plain checkpoint: PEFT names ...")
        sd = lora_state_dict(BertModel.from_pretrained(src))
        from safetensors.torch import save_file

        BertModel.from_pretrained(src).config.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        model, info = BertModel.from_pretrained(tmp, output_loading_info=True)
        cos = (_embed(model.eval(), batch) * ref).sum(-1)
        total = len(model.state_dict())
        say(f"unpatched: BertModel.from_pretrained(<PEFT-named checkpoint>) returned a model; "
            f"{len(info['missing_keys'])} of {total} weights missing (only a logged warning)")
        say(f"  sentence-embedding cosine vs the real model: min {cos.min():.3f}, mean {cos.mean():.3f} "
            "(random weights; 1.000 would be right)")
        silent = len(info["missing_keys"]) > 0

        with hfpatches.patched(PID) as rep:
            r = rep[PID]
            say(f"patched: {PID} {r.outcome.value} ({r.reason})")
            if r.outcome not in (hfpatches.Outcome.APPLIED, hfpatches.Outcome.ALREADY_APPLIED):
                say("  the fix is not live here; the scenario above is what you get")
                return r.outcome == hfpatches.Outcome.NOT_AFFECTED and not silent
            raised = None
            try:
                BertModel.from_pretrained(tmp)
            except LoadError as e:
                raised = e
            if raised is None:
                say("  from_pretrained still returned random weights: FIX DID NOT VERIFY")
                return False
            counts = ", ".join(f"{k} {n}" for k, n in raised.report.counts.items())
            say(f"  BertModel.from_pretrained(<PEFT-named checkpoint>) -> LoadError: {raised.report.verdict()}")
            say(f"  its report: {counts}")
            peft_fix = next((e.fix for e in raised.report.entries if e.kind == "peft-wrapped"), None)
            if peft_fix:
                say(f"  fix it names: {peft_fix}")
            # what must keep working: the real checkpoint, and a new head on it
            same = _embed(BertModel.from_pretrained(src).eval(), batch)
            delta = (same - ref).abs().max().item()
            head = BertForSequenceClassification.from_pretrained(src, num_labels=3)
            say(f"  BertModel.from_pretrained(all-MiniLM-L6-v2) still loads (max |delta| vs unpatched {delta:.1e}); "
                f"BertForSequenceClassification loads with its new head ({head.classifier.weight.shape[0]} labels)")
        from hfpatches.loading import explain_load

        with torch.device("meta"):
            meta = BertModel(model.config)
        rep2 = explain_load(meta, tmp)
        say(f"explain_load before loading (header only, model on the meta device): {rep2.verdict()}")
        return delta == 0.0 and silent
