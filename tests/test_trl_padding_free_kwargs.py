"""trl_padding_free_kwargs: TRL 0.16-0.19's padding-free collator and FlashAttention's keywords.

Affected stack (trl 0.17.0, transformers 4.51.3): every bug case also runs without hfpatches and
shows the (1, n+1) / tensor form reaching the attention modules, and FlashAttention-2 (a pure-torch
stand-in for ``flash_attn_varlen_func`` that checks its arguments like the kernel: tests/_fa_ref.py)
raising the kernel's "cu_seqlens_q must have shape (batch_size + 1)". Latest stack (trl 1.16.0):
the collator is gone, the patch reports NOT_AFFECTED and TRL's padding-free collator there emits
the documented form itself. The real kernel runs in gpu_tests/test_trl_padding_free_kwargs.py.
"""
from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("trl")

import hfpatches  # noqa: E402
from hfpatches.demos import trl_padding_free_kwargs as demo  # noqa: E402
from hfpatches._registry import registry  # noqa: E402

PID = demo.PID


@pytest.fixture(scope="session")
def stack() -> str:
    """'affected' where this patch's range holds for the installed versions, else 'latest' (the
    expectations below were written per stack; the boundary stack gets the ones its versions
    call for)."""
    from conftest import range_stack

    return range_stack(PID)


KEYS = demo.KEYS


@pytest.fixture(scope="module")
def modules():
    import transformers.trainer
    import trl.trainer.utils

    return trl.trainer.utils, transformers.trainer


@pytest.fixture(scope="module")
def tok():
    return demo.tokenizer()


@pytest.fixture(scope="module")
def batch(tok, modules):
    b = demo.packed_batch(tok)
    if b is None:
        pytest.skip("the installed TRL has no DataCollatorForCompletionOnlyLM (removed in 0.20)")
    return b


@pytest.fixture
def trainer(tmp_path, tok):
    return demo.make_trainer(demo.tiny_llama(len(tok)), str(tmp_path))


def _apply():
    rep = hfpatches.apply(only=[PID])[PID]
    assert rep.outcome == hfpatches.Outcome.APPLIED, rep.reason
    return rep


# ----------------------------------------------------------------------------- outcome & probe
FA_ENTRY = "transformers.integrations.flash_attention._flash_attention_forward"


def test_declaration():
    p = registry()[PID]
    assert p.requires == ("trl>=0.16.0,<0.20",) and p.fixed_in == "trl>=0.20"
    assert p.upstream == ("huggingface/trl#3243",) and p.default_enabled
    assert p.modules == ("trl.trainer.utils", "transformers.integrations.flash_attention")
    assert [t.path for t in p.targets] == ["trl.trainer.utils.DataCollatorForCompletionOnlyLM.torch_call", FA_ENTRY]
    assert p.fix_word == "removed" and "fixed in" not in p.summary


def test_outcome_per_stack(stack, modules):
    import transformers.integrations.flash_attention as fa
    import transformers.modeling_flash_attention_utils as fau

    original = vars(fa)["_flash_attention_forward"]
    utils_entry = fau._flash_attention_forward
    trainer_prepare = vars(modules[1].Trainer)["_prepare_inputs"]
    collator_call = getattr(getattr(modules[0], "DataCollatorForCompletionOnlyLM", None), "torch_call", None)
    rep = hfpatches.apply(only=[PID])[PID]
    if stack == "affected":
        assert rep.outcome == hfpatches.Outcome.APPLIED and rep.in_range and rep.bug_present, rep
        assert type(vars(fa)["_flash_attention_forward"]).__name__ == "FunctionWrapper"
        assert hfpatches.get_original(PID)[FA_ENTRY] is original
        assert hfpatches.apply(only=[PID])[PID].outcome == hfpatches.Outcome.ALREADY_APPLIED
    else:
        assert rep.outcome == hfpatches.Outcome.NOT_AFFECTED, rep
        assert "outside the affected range" in rep.reason and "trl>=0.20" in rep.reason
        assert not hasattr(modules[0], "DataCollatorForCompletionOnlyLM")
    # the collator, Trainer and transformers' own module attribute are never touched
    assert getattr(getattr(modules[0], "DataCollatorForCompletionOnlyLM", None), "torch_call", None) is collator_call
    assert vars(modules[1].Trainer)["_prepare_inputs"] is trainer_prepare
    assert fau._flash_attention_forward is utils_entry
    hfpatches.revert([PID])
    assert vars(fa)["_flash_attention_forward"] is original


