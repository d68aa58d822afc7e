"""packed_attention_boundaries: packed sequences must not attend to each other (eager/sdpa).

Every covered architecture (tiny models built in-process), eager and sdpa, train and eval,
use_cache on and off: each packed sequence's logits and per-token loss against the same sequence
run alone. Unpatched the contamination shows wherever the installed transformers has it (4.4x:
always; 4.53.1+: with use_cache on); patched <= 1e-5 everywhere. Sliding-window models with a
window smaller than the sequences (the window still applies inside each sequence). Generation and
caller-given caches are left exactly as upstream; TRL's padding-free SFTTrainer loss equals the
loss of the sequences one by one; the patch composes with liger_flash_kwargs and
trl_padding_free_kwargs.
"""
from __future__ import annotations

import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hfpatches  # noqa: E402
from hfpatches._engine import run_check, run_probe  # noqa: E402
from hfpatches._registry import registry  # noqa: E402
from hfpatches.demos import packed_attention_boundaries as demo  # noqa: E402
from hfpatches.patches.packed_attention_boundaries import impl  # noqa: E402

PID = demo.PID
TOL = 1e-5
SLIDING = ("mistral", "qwen2", "gemma2", "phi3")


def _upstream_detects_packing() -> bool:
    """4.53.1+: masking_utils finds packed sequences itself when no cache is passed."""
    m = sys.modules.get("transformers.masking_utils")
    if m is None:
        try:
            import transformers.masking_utils as m
        except ImportError:
            return False
    return hasattr(m, "find_packed_sequence_indices")


def _apply():
    rep = hfpatches.apply(only=[PID])[PID]
    assert rep.outcome == hfpatches.Outcome.APPLIED, rep
    return rep


def _model(arch, impl_, sw=None):
    try:
        return demo.tiny_model(arch, impl_, sliding_window=sw)
    except ValueError as e:   # e.g. 5.x Gemma2 refuses sdpa
        pytest.skip(f"transformers {transformers.__version__} builds no {arch}/{impl_}: {str(e)[:80]}")


@pytest.fixture(autouse=True)
def _reverted():
    hfpatches.revert([PID])
    yield
    hfpatches.revert([PID])


def test_declaration():
    from hfpatches._declare import Target

    p = registry()[PID]
    assert p.default_enabled and p.fixed_in is None and p.requires == ("transformers>=4.41",)
    # the one fixed target: architectures imported mid-apply attach at the first model's post_init
    assert p.targets == (Target("transformers.modeling_utils", "PreTrainedModel.post_init"),)
    assert p.modules == ("transformers.modeling_utils",)
    import transformers.modeling_utils  # noqa: F401  (the engine checks once its target is imported)

    assert run_check(PID) is None


def _own_cache(model, train):
    """Whether the model makes its own cache for ``use_cache=True`` in this mode (Gemma2 on
    4.53.1-4.57 makes none in training: upstream's packing detection then runs, no leak)."""
    was = model.training
    model.train(train)
    try:
        with torch.no_grad():
            b = demo.packed(model.device)
            out = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=True)
    finally:
        model.train(was)
    return out.past_key_values is not None


CASES = [(a, sw) for a in demo._CLASSES for sw in ((None, 3) if a in SLIDING else (None,))]


@pytest.mark.parametrize("impl_", ["eager", "sdpa"])
@pytest.mark.parametrize("arch,sw", CASES, ids=[f"{a}-sw{sw}" for a, sw in CASES])
def test_packed_equals_separate(arch, sw, impl_):
    import importlib

    importlib.import_module(impl.module_name(arch))
    model = _model(arch, impl_, sw)
    modes = [(train, cache) for train in (False, True) for cache in (False, True)]
    unpatched = {m: demo.gaps(model, train=m[0], use_cache=m[1]) for m in modes}
    detects = _upstream_detects_packing()
    for (train, cache), (lg, ll) in unpatched.items():
        if not detects or (cache and _own_cache(model, train)):
            assert lg > 1e-3 and ll > 1e-4, (train, cache, lg, ll)   # the bug, shown
        else:
            assert lg <= TOL, (train, cache, lg)                     # upstream right without cache
    _apply()
    cls = getattr(sys.modules[impl.module_name(arch)], impl.ARCHS[arch])
    assert type(vars(cls)["forward"]).__name__ == "FunctionWrapper"
    for train, cache in modes:
        lg, ll = demo.gaps(model, train=train, use_cache=cache)
        assert lg <= TOL and ll <= TOL, (train, cache, lg, ll)
    hfpatches.revert([PID])
    for m in modes:   # reverted: upstream's numbers again, bit for bit
        assert demo.gaps(model, train=m[0], use_cache=m[1]) == unpatched[m]


