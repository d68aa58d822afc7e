"""Demo: meta-device init -> ``to_empty`` -> ``load_state_dict`` on real SmolLM2-135M and
all-MiniLM-L6-v2, without the patch (wrong loss / IndexError) and with it (bit-identical).

Also the shared helpers (batches, the meta round trip, the references) that the tests, GPU tests
and the benchmark use, so they all measure the same scenario the same way.
"""
from __future__ import annotations

import os

PID = "meta_buffers"


# ----------------------------------------------------------------------------- helpers
def dtype_kw(dtype) -> dict:
    """``from_pretrained``/``from_config`` dtype keyword for the installed transformers."""
    if dtype is None:
        return {}
    import transformers

    return {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": dtype}


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def safetensors_state_dict(model_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, "model.safetensors"))


def lm_batch(model_dir: str, device="cpu"):
    """(batch, labels): ``hfpatches._models.SENTENCES`` tokenized with padding; pads ignored."""
    from transformers import AutoTokenizer

    from .._models import SENTENCES

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    b = {k: v.to(device) for k, v in tok(SENTENCES, padding=True, return_tensors="pt").items()}
    return b, b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)


def bert_batch(model_dir: str, device="cpu"):
    from transformers import AutoTokenizer

    from .._models import SENTENCES

    tok = AutoTokenizer.from_pretrained(model_dir)
    return {k: v.to(device) for k, v in tok(SENTENCES, padding=True, return_tensors="pt").items()}


def lm_outputs(model, batch, labels):
    """(loss as float, logits) of a causal LM."""
    import torch

    with torch.no_grad():
        out = model(**batch, labels=labels)
    return out.loss.item(), out.logits


def bert_hidden(model, batch):
    import torch

    with torch.no_grad():
        return model(**batch).last_hidden_state


def meta_round_trip(build, state_dict, *, device="cpu", include_buffers=False, per_module=False):
    """The scenario: ``build()`` under ``accelerate.init_empty_weights(include_buffers=...)``,
    ``to_empty(device)`` (whole model, or FSDP-style per module with ``recurse=False`` in module
    order), ``tie_weights()``, ``load_state_dict(state_dict, strict=False)``. Returns
    ``(model in eval mode, load result)``."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=include_buffers):
        model = build()
    if per_module:
        for m in list(model.modules()):
            m.to_empty(device=device, recurse=False)
    else:
        model.to_empty(device=device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    res = model.load_state_dict(state_dict, strict=False)
    return model.eval(), res


class nan_for_uninitialised:
    """Context manager, torch's own switch (deterministic mode + ``fill_uninitialized_memory``):
    ``empty_like`` fills NaN / the largest integer, so memory nobody initialised is recognisable
    and can never pass for the right values by chance (a freed block of an earlier model could
    hold exactly them). Used by the tests; the demo shows real uninitialised memory."""

    def __enter__(self):
        import torch

        det = torch.utils.deterministic
        self._prev = (torch.are_deterministic_algorithms_enabled(),
                      torch.is_deterministic_algorithms_warn_only_enabled(), det.fill_uninitialized_memory)
        torch.use_deterministic_algorithms(True, warn_only=True)
        det.fill_uninitialized_memory = True
        return self

    def __exit__(self, *exc):
        import torch

        torch.use_deterministic_algorithms(self._prev[0], warn_only=self._prev[1])
        torch.utils.deterministic.fill_uninitialized_memory = self._prev[2]
        return None


def smollm2_case(model_dir: str, *, device="cpu", dtype=None):
    """(reference from ``from_pretrained``, state dict, build function) for SmolLM2-135M."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dtype_kw(dtype)
    if device != "cpu":
        kw["device_map"] = device
    ref = AutoModelForCausalLM.from_pretrained(model_dir, **kw).eval()
    sd = safetensors_state_dict(model_dir)
    cfg = AutoConfig.from_pretrained(model_dir)

    def build():
        return AutoModelForCausalLM.from_config(cfg, **dtype_kw(dtype or torch.float32))

    return ref, sd, build