def test_probe_is_behavioural(stack, modules):
    if stack != "affected":
        pytest.skip("no DataCollatorForCompletionOnlyLM in trl >= 0.20: nothing to probe")
    import transformers.modeling_flash_attention_utils as fau

    from hfpatches._engine import run_check, run_probe

    # the probe's copy of the entry stands in for the kernel lookup of the installed release
    # (module globals, 4.54's _lazy_imports cache, 4.56's lazy_import_flash_attention cache):
    # transformers' own module and caches are never touched (flash-attn is not loaded)
    names = ("flash_attn_varlen_func", "flash_attn_func", "_flash_fn", "_flash_varlen_fn", "_pad_fn", "_unpad_fn",
             "_process_flash_kwargs_fn", "_is_fa3", "_flash_supports_window", "lazy_import_flash_attention")
    missing = object()
    snapshot = {n: vars(fau).get(n, missing) for n in names}
    assert run_check(PID) is None
    before = run_probe(PID)
    assert before.bug_present, before
    assert "emits cu_seq_lens_q a (1, 4) int32 tensor, max_length_q a (1,) int64 tensor" in before.detail
    assert "hands the varlen kernel cu_seqlens_q a (1, 4) int32 tensor, max_seqlen_q a (1,) int64 tensor" \
        in before.detail
    _apply()
    after = run_probe(PID)
    assert after.bug_present is False and "varlen kernel gets cu_seqlens_q a (4,) int32 tensor, max_seqlen_q an int" \
        in after.detail, after
    hfpatches.revert([PID])
    assert run_probe(PID).bug_present
    assert all(vars(fau).get(n, missing) is v for n, v in snapshot.items())


# ----------------------------------------------------------------------------- the conversion
class _Entry:
    """Calls the patched integration entry the way ``flash_attention_forward`` does, with the
    kernel replaced by a recorder (tests/_fa_ref.py); returns what the varlen kernel got."""

    def __init__(self, monkeypatch):
        from _fa_ref import install

        self.ref = install(monkeypatch)

    def __call__(self, n, position_ids, **keys):
        import transformers.integrations.flash_attention as fa

        self.ref.calls.clear()
        q = torch.randn(1, n, 2, 8)
        try:
            fa._flash_attention_forward(q, q, q, None, query_length=n, is_causal=True,
                                        position_ids=position_ids, **keys)
        except RuntimeError as e:
            return str(e)
        return self.ref.calls[-1]


def _trl_keys(bounds, dtype=torch.int32):
    cu = torch.tensor([bounds], dtype=dtype)
    m = torch.tensor([max(b - a for a, b in zip(bounds[:-1], bounds[1:]))])
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": m, "max_length_k": m}


def _positions(bounds):
    return torch.cat([torch.arange(b - a) for a, b in zip(bounds[:-1], bounds[1:])])[None]