def test_outcome_probe_and_exact_revert():
    import transformers.models.llama.modeling_llama as ml

    cls = ml.LlamaModel
    before = {n: vars(cls).get(n) for n in ("forward", "_update_causal_mask")}
    masking = sys.modules.get(impl.MASKING)
    pre = getattr(masking, "_preprocess_mask_arguments", None)
    bug = run_probe(PID)
    assert bug.bug_present and "use_cache=True" in bug.detail, bug
    rep = _apply()
    assert rep.bug_present and hfpatches.apply(only=[PID])[PID].outcome == hfpatches.Outcome.ALREADY_APPLIED
    assert type(vars(cls)["forward"]).__name__ == "FunctionWrapper"
    after = run_probe(PID)
    assert after.bug_present is False, after
    hfpatches.revert([PID])
    assert {n: vars(cls).get(n) for n in before} == before
    assert all(vars(cls).get(n) is v for n, v in before.items())
    if masking is not None:
        assert masking._preprocess_mask_arguments is pre
    assert run_probe(PID).bug_present


def test_probe_leaves_global_state():
    g_state = torch.random.get_rng_state()
    dtype, grad = torch.get_default_dtype(), torch.is_grad_enabled()
    run_probe(PID)
    assert torch.equal(torch.random.get_rng_state(), g_state)
    assert torch.get_default_dtype() is dtype and torch.is_grad_enabled() is grad


def test_cu_seq_lens_without_restarting_positions():
    """FlashAttention's keys alone mark the boundaries (eager/sdpa ignore them upstream)."""
    model = _model("llama", "sdpa")
    b = demo.packed()
    n = [len(s) for s in demo.SEQS]
    cu = torch.tensor([0, n[0], n[0] + n[1]], dtype=torch.int32)
    kw = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(n), "max_length_k": max(n)}
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([demo.SEQS[1]])).logits[0]
        un = model(input_ids=b["input_ids"], use_cache=False, **kw).logits[0, n[0]:]
        _apply()
        fixed = model(input_ids=b["input_ids"], use_cache=False, **kw).logits[0, n[0]:]
        # TRL 0.16-0.19's (1, n+1) form too
        trl_form = model(input_ids=b["input_ids"], use_cache=False, **{**kw, "cu_seq_lens_q": cu[None]}).logits[0, n[0]:]
    assert (un - alone).abs().max() > 1e-3
    assert (fixed - alone).abs().max() <= TOL and (trl_form - alone).abs().max() <= TOL


def test_padding_mask_and_caller_cache_left_as_upstream():
    """An attention mask, or a cache the caller passes (even empty), keeps upstream's result."""
    from transformers import DynamicCache

    model = _model("llama", "sdpa")
    b = demo.packed()
    mask = torch.ones_like(b["input_ids"])

    def run():
        with torch.no_grad():
            return (model(input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=mask).logits,
                    model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                          past_key_values=DynamicCache()).logits)

    un = run()
    _apply()
    pa = run()
    assert all(torch.equal(x, y) for x, y in zip(un, pa))


def test_generate_bit_identical():
    model = _model("llama", "sdpa")
    prompt = torch.tensor([demo.SEQS[1], demo.SEQS[0] + [1] * 4])
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])

    def gen(**kw):
        with torch.no_grad():
            out = model.generate(**{"input_ids": prompt, "attention_mask": mask, **kw}, max_new_tokens=4,
                                 do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
        return out.sequences, torch.stack(out.scores)

    un = [gen(), gen(use_cache=False), gen(input_ids=prompt[:1], attention_mask=None)]
    _apply()
    pa = [gen(), gen(use_cache=False), gen(input_ids=prompt[:1], attention_mask=None)]
    for (s0, l0), (s1, l1) in zip(un, pa):
        assert torch.equal(s0, s1) and torch.equal(l0, l1)


def test_data_collator_with_flattening_loss():
    """transformers' own padding-free collator and the model's loss: equal to the loss of the
    sequences one by one (weighted by their predicted tokens)."""
    from transformers import DataCollatorWithFlattening

    model = _model("llama", "sdpa").train()
    batch = DataCollatorWithFlattening()([{"input_ids": s} for s in demo.SEQS])
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "labels", "position_ids")}
    sep = sum(model(input_ids=torch.tensor([s]), labels=torch.tensor([s])).loss.item() * (len(s) - 1)
              for s in demo.SEQS) / sum(len(s) - 1 for s in demo.SEQS)
    with torch.no_grad():
        un = model(**batch).loss.item()
        _apply()
        pa = model(**batch).loss.item()
    assert abs(un - sep) > 1e-3 and abs(pa - sep) <= 1e-5, (un, pa, sep)