def minilm_case(model_dir: str, *, device="cpu", dtype=None):
    """(reference ``BertModel.from_pretrained``, state dict, build function) for all-MiniLM-L6-v2."""
    from transformers import AutoConfig, BertModel

    kw = dtype_kw(dtype)
    if device != "cpu":
        kw["device_map"] = device
    ref = BertModel.from_pretrained(model_dir, **kw).eval()
    cfg = AutoConfig.from_pretrained(model_dir)

    def build():
        m = BertModel(cfg)
        return m if dtype is None else m.to(dtype)

    return ref, safetensors_state_dict(model_dir), build


def max_abs(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# ----------------------------------------------------------------------------- demo
def run(say) -> bool:
    import contextlib

    import torch

    import hfpatches

    from .._models import minilm_dir, smollm2_dir

    ok = True
    say("SmolLM2-135M, real weights: from_pretrained vs init_empty_weights -> to_empty('cpu') -> load_state_dict")
    say("(dequantized fp32 copy; loading takes a few seconds)")
    try:
        d = smollm2_dir()
    except Exception as e:  # a set-up problem (no gguf, no cache): say it, go on with BERT
        say(f"SmolLM2-135M unavailable here ({type(e).__name__}: {str(e)[:120]}); skipping it")
        d = None
    if d is not None:
        ref, sd, build = smollm2_case(d)
        batch, labels = lm_batch(d)
        want_loss, want = lm_outputs(ref, batch, labels)
        say(f"from_pretrained: loss {want_loss:.6f}")
        for include in (False, True):
            model, _ = meta_round_trip(build, sd, include_buffers=include)
            loss, got = lm_outputs(model, batch, labels)
            say(f"  unpatched, include_buffers={include!s:<5}: loss {loss:.6f}  max|d logits| {max_abs(got, want):.3g}"
                f"  (rotary inv_freq {'kept' if torch.equal(_inv_freq(model), _inv_freq(ref)) else 'uninitialised'})")
        with hfpatches.patched(PID) as rep:
            r = rep[PID]
            say(f"patch: {r.outcome.value} ({r.reason})")
            live = r.outcome in (hfpatches.Outcome.APPLIED, hfpatches.Outcome.ALREADY_APPLIED)
            for include in (False, True):
                model, _ = meta_round_trip(build, sd, include_buffers=include)
                loss, got = lm_outputs(model, batch, labels)
                same = torch.equal(got, want)
                ok &= same or not live
                say(f"  patched,   include_buffers={include!s:<5}: loss {loss:.6f}  logits bit-identical: "
                    f"{'yes' if same else 'NO, max|d| %.3g' % max_abs(got, want)}")
    say("all-MiniLM-L6-v2 BertModel, real weights: same round trip (position_ids are non-persistent)")
    md = minilm_dir()
    ref, sd, build = minilm_case(md)
    batch = bert_batch(md)
    want = bert_hidden(ref, batch)
    for patched in (False, True):
        ctx = hfpatches.patched(PID) if patched else contextlib.nullcontext()
        with ctx:
            for include in (False, True):
                model, _ = meta_round_trip(build, sd, include_buffers=include)
                try:
                    got = bert_hidden(model, batch)
                    res = "bit-identical" if torch.equal(got, want) else f"max|d hidden| {max_abs(got, want):.3g}"
                    same = torch.equal(got, want)
                except IndexError as e:
                    res, same = f"IndexError: {e} (garbage position_ids)", False
                if patched:
                    ok &= same
                say(f"  {'patched  ' if patched else 'unpatched'}, include_buffers={include!s:<5}: {res}")
    return ok


def _inv_freq(model):
    return dict(model.named_buffers())["model.rotary_emb.inv_freq"]