def test_only_trls_exact_form_is_converted(stack, modules, monkeypatch):
    """At the entry: TRL's form whose values match position_ids -> 1-D int32 view + int maxima;
    anything else reaches the kernel exactly as given (the kernel's error stays the kernel's)."""
    if stack != "affected":
        pytest.skip("out of range on this stack (trl >= 0.20): nothing is wrapped")
    call = _Entry(monkeypatch)
    bounds = [0, 3, 7, 12]
    pos = _positions(bounds)
    assert "must have shape (batch_size + 1)" in call(12, pos, **_trl_keys(bounds))    # unpatched
    _apply()
    keys = _trl_keys(bounds)
    got = call(12, pos, **keys)
    assert got["cu_seqlens_q"].tolist() == bounds and got["cu_seqlens_q"].dtype == torch.int32
    assert got["cu_seqlens_q"].data_ptr() == keys["cu_seq_lens_q"].data_ptr()           # a view
    assert got["max_seqlen_q"] == got["max_seqlen_k"] == 5 and type(got["max_seqlen_q"]) is int
    wrong = {
        "int64 cu": (pos, _trl_keys(bounds, torch.int64)),
        "boundaries not where position_ids restart": (pos, _trl_keys([0, 4, 7, 12])),
        "does not end at the row's length": (pos, _trl_keys([0, 3, 7, 11])),
        "max_length not the longest": (pos, {**_trl_keys(bounds), "max_length_q": torch.tensor([9])}),
        "two rows": (pos, {**_trl_keys(bounds), "cu_seq_lens_q": torch.tensor([bounds, bounds], dtype=torch.int32)}),
        "cu_k differs": (pos, {**_trl_keys(bounds), "cu_seq_lens_k": torch.tensor([[0, 6, 12]], dtype=torch.int32)}),
    }
    for why, (p, k) in wrong.items():
        got = call(12, p, **k)
        assert isinstance(got, str) or got["cu_seqlens_q"] is k["cu_seq_lens_q"], why
    doc = {"cu_seq_lens_q": torch.tensor(bounds, dtype=torch.int32), "max_length_q": 5}
    doc.update(cu_seq_lens_k=doc["cu_seq_lens_q"], max_length_k=5)
    got = call(12, pos, **doc)
    assert got["cu_seqlens_q"] is doc["cu_seq_lens_q"] and got["max_seqlen_q"] == 5    # documented: as given


# ----------------------------------------------------------------------------- the model side
def test_sdpa_path_untouched(stack, batch, trainer):
    """sdpa ignores the keys: with the patch every attention module gets the very tensors the
    batch holds, and the loss is bit-identical."""
    model = trainer.model.eval()
    runs = {}
    for stage in ("unpatched", "patched"):
        if stage == "patched":
            _apply()
        inputs = trainer._prepare_inputs(batch)
        with demo.attention_kwargs(model) as seen, torch.no_grad():
            runs[stage] = (model(**inputs).loss, seen, inputs)
    (loss0, _, _), (loss1, seen1, in1) = runs["unpatched"], runs["patched"]
    assert len(seen1) == model.config.num_hidden_layers
    assert all(s[k] is in1[k] for s in seen1 for k in KEYS)
    assert torch.equal(loss0, loss1)


@pytest.mark.parametrize("trainer_stage", ["unpatched", "patched"])
def test_flash_attention_2_per_sequence(stack, batch, trainer, monkeypatch, trainer_stage):
    """FlashAttention-2 (pure-torch varlen stand-in) on the packed batch from Trainer's input
    preparation. Unpatched: the kernel's RuntimeError. Patched: the varlen function gets the
    batch's own boundaries (a 1-D view of the batch's tensor, max_length as an int), each
    sequence's logits equal those of the sequence run alone (atol 1e-5: float32, the two differ
    only in summation order of the same per-sequence attention), and the loss equals the
    token-weighted loss of the sequences run one by one (rel 1e-6)."""
    from _fa_ref import install

    ref = install(monkeypatch)
    model = trainer.model.eval()
    model.config._attn_implementation = "flash_attention_2"
    if trainer_stage == "patched":
        _apply()
    inputs = trainer._prepare_inputs(batch)
    with torch.no_grad():
        if trainer_stage == "unpatched":
            with pytest.raises(RuntimeError, match=r"cu_seqlens_q must have shape \(batch_size \+ 1\)"):
                model(**inputs)
            return
        out = model(**inputs)
    assert len(ref.calls) == model.config.num_hidden_layers
    assert all(c["cu_seqlens_q"].data_ptr() == inputs["cu_seq_lens_q"].data_ptr()
               and c["cu_seqlens_q"].shape == (inputs["cu_seq_lens_q"].numel(),)
               and c["max_seqlen_q"] == int(inputs["max_length_q"]) and type(c["max_seqlen_q"]) is int
               for c in ref.calls)
    ref.calls.clear()
    assert demo.per_sequence_gap(model, inputs, out.logits) <= 1e-5
    assert ref.calls == []            # each sequence alone went through flash_attn_func (no varlen)


