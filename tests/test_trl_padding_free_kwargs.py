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
from hfpatches.patches.trl_padding_free_kwargs import impl as tpf  # noqa: E402
from hfpatches._registry import registry  # noqa: E402

PID = tpf.PATCH_ID
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


def _is_documented(kw: dict) -> bool:
    return (set(kw) == set(KEYS) and all(kw[k].dim() == 1 and kw[k].dtype == torch.int32
                                         for k in ("cu_seq_lens_q", "cu_seq_lens_k"))
            and all(type(kw[k]) is int for k in ("max_length_q", "max_length_k")))


# ----------------------------------------------------------------------------- outcome & probe
def test_declaration():
    p = registry()[PID]
    assert p.requires == ("trl>=0.16.0,<0.20",) and p.fixed_in == "trl>=0.20"
    assert p.upstream == ("huggingface/trl#3243",) and p.default_enabled
    assert p.modules == ("trl.trainer.utils", "transformers.trainer")
    assert [t.path for t in p.targets] == ["trl.trainer.utils.DataCollatorForCompletionOnlyLM.torch_call",
                                           "transformers.trainer.Trainer._prepare_inputs"]


def test_outcome_per_stack(stack, modules):
    _, tr = modules
    original = vars(tr.Trainer)["_prepare_inputs"]
    collator_call = getattr(getattr(modules[0], "DataCollatorForCompletionOnlyLM", None), "torch_call", None)
    rep = hfpatches.apply(only=[PID])[PID]
    if stack == "affected":
        assert rep.outcome == hfpatches.Outcome.APPLIED and rep.in_range and rep.bug_present, rep
        assert type(vars(tr.Trainer)["_prepare_inputs"]).__name__ == "FunctionWrapper"
        assert hfpatches.get_original(PID)["transformers.trainer.Trainer._prepare_inputs"] is original
        assert hfpatches.apply(only=[PID])[PID].outcome == hfpatches.Outcome.ALREADY_APPLIED
    else:
        assert rep.outcome == hfpatches.Outcome.NOT_AFFECTED, rep
        assert "outside the affected range" in rep.reason and "trl>=0.20" in rep.reason
        assert not hasattr(modules[0], "DataCollatorForCompletionOnlyLM")
    # the collator itself is never touched
    assert getattr(getattr(modules[0], "DataCollatorForCompletionOnlyLM", None), "torch_call", None) is collator_call
    hfpatches.revert([PID])
    assert vars(tr.Trainer)["_prepare_inputs"] is original


def test_probe_is_behavioural(stack, modules):
    if stack != "affected":
        pytest.skip("no DataCollatorForCompletionOnlyLM in trl >= 0.20: nothing to probe")
    before = tpf.probe()
    assert before.bug_present, before
    assert "emits cu_seq_lens_q a (1, 4) int32 tensor, max_length_q a (1,) int64 tensor" in before.detail
    assert "hands the model cu_seq_lens_q a (1, 4) int32 tensor" in before.detail
    _apply()
    after = tpf.probe()
    assert not after.bug_present and "the model gets cu_seq_lens_q a (4,) int32 tensor, max_length_q an int" \
        in after.detail, after
    hfpatches.revert([PID])
    assert tpf.probe().bug_present


# ----------------------------------------------------------------------------- the conversion
def test_documented_converts_exactly_trls_form(batch):
    """(1, n+1) -> its 1-D int32 view (same storage, same boundaries), 1-element tensor -> int;
    every other value is the same object, the mapping keeps its type, cu_seq_lens_k stays the
    same object as cu_seq_lens_q, and the input batch is not modified."""
    assert batch["cu_seq_lens_k"] is batch["cu_seq_lens_q"]
    before = dict(batch)
    out = tpf.documented(batch)
    assert type(out) is type(batch) and out is not batch
    assert dict(batch) == before and all(batch[k] is v for k, v in before.items())
    assert _is_documented({k: out[k] for k in KEYS})
    assert out["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_q"][0].tolist() == \
        [s for s, _ in demo.segments(batch)] + [batch["input_ids"].shape[1]]
    assert out["cu_seq_lens_q"].data_ptr() == batch["cu_seq_lens_q"].data_ptr()   # a view, no copy
    assert out["cu_seq_lens_k"] is out["cu_seq_lens_q"]
    assert out["max_length_q"] == out["max_length_k"] == max(e - s for s, e in demo.segments(batch))
    for k in set(batch) - set(KEYS):
        assert out[k] is batch[k], k
    assert tpf.documented(out) is out                   # already documented: untouched