def test_sft_trainer_padding_free_sdpa(tmp_path):
    """TRL's SFTTrainer(padding_free=True) with sdpa: the training loss of the packed batch equals
    the loss of the same examples one by one."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from hfpatches.demos import trl_padding_free_kwargs as tdemo

    tok = tdemo.tokenizer()
    data = Dataset.from_dict({"input_ids": [list(s) for s in demo.SEQS]})
    model = _model("llama", "sdpa").train()
    try:
        args = trl.SFTConfig(output_dir=str(tmp_path), padding_free=True, report_to=[], use_cpu=True,
                             per_device_train_batch_size=2, max_steps=1, save_strategy="no", max_length=None)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    except TypeError as e:
        pytest.skip(f"trl {trl.__version__}: {e}")
    rows = [trainer.train_dataset[i] for i in range(len(demo.SEQS))]

    def loss(examples):
        inputs = trainer._prepare_inputs(trainer.data_collator(examples))
        with torch.no_grad():
            return trainer.compute_loss(model, inputs).item()

    sep = sum(loss([r]) * (len(r["input_ids"]) - 1) for r in rows) / sum(len(r["input_ids"]) - 1 for r in rows)
    un = loss(rows)
    _apply()
    pa = loss(rows)
    batch = trainer.data_collator(rows)
    if "position_ids" not in batch and "cu_seq_lens_q" not in batch:
        # TRL 0.19-0.20 with a non-flash attention: the collator drops position_ids and writes an all-ones
        # attention mask, the boundaries never reach the model. Contaminated, and left as it is (docs: Limits).
        assert abs(un - sep) > 1e-3 and pa == un, (un, pa, sep)
        return
    if trl.__version__.startswith("0."):
        assert abs(un - sep) > 1e-3, (un, sep)    # contaminated (TRL only warns)
    assert abs(pa - sep) <= 1e-5, (pa, sep)


def test_composes_with_liger_and_trl_patches(stack):
    """All three padding-free patches live: FlashAttention keys in TRL's (1, n+1) form and restarting
    positions in one batch through a Liger forward (eval, no Triton) with sdpa: each sequence equals
    itself alone; everything reverts."""
    pytest.importorskip("liger_kernel")
    ids = ["liger_flash_kwargs", "trl_padding_free_kwargs", PID]
    rep = hfpatches.apply(only=ids)
    assert rep[PID].outcome == hfpatches.Outcome.APPLIED, rep
    try:
        from hfpatches.demos import liger_flash_kwargs as liger_demo
        model = _model("llama", "sdpa")
        b = demo.packed()
        n = [len(s) for s in demo.SEQS]
        cu = torch.tensor([[0, n[0], n[0] + n[1]]], dtype=torch.int32)
        batch = {**b, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": torch.tensor([max(n)]),
                 "max_length_k": torch.tensor([max(n)])}
        with liger_demo.liger_forward("llama"):
            liger_demo.apply_liger("llama")
            # TRL's (1, n+1) form, and transformers' documented one (1-D int32, int max lengths)
            documented = {**batch, "cu_seq_lens_q": cu[0], "cu_seq_lens_k": cu[0],
                          "max_length_q": max(n), "max_length_k": max(n)}
            for feed in (batch, documented):
                feed = {k: v for k, v in feed.items() if k != "labels"}
                with torch.no_grad():
                    out = model(**feed).logits[0]
                    start = 0
                    for s in demo.SEQS:
                        alone = model(input_ids=torch.tensor([s])).logits[0]
                        assert (out[start:start + len(s)] - alone).abs().max() <= TOL
                        start += len(s)
    finally:
        hfpatches.revert(ids)


@pytest.mark.parametrize("first", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Trainer"])
def test_apply_then_import_a_model_class(first):
    """apply() first, then the user's own ``from transformers import X``: the probe runs from the
    hook on modeling_utils while X's module is still importing. It must never FAIL there, and the
    class the user imports is fixed (packed == alone)."""
    import json
    import subprocess

    code = (
        "import json, hfpatches, torch; hfpatches.apply(only=['packed_attention_boundaries'])\n"
        f"from transformers import {first}\n"
        "from hfpatches.patches.packed_attention_boundaries import impl\n"
        "r = hfpatches.status()['packed_attention_boundaries']\n"
        "m = impl._tiny_model(torch, 'sdpa', 'qwen2' if 'Qwen2' in '" + first + "' else 'llama')\n"
        "print(json.dumps([r.outcome.value, r.reason, impl.leak(m, torch, use_cache=False)]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    outcome, reason, leak = json.loads(out.stdout.strip().splitlines()[-1])
    assert outcome == "APPLIED", reason
    assert leak < 1e-4, (leak, reason)


@pytest.mark.parametrize("impl_", ["eager", "sdpa"])
@pytest.mark.parametrize("positions", [[0, 1, 2, 5, 6, 7], [0, 1, 2, 2, 3, 4], [4, 5, 6, 9, 10, 11]])
def test_positions_with_gaps_but_no_restart_are_not_packing(impl_, positions):
    """Position ids that skip or repeat but never restart at 0 (PoSE-style training, hand-made
    positions) are one sequence: the patched model gives upstream's logits bit for bit, use_cache
    on and off. (4.53.1+ upstream itself splits them without a cache; the patch adds nothing.)"""
    model = _model("llama", impl_)
    ids = torch.tensor([[3, 7, 1, 5, 2, 8]])
    pos = torch.tensor([positions])

    def run():
        with torch.no_grad():
            return [model(input_ids=ids, position_ids=pos, use_cache=c).logits for c in (False, True)]

    un = run()
    _apply()
    pa = run()
    assert all(torch.equal(x, y) for x, y in zip(un, pa))