# ----------------------------------------------------------------------------- with liger_flash_kwargs
def test_with_liger_flash_kwargs(stack, batch, trainer, monkeypatch):
    """With liger_flash_kwargs (Liger 0.5.6 or 0.6.3-0.6.4). Liger 0.5.6's forward drops the
    FlashAttention keys and liger_flash_kwargs hands them on to the decoder only in the documented
    form; TRL's batch reaches it in TRL's form (this patch does not convert the batch), so the
    decoder recomputes the same boundaries from position_ids: identical logits with and without
    this patch, FlashAttention-2 (stand-in) runs in both. Liger >= 0.6.0's forward hands the keys
    to the decoder itself, as given: without this patch the kernel's RuntimeError (trl#3243
    through Liger), with it the batch's boundaries in every layer and each sequence's logits equal
    to the sequence run alone (1e-5). Eval, no labels."""
    if stack != "affected":
        pytest.skip("trl >= 0.20 has no DataCollatorForCompletionOnlyLM")
    pytest.importorskip("liger_kernel")
    from conftest import in_range
    from packaging.version import Version
    from _fa_ref import install

    from hfpatches.demos import liger_flash_kwargs as liger_demo

    if not in_range("liger_flash_kwargs"):
        pytest.skip("the installed liger-kernel is outside liger_flash_kwargs's range")
    import importlib.metadata

    hands_itself = Version(importlib.metadata.version("liger-kernel")) >= Version("0.6.0")
    ref = install(monkeypatch)
    model = trainer.model.eval()
    model.config._attn_implementation = "flash_attention_2"
    got = {}
    with liger_demo.liger_forward("llama"):
        for stage, ids in (("liger only", ["liger_flash_kwargs"]), ("both", ["liger_flash_kwargs", PID])):
            rep = hfpatches.apply(only=ids)
            assert all(rep[i].outcome == hfpatches.Outcome.APPLIED for i in ids), rep
            liger_demo.apply_liger("llama")        # Liger after hfpatches (TRL/Trainer order)
            feed = {k: v for k, v in trainer._prepare_inputs(batch).items() if k != "labels"}
            ref.calls.clear()
            with torch.no_grad():
                if stage == "liger only" and hands_itself:
                    with pytest.raises(RuntimeError, match=r"cu_seqlens_q must have shape \(batch_size \+ 1\)"):
                        model(**feed)
                    hfpatches.revert(ids)
                    continue
                logits = model(**feed).logits
                calls = [c["cu_seqlens_q"].tolist() for c in ref.calls]
                gap = demo.per_sequence_gap(model, batch, logits)
            got[stage] = (calls, logits, gap)
            hfpatches.revert(ids)
    bounds = batch["cu_seq_lens_q"].reshape(-1).tolist()
    assert list(got) == (["both"] if hands_itself else ["liger only", "both"])
    for stage, (calls, _, gap) in got.items():
        assert calls == [bounds] * model.config.num_hidden_layers, stage
        assert gap <= 1e-5, stage
    if not hands_itself:
        assert torch.equal(got["liger only"][1], got["both"][1])