def test_documented_leaves_everything_else_alone():
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    plain = {"input_ids": torch.zeros(1, 7, dtype=torch.long)}
    assert tpf.documented(plain) is plain
    doc = {"cu_seq_lens_q": cu, "max_length_q": 4}
    assert tpf.documented(doc) is doc
    for odd in (torch.stack([cu, cu]),            # two rows: not TRL's form, ambiguous
                cu[None].float(),                 # not integer
                torch.ones(1, 3, dtype=torch.bool)):
        b = {"cu_seq_lens_q": odd}
        assert tpf.documented(b) is b
    assert tpf.documented({"max_length_q": torch.tensor([3, 4])})["max_length_q"].shape == (2,)
    wide = tpf.documented({"cu_seq_lens_q": cu[None].long(), "max_length_k": torch.tensor(4)})
    assert wide["cu_seq_lens_q"].dtype == torch.int32 and wide["cu_seq_lens_q"].shape == (3,)
    assert wide["max_length_k"] == 4 and type(wide["max_length_k"]) is int
    assert tpf.documented([1, 2]) == [1, 2] and tpf.documented(None) is None


# ----------------------------------------------------------------------------- the model side
def test_attention_modules_get_the_documented_form(stack, batch, trainer):
    """A real Trainer's input preparation, then the tiny Llama (sdpa): every attention module
    gets TRL's form without the patch and the documented form with it; same loss, bit for bit
    (sdpa does not use the keys); labels/position_ids/input_ids are the same tensors."""
    model = trainer.model.eval()
    runs = {}
    for stage in ("unpatched", "patched"):
        if stage == "patched":
            _apply()
        inputs = trainer._prepare_inputs(batch)
        with demo.attention_kwargs(model) as seen, torch.no_grad():
            runs[stage] = (model(**inputs).loss, seen, inputs)
    (loss0, seen0, in0), (loss1, seen1, in1) = runs["unpatched"], runs["patched"]
    assert len(seen0) == len(seen1) == model.config.num_hidden_layers
    assert all(tuple(s["cu_seq_lens_q"].shape) == (1, 4) and torch.is_tensor(s["max_length_q"]) for s in seen0)
    assert all(_is_documented(s) for s in seen1), seen1
    assert all(s["cu_seq_lens_q"] is in1["cu_seq_lens_q"] for s in seen1)
    assert torch.equal(loss0, loss1)
    for k in ("input_ids", "labels", "position_ids"):
        assert torch.equal(in0[k], in1[k]) and in1[k].data_ptr() == in0[k].data_ptr(), k


@pytest.mark.parametrize("trainer_stage", ["unpatched", "patched"])
def test_flash_attention_2_per_sequence(stack, batch, trainer, monkeypatch, trainer_stage):
    """FlashAttention-2 (pure-torch varlen stand-in) on the packed batch from Trainer's input
    preparation. Unpatched: the kernel's RuntimeError. Patched: the varlen function gets the
    batch's own boundaries (the very tensor, and max_length as an int), each sequence's logits
    equal those of the sequence run alone (atol 1e-5: float32, the two differ only in
    summation order of the same per-sequence attention), and the loss equals the token-weighted
    loss of the sequences run one by one (rel 1e-6)."""
    if stack != "affected":
        pytest.skip("transformers 5's FlashAttention path is not the 4.51 one the stand-in replaces; "
                    "trl >= 0.20 has no DataCollatorForCompletionOnlyLM")
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
        with demo.attention_kwargs(model) as seen:
            out = model(**inputs)
    assert all(_is_documented(s) for s in seen)
    varlen = [c for c in ref.calls]
    assert len(varlen) == model.config.num_hidden_layers
    assert all(c["cu_seqlens_q"] is inputs["cu_seq_lens_q"] and c["max_seqlen_q"] == inputs["max_length_q"]
               and type(c["max_seqlen_q"]) is int for c in varlen)
    ref.calls.clear()
    assert demo.per_sequence_gap(model, inputs, out.logits) <= 1e-5
    assert ref.calls == []            # each sequence alone went through flash_attn_func (no varlen)
    total, count = 0.0, 0
    with torch.no_grad():
        for s, e in demo.segments(inputs):
            n = int((inputs["labels"][:, s + 1:e] != -100).sum())
            if n:
                total += model(input_ids=inputs["input_ids"][:, s:e], labels=inputs["labels"][:, s:e],
                               position_ids=inputs["position_ids"][:, s:e]).loss.item() * n
                count += n
    assert abs(out.loss.item() - total / count) <= 1e-6 * abs(total / count)


