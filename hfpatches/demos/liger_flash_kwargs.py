"""Demo: Liger's fused linear cross-entropy on a padding-free batch (FlashAttention kwargs), on
real SmolLM2-135M weights: the TypeError without hfpatches, then the loss with it, next to plain
transformers' loss on the same batch.

Where the Triton kernel runs
    On a CPU, Liger's real FLCE kernel runs under Triton's interpreter, which ``TRITON_INTERPRET=1``
    switches on only if it is set *before* ``triton`` is imported, and then for the whole process.
    Decision: the kernel part of this demo always runs in a child process (``sys.executable``)
    with that variable set; the demo process itself never sets it. Reasons: in
    ``python -m hfpatches demo`` the flash-attn demo has already imported triton, so setting it
    here would do nothing; and setting it where triton is not imported yet would silently turn
    every later Triton kernel of the process (GPU ones included) into the interpreter. One code
    path, same numbers in both cases. The child prints ``SAY`` lines (relayed as they come) and
    one ``RESULT`` JSON line.

Also the shared scenario helpers (the packed batch, tiny models, FLCE-only Liger, attention key
recorder, loss/gradient parity) that the tests, GPU tests and the benchmark use.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any

from . import _common
from .meta_buffers import dtype_kw

PID = "liger_flash_kwargs"
KINDS = ("llama", "mistral", "qwen2", "gemma")
RESPONSE_TEMPLATE, PAIRS = _common.RESPONSE_TEMPLATE, _common.PAIRS
_CLASSES = {  # kind -> (config class, causal LM class) in transformers
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
}


# ----------------------------------------------------------------------------- batch
def tokenizer():
    """SmolLM2-135M's real tokenizer (from the packaged GGUF, cached), pad = eos."""
    from transformers import AutoTokenizer

    from .._models import smollm2_dir

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def packed_batch(tok, pairs=PAIRS, device="cpu") -> tuple[dict, str]:
    """A padding-free batch of ``pairs`` (prompt, completion) with loss on completions only, built
    by TRL's own collator: 0.17's ``DataCollatorForCompletionOnlyLM(padding_free=True)``, or on
    TRL >= 0.20 (which removed it) ``trl.trainer.sft_trainer.DataCollatorForLanguageModeling(
    padding_free=True)``. Returns ``(batch, producer)``; tensors moved to ``device``."""
    import warnings

    try:
        from trl import DataCollatorForCompletionOnlyLM
    except ImportError:
        DataCollatorForCompletionOnlyLM = None
    if DataCollatorForCompletionOnlyLM is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            coll = DataCollatorForCompletionOnlyLM(RESPONSE_TEMPLATE, tokenizer=tok, padding_free=True)
        batch = coll([tok(p + c) for p, c in pairs])
        producer = "trl DataCollatorForCompletionOnlyLM(padding_free=True)"
    else:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        examples = []
        for p, c in pairs:
            prompt = tok(p)["input_ids"]
            completion = tok(c, add_special_tokens=False)["input_ids"]
            examples.append({"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion})
        batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(examples)
        producer = "trl DataCollatorForLanguageModeling(padding_free=True)"
    out = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    return out, producer


def documented_form(batch) -> dict:
    """``batch`` with its FlashAttention keys in transformers' documented form (``cu_seq_lens_*``
    1-D int32, ``max_length_*`` ints), as transformers' ``DataCollatorWithFlattening(
    return_flash_attn_kwargs=True)`` and TRL >= 0.20 emit them; TRL 0.17 adds a batch dimension
    (huggingface/trl#3243). Same tokens, same boundaries."""
    import torch

    out = dict(batch)
    for k, v in batch.items():
        if k.startswith("cu_seq_lens"):
            out[k] = v.reshape(-1).to(dtype=torch.int32)
        elif k.startswith("max_length"):
            out[k] = int(v.reshape(-1)[0]) if hasattr(v, "reshape") else int(v)
    return out


def with_shift_labels(batch) -> dict:
    """``batch`` plus ``shift_labels`` (transformers' ``ForCausalLMLoss`` uses them instead of
    shifting ``labels``): each packed sequence's ``input_ids`` shifted within the sequence, -100
    on its last token -- a loss on every token, prompts included, that never crosses a boundary."""
    import torch

    ids = batch["input_ids"]
    shift = torch.full_like(ids, -100)
    cu = batch["cu_seq_lens_q"].reshape(-1).tolist()
    for s, e in zip(cu[:-1], cu[1:]):
        shift[:, s:e - 1] = ids[:, s + 1:e]
    return {**batch, "shift_labels": shift}


def split_packed(batch) -> list[dict]:
    """The sequences of a padding-free batch, each on its own (input_ids, labels, position_ids)."""
    cu = batch["cu_seq_lens_q"].reshape(-1).tolist()
    return [{k: batch[k][:, s:e] for k in ("input_ids", "labels", "position_ids")}
            for s, e in zip(cu[:-1], cu[1:])]


def one_by_one_loss(model, batch) -> float:
    """The packed batch's loss computed sequence by sequence: the token-weighted mean of each
    sequence's mean loss (the packed loss is the mean over all its predicted tokens)."""
    total, count = 0.0, 0
    for seq in split_packed(batch):
        n = int((seq["labels"][:, 1:] != -100).sum())
        if n:
            total += model(**seq).loss.item() * n
            count += n
    return total / count


def flash_keys_in(batch) -> list[str]:
    from ..patches.liger_flash_kwargs.impl import flash_keys

    return [k for k in flash_keys() if k in batch]


# ----------------------------------------------------------------------------- models
def tiny_model(kind: str, vocab_size: int, *, seed: int = 0, dtype=None, device="cpu",
               attn_implementation: str = "sdpa"):
    """A tiny random ``<Kind>ForCausalLM`` (2 layers, hidden 32) in train mode."""
    import torch
    import transformers

    cfg_name, cls_name = _CLASSES[kind]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    cfg._attn_implementation = attn_implementation
    cfg.use_cache = False   # training: no KV cache (transformers 5 only masks packed sequences then)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).train()


def smollm2(device="cpu", dtype=None, attn_implementation="sdpa"):
    """SmolLM2-135M, real weights (the packaged GGUF, dequantized and cached), in train mode."""
    import torch
    from transformers import LlamaForCausalLM

    from .._models import smollm2_dir

    model = LlamaForCausalLM.from_pretrained(smollm2_dir(), attn_implementation=attn_implementation,
                                             **dtype_kw(dtype or torch.float32))
    model.config.use_cache = False   # training: no KV cache (transformers 5 only masks packed sequences then)
    return model.to(device).train()


def causal_lm_class(kind: str):
    import transformers

    return getattr(transformers, _CLASSES[kind][1])


def apply_liger(kind: str, *, flce_only: bool = True, model=None) -> None:
    """Liger's real ``apply_liger_kernel_to_<kind>()``. ``flce_only``: fused linear cross-entropy
    only -- RMSNorm/RoPE/SwiGLU/GeGLU stay transformers' own (Triton's CPU interpreter cannot run
    those kernels); on a GPU pass False (every default kernel) and ``model`` (Liger then also
    patches that instance's existing norm/MLP modules)."""
    import inspect

    import liger_kernel.transformers as lk

    fn = getattr(lk, f"apply_liger_kernel_to_{kind}")
    want = {"fused_linear_cross_entropy": True, "cross_entropy": False}
    if flce_only:
        want.update(rope=False, rms_norm=False, swiglu=False, geglu=False)
    if model is not None:
        want["model"] = model
    params = inspect.signature(fn).parameters
    fn(**{k: v for k, v in want.items() if k in params})


@contextlib.contextmanager
def liger_forward(kind: str, *, flce_only: bool = True, model=None):
    """``apply_liger(kind, ...)`` for the duration of the block. Liger has no revert and patches
    transformers globally: the modeling module's attributes (RMSNorm/MLP classes, rotary
    function) and the CausalLM class's ``forward`` are put back afterwards. (Instance patches
    made with ``model`` stay on that model.)"""
    cls = causal_lm_class(kind)
    mod = sys.modules[cls.__module__]
    saved_mod = dict(vars(mod))
    had = "forward" in vars(cls)
    saved = vars(cls).get("forward")
    try:
        apply_liger(kind, flce_only=flce_only, model=model)
        yield cls
    finally:
        if had:
            cls.forward = saved
        elif "forward" in vars(cls):
            del cls.forward
        for k in [k for k in vars(mod) if k not in saved_mod]:
            delattr(mod, k)
        for k, v in saved_mod.items():
            if vars(mod).get(k) is not v:
                setattr(mod, k, v)


@contextlib.contextmanager
def keys_seen(model, keys):
    """Record which of ``keys`` reach the decoder (``model.model``) and the attention modules
    (``*.self_attn``) as keyword arguments; yields ``{"decoder": set, "attention": set}``, filled
    as the model runs."""
    seen: dict = {"decoder": set(), "attention": set()}

    def hook(where):
        def record(module, args, kwargs):
            seen[where].update(k for k in keys if k in kwargs)
        return record

    mods = [(m, "attention") for name, m in model.named_modules() if name.endswith("self_attn")]
    mods.append((model.model, "decoder"))
    handles = [m.register_forward_pre_hook(hook(where), with_kwargs=True) for m, where in mods]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def loss_and_grads(model, batch) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.item(), grads


def max_grad_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def head_rounding(model, batch) -> dict:
    """How far an fp32 loss of ``batch`` may sit from the exact one, from the model's own numbers.
    The loss is recomputed in float64 from the decoder's hidden states (``loss64``). Each logit
    is a K-term dot product (K = hidden size) whose fp32 rounding error is about
    ``sqrt(K) * u * sum_i |h_i w_i|`` (u = 2**-24; ``K * u * ...`` in the worst case), and a
    token's loss moves by at most twice its largest logit error (log-sum-exp and the target logit
    each by at most that), so ``fp32_rel_bound = 2 sqrt(K) u mean_t max_v sum_i |h_ti w_vi| / loss``.
    Two fp32 computations of the same loss (transformers' logits + cross-entropy, Liger's fused
    kernel) that differ only in summation order (BLAS kernel, CPU, thread count) may each be that
    far from ``loss64``; a wrong target or a dropped key moves the loss far more."""
    import torch

    with torch.no_grad():
        kw = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels")}
        h = model.model(**kw)[0]
        h = h.reshape(-1, h.shape[-1]).double()
        if "shift_labels" in batch:
            y = batch["shift_labels"].reshape(-1)
        else:
            y = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[..., 1:].reshape(-1)
        keep = y.to(h.device) != -100
        h = h[keep]
        w = model.lm_head.weight.double()
        loss64 = float(torch.nn.functional.cross_entropy(h @ w.T, y.to(h.device)[keep]))
        mag = (h.abs() @ w.abs().T).amax(dim=1).mean().item()
    bound = 2 * h.shape[1] ** 0.5 * 2.0 ** -24 * mag / abs(loss64)
    return {"loss64": loss64, "fp32_rel_bound": bound}


def _error(fn):
    """``(result, None)`` or ``(None, "TypeError: ...")``."""
    try:
        return fn(), None
    except TypeError as e:
        return None, f"TypeError: {e}"


def parity(model, kind: str, batch, *, grads: bool = True, liger_first: bool = False,
           flce_only: bool = True) -> dict:
    """The scenario on one model (needs the real FLCE kernel: a GPU, or TRITON_INTERPRET=1):

    * ``ref``: plain transformers' forward (the class's own), loss (+ gradients);
    * ``before``: Liger's FLCE installed, hfpatches not applied: the error, or the loss;
    * ``after``: hfpatches applied, then Liger installed (what TRL/Trainer ``use_liger_kernel``
      does: Liger is applied after the script's first lines). With ``liger_first`` Liger stays
      installed from ``before`` instead (its forward predates the patch).
    Also which FlashAttention keys reached the decoder and attention in each run. ``flce_only``
    False: every default Liger kernel, on ``model`` too (GPU only). The class's forward and
    the patch are restored on return."""
    import hfpatches

    keys = flash_keys_in(batch)
    run = (lambda: loss_and_grads(model, batch)) if grads else (lambda: (model(**batch).loss.item(), {}))
    res: dict = {"kind": kind}

    def record(stage, seen):
        res[f"{stage}_keys"] = sorted(seen["attention"])
        res[f"{stage}_decoder_keys"] = sorted(seen["decoder"])

    hfpatches.revert([PID])
    with keys_seen(model, keys) as seen:
        res["ref_loss"], ref_grads = run()
    record("ref", seen)
    try:
        liger_kw: dict[str, Any] = {"flce_only": flce_only, "model": None if flce_only else model}
        with liger_forward(kind, **liger_kw):
            with keys_seen(model, keys) as seen:
                got, res["before_error"] = _error(run)
            res["before_loss"] = got[0] if got else None
            record("before", seen)
            rep = hfpatches.apply(only=[PID])
            res["outcome"], res["reason"] = rep[PID].outcome.value, rep[PID].reason
            if not liger_first:
                apply_liger(kind, **liger_kw)
            with keys_seen(model, keys) as seen:
                got, res["after_error"] = _error(run)
            record("after", seen)
            if got:
                res["after_loss"] = got[0]
                res["rel"] = rel(got[0], res["ref_loss"])
                res["grad_diff"] = max_grad_diff(got[1], ref_grads) if grads else None
    finally:
        hfpatches.revert([PID])
    return res


# ----------------------------------------------------------------------------- the demo
def _child() -> None:
    """The kernel part (run with TRITON_INTERPRET=1 on a CPU): SAY lines, then RESULT json."""
    import logging

    import torch

    import hfpatches

    from ..patches.liger_flash_kwargs.impl import malformed

    told: list = []

    class _Told(logging.Handler):
        def emit(self, record):
            told.append(record.getMessage())

    logging.getLogger("hfpatches").setLevel(logging.WARNING)
    patch_log = logging.getLogger("hfpatches.liger_flash_kwargs")
    patch_log.setLevel(logging.INFO)
    patch_log.propagate = False
    patch_log.addHandler(_Told())

    def say(line: str) -> None:
        print(f"SAY {line}", flush=True)

    tok = tokenizer()
    batch, producer = packed_batch(tok)
    keys = flash_keys_in(batch)
    lens = batch["cu_seq_lens_q"].flatten().diff().tolist() if "cu_seq_lens_q" in batch else "?"
    say(f"batch: {producer}: {len(PAIRS)} Q/A pairs packed into one row of "
        f"{batch['input_ids'].shape[1]} tokens (lengths {lens}); keys: {', '.join(sorted(batch))}")
    say("loading SmolLM2-135M (real weights, fp32) ...")
    model = smollm2()
    say("Liger: apply_liger_kernel_to_llama(fused_linear_cross_entropy=True; rope/rms_norm/swiglu "
        "off: Triton's CPU interpreter cannot run those kernels), model.train(), labels given")
    with torch.no_grad():
        r = parity(model, "llama", batch, grads=False)
    say(f"plain transformers (no Liger):          loss {r['ref_loss']:.6f}")
    if r["before_error"]:
        say(f"Liger, without hfpatches:               {r['before_error']}")
    else:
        say(f"Liger, without hfpatches:               loss {r['before_loss']:.6f} (no error on this version)")
    say(f"  FlashAttention keys reaching the decoder: {r['before_decoder_keys'] or 'none'}")
    say(f"hfpatches.apply: {r['outcome']} ({r['reason']})")
    if r.get("after_loss") is None:
        say(f"Liger, with hfpatches:                  {r['after_error']}")
        print("RESULT " + json.dumps({"ok": False, **r}), flush=True)
        return
    r.update(head_rounding(model, batch))
    say(f"Liger, with hfpatches:                  loss {r['after_loss']:.6f}  "
        f"(rel. diff to plain {r['rel']:.2e}; fp32 rounding of the logits allows "
        f"{r['fp32_rel_bound']:.1e}, float64 loss {r['loss64']:.6f})")
    say(f"  FlashAttention keys reaching the decoder: {r['after_decoder_keys'] or 'none'}")
    for line in told:   # why the keys were not handed on (the demo's own Liger-first step aside)
        if "not handed to the decoder" in line:
            say(f"  {line.split(': ', 1)[-1]}")
    ok = r["rel"] <= r["fp32_rel_bound"]     # fp32 rounding of the logits (see head_rounding)
    doc = documented_form(batch)
    if r["outcome"] == "APPLIED" and malformed({k: doc[k] for k in keys}, torch) is None \
            and malformed({k: batch[k] for k in keys}, torch) is not None:
        with torch.no_grad(), hfpatches.patched(PID), liger_forward("llama"), keys_seen(model, keys) as seen:
            loss = model(**doc).loss.item()
        r["documented"] = {"loss": loss, "decoder_keys": sorted(seen["decoder"]),
                           "attention_keys": sorted(seen["attention"])}
        say("same batch, keys in transformers' documented form (1-D int32 cu_seq_lens, int max_length; "
            "what TRL >= 0.20 emits):")
        say(f"Liger, with hfpatches:                  loss {loss:.6f}; keys reaching the decoder: "
            f"{sorted(seen['decoder']) or 'none'}, attention: {sorted(seen['attention']) or 'none'}")
        ok = ok and sorted(seen["decoder"]) == sorted(keys) and rel(loss, r["ref_loss"]) <= r["fp32_rel_bound"]
    print("RESULT " + json.dumps({"ok": ok, **r}), flush=True)


def run_child(say, *, timeout: int = 300) -> dict | None:
    """Run ``_child`` in a fresh interpreter with TRITON_INTERPRET=1 (unless CUDA is there,
    where the real kernel runs), relaying its SAY lines; return its RESULT."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return _common.run_child(say, "hfpatches.demos.liger_flash_kwargs", env, timeout=timeout)


def run(say) -> bool:
    import importlib.util

    import hfpatches

    if importlib.util.find_spec("liger_kernel") is None:
        r = hfpatches.apply(only=[PID])[PID]
        say(f"{r.outcome.value}: {r.reason}")
        return True
    say("the kernel part runs in a child process with TRITON_INTERPRET=1 (Liger's real FLCE "
        "kernel on the CPU); starting it (imports + SmolLM2 load, ~20 s) ...")
    res = run_child(say)
    if res is None:
        return False
    if res["outcome"] == "APPLIED":
        return bool(res["ok"]) and bool(res["before_error"])
    # NOT_AFFECTED (fixed upstream): the scenario must still work
    return bool(res["ok"])