# ----------------------------------------------------------------------------- dataloader dispatch & SFTTrainer (child)
CHILD = r'''
import json, math, sys, tempfile, warnings
warnings.filterwarnings("ignore")
import torch
import hfpatches
from hfpatches.demos import trl_padding_free_kwargs as D
first = hfpatches.apply(only=[D.PID])[D.PID].outcome.value      # a script's first lines
import trl, transformers, transformers.trainer
from accelerate import Accelerator
tok = D.tokenizer()
coll = D.collator(tok)
out = {"first": first, "trl": trl.__version__}
rows = [tok(p + c) for p, c in D.PAIRS]

class Stream(torch.utils.data.IterableDataset):     # an IterableDataset: accelerate dispatches it
    def __iter__(self):
        return iter(rows)

def through_dispatch(collate):
    dl = Accelerator(cpu=True).prepare(torch.utils.data.DataLoader(Stream(), batch_size=3, collate_fn=collate))
    try:
        b = next(iter(dl))
    except Exception as e:
        return {"loader": type(dl).__name__, "error": f"{type(e).__name__}: {e}"}
    return {"loader": type(dl).__name__, "cu": b["cu_seq_lens_q"].tolist(),
            "max": b["max_length_q"].tolist() if torch.is_tensor(b["max_length_q"]) else b["max_length_q"]}

if coll is not None:
    ref = coll(rows)
    out["collated"] = {"cu": ref["cu_seq_lens_q"].tolist(), "max": ref["max_length_q"].tolist()}
    # the collator's output as the patch leaves it (TRL's form) vs the alternative of fixing the
    # collator itself: what accelerate's dispatch_batches does to each
    out["dispatch_trl_form"] = through_dispatch(coll)
    def documented(b):
        return {**b, "cu_seq_lens_q": b["cu_seq_lens_q"].reshape(-1), "cu_seq_lens_k": b["cu_seq_lens_q"].reshape(-1),
                "max_length_q": int(b["max_length_q"]), "max_length_k": int(b["max_length_q"])}
    out["dispatch_documented"] = through_dispatch(lambda ex: documented(coll(ex)))
    out["dispatch_cu_only"] = through_dispatch(
        lambda ex: {**coll(ex), "cu_seq_lens_q": coll(ex)["cu_seq_lens_q"].reshape(-1)})

if coll is None:   # trl >= 0.20: its padding-free collator emits the documented form itself
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    b = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(rows)
    out["new_collator_forms"] = {k: D.form(b[k]) for k in D.KEYS if k in b}
    out["new_collator_cu"] = b["cu_seq_lens_q"].tolist() if "cu_seq_lens_q" in b else None

if coll is not None and transformers.__version__.startswith("4."):
    sys.path.insert(0, "tests")
    from _fa_ref import installed
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    data = Dataset.from_dict({"text": [p + c for p, c in D.PAIRS]})
    def step(tmp):
        model = D.tiny_llama(len(tok), attn_implementation="flash_attention_2")
        args = SFTConfig(output_dir=tmp, max_steps=1, per_device_train_batch_size=len(D.PAIRS),
                         learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=1,
                         disable_tqdm=True, dataloader_num_workers=0, seed=0, use_cpu=True)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                             data_collator=D.collator(tok))
        with D.attention_kwargs(model) as seen:
            loss = trainer.train().training_loss
        return loss, seen, [{"input_ids": r["input_ids"]} for r in trainer.train_dataset]
    with tempfile.TemporaryDirectory() as tmp, installed() as ref:
        hfpatches.revert([D.PID])
        try:
            step(tmp)
            out["unpatched_error"] = None
        except RuntimeError as e:
            out["unpatched_error"] = str(e)
        out["outcome"] = hfpatches.apply(only=[D.PID])[D.PID].outcome.value
        ref.calls.clear()
        loss, seen, tokenized = step(tmp)
        out["loss"] = loss
        out["attention_forms"] = sorted({json.dumps({k: D.form(v) for k, v in s.items()}) for s in seen})
        out["varlen_calls"] = len(ref.calls)
        out["varlen_cu"] = sorted({json.dumps(c["cu_seqlens_q"].tolist()) for c in ref.calls})
        # the same first-step loss, computed directly on the SFTTrainer's tokenized examples
        # packed by the collator and converted (the same initial weights: seed 0)
        model = D.tiny_llama(len(tok), attn_implementation="flash_attention_2")
        direct = coll(tokenized)
        out["direct_tokens"] = direct["input_ids"].shape[1]
        with torch.no_grad():
            out["direct_loss"] = model(**direct).loss.item()      # a custom loop: no Trainer
out["final"] = hfpatches.status()[D.PID].outcome.value
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def child():
    from conftest import run_py

    proc = run_py(CHILD, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_dispatch_batches_keeps_working(stack, child):
    """The patch leaves the collator's output as it is, so accelerate's dispatch_batches (the
    default for an IterableDataset) still carries the batch: TRL's batch-dimensioned keys survive
    concatenate + slice. Documented-form keys would not: an int makes concatenate raise, and a 1-D
    cu_seq_lens is silently cut to its first element by the per-process slice [0:1] -- why the
    batch is never converted (only at transformers' FlashAttention-2 entry)."""
    if stack != "affected":
        pytest.skip("trl >= 0.20 has no DataCollatorForCompletionOnlyLM")
    assert child["dispatch_trl_form"]["loader"] == "DataLoaderDispatcher"
    assert child["dispatch_trl_form"]["cu"] == child["collated"]["cu"]
    assert child["dispatch_trl_form"]["max"] == child["collated"]["max"]
    # accelerate 1.6's concatenate raises on the int maxima; later releases (1.14: the boundary
    # stack) pass ints through, and the 1-D cu_seq_lens is then cut silently like the next case
    documented = child["dispatch_documented"]
    assert "Can only concatenate tensors" in documented.get("error", "") or documented.get("cu") == [0], child
    assert child["dispatch_cu_only"]["cu"] == [0], child


@pytest.mark.slow
def test_sft_trainer_step_flash_attention_2(stack, child):
    """One real trl.SFTTrainer step with TRL's padding-free collator and flash_attention_2
    (stand-in kernel): the kernel's RuntimeError without hfpatches; with it every attention layer
    gets the batch as TRL built it, the kernel gets the batch's boundaries as a 1-D tensor, and the step's loss equals
    a direct forward of the same batch (rel 1e-5: the Trainer packs the shuffled examples in
    another order; per-sequence attention makes the token mean order-independent up to rounding)."""
    r = child
    if stack != "affected":
        assert r["final"] == "NOT_AFFECTED" and "collated" not in r, r
        forms = r["new_collator_forms"]
        assert forms["max_length_q"] == forms["max_length_k"] == "int", r
        assert forms["cu_seq_lens_q"] == forms["cu_seq_lens_k"] == f"({len(r['new_collator_cu'])},) int32", r
        return
    assert r["first"] in ("DEFERRED", "APPLIED"), r
    assert r["unpatched_error"] and "cu_seqlens_q must have shape (batch_size + 1)" in r["unpatched_error"], r
    assert r["outcome"] == "APPLIED", r
    assert r["attention_forms"] == [json.dumps({"cu_seq_lens_q": "(1, 4) int32", "cu_seq_lens_k": "(1, 4) int32",
                                                "max_length_q": "(1,) int64", "max_length_k": "(1,) int64"})], r
    assert r["varlen_calls"] == 2 and len(r["varlen_cu"]) == 1, r
    assert json.loads(r["varlen_cu"][0])[-1] == r["direct_tokens"], r
    assert math.isfinite(r["loss"]) and abs(r["loss"] - r["direct_loss"]) <= 1e-5 * r["direct_loss"], r


# ----------------------------------------------------------------------------- review loose ends (#22)
def _fa2(model, monkeypatch):
    from _fa_ref import install

    ref = install(monkeypatch)
    model.config._attn_implementation = "flash_attention_2"
    return ref


@pytest.mark.parametrize("stage", ["unpatched", "patched"])
def test_custom_loop_flash_attention_2(stack, batch, tok, monkeypatch, stage):
    """No Trainer: ``model(**batch)`` on the collator's output, a plain training loop (forward,
    backward, step) with FlashAttention-2 (stand-in kernel). Unpatched: the kernel's RuntimeError.
    Patched: every layer's varlen call gets the batch's boundaries as a 1-D int32 tensor and
    max_length as an int; the logits of each sequence equal the sequence run alone (1e-5) and the
    loss equals the token-weighted loss of the sequences one by one (rel 1e-6); the batch the
    user holds is not modified."""
    model = demo.tiny_llama(len(tok))
    ref = _fa2(model, monkeypatch)
    before = {k: (v, v.clone()) for k, v in batch.items()}
    if stage == "patched":
        _apply()
    if stage == "unpatched":
        with pytest.raises(RuntimeError, match=r"cu_seqlens_q must have shape \(batch_size \+ 1\)"):
            model(**batch)
        return
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    out = model(**batch)
    out.loss.backward()
    opt.step()
    assert len(ref.calls) == model.config.num_hidden_layers
    cu = batch["cu_seq_lens_q"].reshape(-1)
    for c in ref.calls:
        assert tuple(c["cu_seqlens_q"].shape) == (cu.numel(),) and c["cu_seqlens_q"].dtype == torch.int32
        assert torch.equal(c["cu_seqlens_q"], cu) and torch.equal(c["cu_seqlens_k"], cu)
        assert type(c["max_seqlen_q"]) is int and c["max_seqlen_q"] == int(batch["max_length_q"])
    for k, (v, copy) in before.items():          # the user's batch: same objects, same values
        assert batch[k] is v and torch.equal(v, copy), k
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
        assert demo.per_sequence_gap(model, batch, logits) <= 1e-5
        total, count = 0.0, 0
        for s, e in demo.segments(batch):
            n = int((batch["labels"][:, s + 1:e] != -100).sum())
            if n:
                total += model(input_ids=batch["input_ids"][:, s:e], labels=batch["labels"][:, s:e],
                               position_ids=batch["position_ids"][:, s:e]).loss.item() * n
                count += n
    assert abs(out.loss.item() - total / count) <= 1e-6 * abs(total / count)


WARN_CHILD = r'''
import sys
if sys.argv[1] == "1":
    import hfpatches
    hfpatches.apply(only=["trl_padding_free_kwargs"])
