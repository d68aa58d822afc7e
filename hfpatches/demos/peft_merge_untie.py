"""Demo: PEFT ``merge_and_unload()`` on a model with tied word embeddings and a trained
``lm_head`` (``modules_to_save``): the saved merged model reloads with the *untrained* head without
hfpatches, and reloads exactly with it. Also the scenario the tests and the version lab use."""
from __future__ import annotations

import tempfile
from typing import Any

PID = "peft_merge_untie"


def tiny_tied(seed: int = 0, vocab: int = 64) -> object:
    """A tiny random ``LlamaForCausalLM`` with ``tie_word_embeddings=True`` (built in-process)."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=64, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(cfg)
    return model


def train_and_merge(model, *, save: str = "lm_head", steps: int = 3, merge: str = "merge_and_unload",
                    lr: float = 0.5, seed: int = 0) -> tuple:
    """LoRA on q/v plus ``modules_to_save=[save]`` (None: LoRA only), ``steps`` SGD steps on a
    fixed batch, then ``merge`` ("merge_and_unload" or "unload"). Returns (plain model, input ids)."""
    import torch
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                         modules_to_save=[save] if save else None)
        pm = get_peft_model(model, cfg)
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (2, 8))
        opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=lr)
        pm.train()
        for _ in range(steps):
            opt.zero_grad()
            pm(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    out = getattr(pm, merge)()
    return out.eval(), ids


def save_and_reload(model: Any) -> Any:
    """``save_pretrained`` then ``from_pretrained`` of the same class (safetensors, in a temp dir)."""
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return type(model).from_pretrained(d).eval()


def scenario(*, save: str = "lm_head", merge: str = "merge_and_unload", model=None) -> dict:
    """The whole round trip: max |logits(merged, in memory) - logits(reloaded)|, the config's
    ``tie_word_embeddings`` after the merge and whether the two embeddings still share storage."""
    import torch

    merged, ids = train_and_merge(model if model is not None else tiny_tied(), save=save, merge=merge)
    text = merged.config.get_text_config() if hasattr(merged.config, "get_text_config") else merged.config
    same = merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        before = merged(input_ids=ids).logits
        after = save_and_reload(merged)(input_ids=ids).logits
    return {"diff": float((before - after).abs().max()), "tied": bool(getattr(text, "tie_word_embeddings", None)),
            "same_storage": bool(same), "scale": float(before.abs().max())}


def run(say) -> bool:
    import importlib.util
    import warnings

    import hfpatches

    if importlib.util.find_spec("peft") is None:
        r = hfpatches.apply(only=[PID])[PID]
        say(f"{r.outcome.value}: {r.reason}")
        return True
    import peft  # noqa: F401  (the patch attaches now)

    say("tiny Llama, tie_word_embeddings=True; LoRA on q/v + modules_to_save=['lm_head'], 3 SGD steps, "
        "merge_and_unload(), save_pretrained(), from_pretrained()")
    hfpatches.revert([PID])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = scenario()
    say(f"without hfpatches: config tied={before['tied']}; max |logits(merged) - logits(reloaded)| {before['diff']:.3g}")
    rep = hfpatches.apply(only=[PID])[PID]
    say(f"hfpatches.apply(): {rep.outcome.value} ({rep.reason})")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        after = scenario()
    msgs = {str(w.message)[:100] for w in caught if "tie" in str(w.message)}
    say(f"with hfpatches:    config tied={after['tied']}; max |logits(merged) - logits(reloaded)| {after['diff']:.3g}"
        + (f"; warning: {sorted(msgs)[0]}" if msgs else ""))
    hfpatches.revert([PID])
    ok = after["diff"] <= 1e-5 * max(1.0, after["scale"])
    if rep.outcome.value == "APPLIED":
        return ok and before["diff"] > 1e-2
    return ok