# ----------------------------------------------------------------------------- with liger_flash_kwargs
def test_with_liger_flash_kwargs_the_decoder_gets_the_keys(stack, batch, trainer, monkeypatch):
    """liger_flash_kwargs hands FlashAttention keys from Liger 0.5.6's forward to the decoder only
    in the documented form. With TRL's batch alone it refuses them (the decoder recomputes the
    boundaries from position_ids in every layer); with this patch live too, the decoder and every
    attention layer get the batch's precomputed boundaries: FlashAttention-2 (stand-in) is called
    with the batch's own cu_seq_lens. Eval mode, no labels: Liger's Triton kernel is not involved."""
    if stack != "affected":
        pytest.skip("liger-kernel >= 0.6 passes the keys itself; trl >= 0.20 has no such collator")
    pytest.importorskip("liger_kernel")
    from _fa_ref import install

    from hfpatches.demos import liger_flash_kwargs as liger_demo

    ref = install(monkeypatch)
    model = trainer.model.eval()
    model.config._attn_implementation = "flash_attention_2"
    inputs_of = {}
    got = {}
    with liger_demo.liger_forward("llama"):
        for stage, ids in (("liger only", ["liger_flash_kwargs"]),
                           ("both", ["liger_flash_kwargs", PID])):
            rep = hfpatches.apply(only=ids)
            assert all(rep[i].outcome == hfpatches.Outcome.APPLIED for i in ids), rep
            liger_demo.apply_liger("llama")        # Liger after hfpatches (TRL/Trainer order)
            inputs = inputs_of[stage] = trainer._prepare_inputs(batch)
            feed = {k: v for k, v in inputs.items() if k != "labels"}
            ref.calls.clear()
            with liger_demo.keys_seen(model, KEYS) as keys, torch.no_grad():
                logits = model(**feed).logits
            got[stage] = (sorted(keys["decoder"]), sorted(keys["attention"]), list(ref.calls), logits)
            hfpatches.revert(ids)
    dec, att, calls, logits_liger_only = got["liger only"]
    assert dec == [] and att == [], "liger_flash_kwargs is expected to refuse TRL's (1, n+1) form"
    assert calls and all(c["cu_seqlens_q"] is not inputs_of["liger only"]["cu_seq_lens_q"] for c in calls)
    dec, att, calls, logits_both = got["both"]
    assert dec == att == sorted(KEYS)
    assert len(calls) == model.config.num_hidden_layers
    assert all(c["cu_seqlens_q"] is inputs_of["both"]["cu_seq_lens_q"] and type(c["max_seqlen_q"]) is int
               for c in calls)
    assert torch.equal(logits_liger_only, logits_both)   # same boundaries, precomputed instead of derived


# ----------------------------------------------------------------------------- dataloader dispatch & SFTTrainer (child)
CHILD = r'''
import json, math, sys, tempfile, warnings
warnings.filterwarnings("ignore")
import torch
import hfpatches
from hfpatches.demos import trl_padding_free_kwargs as D
from hfpatches.patches.trl_padding_free_kwargs import impl as P
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
    out["dispatch_documented"] = through_dispatch(lambda ex: P.documented(coll(ex)))
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
            out["direct_loss"] = model(**P.documented(direct)).loss.item()
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
    conversion happens after dispatch, in Trainer._prepare_inputs."""
    if stack != "affected":
        pytest.skip("trl >= 0.20 has no DataCollatorForCompletionOnlyLM")
    assert child["dispatch_trl_form"]["loader"] == "DataLoaderDispatcher"
    assert child["dispatch_trl_form"]["cu"] == child["collated"]["cu"]
    assert child["dispatch_trl_form"]["max"] == child["collated"]["max"]
    assert "Can only concatenate tensors" in child["dispatch_documented"]["error"], child
    assert child["dispatch_cu_only"]["cu"] == [0], child


@pytest.mark.slow
def test_sft_trainer_step_flash_attention_2(stack, child):
    """One real trl.SFTTrainer step with TRL's padding-free collator and flash_attention_2
    (stand-in kernel): the kernel's RuntimeError without hfpatches; with it every attention layer
    gets the documented form, the kernel gets the batch's boundaries, and the step's loss equals
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
    assert r["attention_forms"] == [json.dumps({"cu_seq_lens_q": "(4,) int32", "cu_seq_lens_k": "(4,) int32",
                                                "max_length_q": "int", "max_length_k": "int"})], r
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