import trl, transformers.modeling_utils, transformers.trainer
try:
    import trl.trainer.utils
except ImportError:
    pass
sys.stderr.write("--- the user's code\n")
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
vocab = {w: i for i, w in enumerate(("<pad>", "<eos>", "<unk>", "q", "a"))}
w = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
w.pre_tokenizer = pre_tokenizers.Whitespace()
tok = PreTrainedTokenizerFast(tokenizer_object=w, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
cls = getattr(sys.modules.get("trl.trainer.utils"), "DataCollatorForCompletionOnlyLM", None)
for i in range(2 if cls is not None else 0):
    try:
        cls([4], tokenizer=tok, padding_free=True)
        sys.stderr.write(f"collator {i} built\n")
    except Warning as e:
        sys.stderr.write(f"collator {i} raised {type(e).__name__}\n")
if sys.argv[1] == "1":
    r = hfpatches.status()["trl_padding_free_kwargs"]
    print("RESULT", r.outcome.value, r.reason)
'''


@pytest.mark.parametrize("flt", ["error", "default", "always", "once"])
def test_probe_is_quiet_under_every_warnings_filter(stack, tmp_path, flt):
    """The probe builds TRL's collator (TRL 0.17 warns DeprecationWarning in its __init__): under
    any warnings filter it neither raises nor prints, and the user's own collators afterwards warn
    (or raise) exactly as in the same program without hfpatches (whole stderr compared)."""
    from conftest import run_py

    script = tmp_path / "child.py"
    script.write_text(WARN_CHILD)
    runs = {}
    for use in ("0", "1"):
        code = f"import sys, runpy; sys.argv = ['child', {use!r}]; runpy.run_path({str(script)!r}, run_name='__main__')"
        runs[use] = run_py(code, env={"PYTHONWARNINGS": flt})
    line = [ln for ln in runs["1"].stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, runs["1"].stdout + runs["1"].stderr
    assert line[0].split()[1] == ("APPLIED" if stack == "affected" else "NOT_AFFECTED"), line
    assert runs["1"].stderr == runs["0"].stderr, (runs["0"].stderr, runs["1"].stderr)
    if stack == "affected":
        user = runs["0"].stderr.split("--- the user's code\n", 1)[1]
        assert ("raised DeprecationWarning" if flt == "error" else "DeprecationWarning: This class is deprecated") in user


def test_users_own_per_row_batch_is_left_alone(stack, modules, tok, trainer):
    """A user's own batch with per-row cu_seq_lens_q (B, k) and max_length_q (B,), on the last
    batch B == 1: Trainer's input preparation and the model's attention modules get it as the user
    built it (same objects, same shapes). Only transformers' FlashAttention-2 entry normalises, and
    only what TRL's collator emits."""
    _apply() if stack == "affected" else hfpatches.apply(only=[PID])
    n = 6
    user = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10]]), "labels": torch.tensor([[5, 6, 7, 8, 9, 10]]),
            "position_ids": torch.tensor([[0, 1, 0, 1, 2, 3]]),
            "cu_seq_lens_q": torch.tensor([[0, 2, n]], dtype=torch.int32), "max_length_q": torch.tensor([4])}
    inputs = trainer._prepare_inputs(dict(user))
    for k, v in user.items():
        assert inputs[k] is v, k
    model = trainer.model.eval()
    with demo.attention_kwargs(model, keys=("cu_seq_lens_q", "max_length_q")) as seen, torch.no_grad():
        model(**inputs)
    assert seen and all(s["cu_seq_lens_q"] is user["cu_seq_lens_q"] and s["max_length_q"] is user["max_length_q"]
                        for s in seen)
