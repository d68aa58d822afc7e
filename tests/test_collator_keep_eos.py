"""collator_keep_eos (opt-in): DataCollatorForLanguageModeling(mlm=False) with pad == eos.

Real transformers collator and a word-level tokenizer built in memory (no hub). Unpatched, every
real EOS gets label -100 (both stacks: upstream keeps it by design, transformers#23530); patched,
only the padding does, every other label is upstream's.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

import hfpatches  # noqa: E402
from hfpatches import Outcome  # noqa: E402
from hfpatches._engine import run_probe  # noqa: E402
from hfpatches.demos import collator_keep_eos as D  # noqa: E402
from hfpatches.patches.collator_keep_eos import impl as P  # noqa: E402

PID = P.PATCH_ID
VARIANTS = [dict(return_tensors=rt, as_dicts=d, padding_side=side)
            for rt in ("pt", "np") for d in (True, False) for side in ("right", "left")]


def _ids(v):
    return f"{v['return_tensors']}-{'dicts' if v['as_dicts'] else 'lists'}-{v['padding_side']}"


def _apply():
    r = hfpatches.apply(only=[PID])[PID]
    assert (r.outcome, r.reason) == (Outcome.APPLIED, "probe found the bug; fix applied and verified"), r


def _labels(batch):
    return np.asarray(batch["labels"].tolist())


@pytest.mark.parametrize("v", VARIANTS, ids=_ids)
def test_unpatched_masks_every_real_eos(v):
    r = D.collate(**v)
    assert r["real_eos_masked"] == r["real_eos"] == 4, r


@pytest.mark.parametrize("v", VARIANTS, ids=_ids)
def test_patched_masks_only_padding(v):
    before = D.collate(**v)
    _apply()
    after = D.collate(**v)
    assert after["real_eos_masked"] == 0 and after["padding_labelled"] == 0, after
    assert type(after["batch"]["labels"]) is type(before["batch"]["labels"])
    assert after["batch"]["labels"].dtype == before["batch"]["labels"].dtype
    ids = np.asarray(after["batch"]["input_ids"].tolist())
    b, a = _labels(before["batch"]), _labels(after["batch"])
    changed = b != a
    # the only change: real EOS positions get their token back
    assert (ids[changed] == P.tiny_tokenizer().eos_token_id).all() and (a[changed] == ids[changed]).all()
    assert changed.sum() == 4
    assert np.array_equal(np.asarray(before["batch"]["input_ids"].tolist()), ids)


@pytest.mark.parametrize("rt", ["pt", "np"])
def test_pad_to_multiple_of(rt):
    _apply()
    r = D.collate(return_tensors=rt, pad_to_multiple_of=8)
    assert len(r["batch"]["input_ids"][0]) == 8
    assert r["real_eos_masked"] == 0 and r["padding_labelled"] == 0, r


@pytest.mark.parametrize("rt", ["pt", "np"])
def test_example_own_attention_mask_marks_padding(rt):
    """An example padded before the collator (its attention_mask says where): those pads stay
    -100; its real EOS keeps its label."""
    from transformers import DataCollatorForLanguageModeling

    _apply()
    tok = P.tiny_tokenizer()
    eos = tok.eos_token_id
    exs = [{"input_ids": [3, 4, eos, eos, eos], "attention_mask": [1, 1, 1, 0, 0]},
           {"input_ids": [5, eos], "attention_mask": [1, 1]}]
    labels = DataCollatorForLanguageModeling(tok, mlm=False, return_tensors=rt)(exs)["labels"].tolist()
    assert labels == [[3, 4, eos, -100, -100], [5, eos, -100, -100, -100]]


@pytest.mark.parametrize("rt", ["pt", "np"])
def test_distinct_pad_token_bit_identical(rt):
    before = D.collate(return_tensors=rt, pad_is_eos=False)
    _apply()
    after = D.collate(return_tensors=rt, pad_is_eos=False)
    assert before["real_eos_masked"] == after["real_eos_masked"] == 0
    for k in before["batch"]:
        assert np.array_equal(np.asarray(before["batch"][k].tolist()), np.asarray(after["batch"][k].tolist())), k


def test_equal_lengths_nothing_padded():
    _apply()
    from transformers import DataCollatorForLanguageModeling

    tok = P.tiny_tokenizer()
    eos = tok.eos_token_id
    out = DataCollatorForLanguageModeling(tok, mlm=False)([[3, eos], [4, eos]])
    assert out["labels"].tolist() == [[3, eos], [4, eos]]


def test_mlm_and_tf_untouched():
    from transformers import DataCollatorForLanguageModeling as C

    raw_tf = vars(C).get("tf_call")   # transformers 5 has no TF path
    _apply()
    assert vars(C).get("tf_call") is raw_tf
    fake = type("X", (), {"mlm": True, "tokenizer": P.tiny_tokenizer()})()
    assert not P._applies(fake)


def test_revert_identity():
    from transformers import DataCollatorForLanguageModeling as C

    raw = {n: vars(C)[n] for n in ("torch_call", "numpy_call")}
    _apply()
    assert all(vars(C)[n] is not raw[n] for n in raw)
    hfpatches.revert([PID])
    assert all(vars(C)[n] is raw[n] for n in raw)
    assert D.collate()["real_eos_masked"] == 4


def test_probe():
    import transformers.data.data_collator  # noqa: F401

    assert run_probe(PID).bug_present is True
    _apply()
    assert run_probe(PID).bug_present is False


def test_opt_in_default_off():
    import transformers.data.data_collator  # noqa: F401

    r = hfpatches.apply()[PID]
    assert r.outcome == Outcome.DISABLED and "HFPATCHES_COLLATOR_KEEP_EOS=1" in r.reason, r


ENV_CHILD = r'''
import json, hfpatches
import transformers.data.data_collator
try:
    r = hfpatches.apply()["collator_keep_eos"]
    print("RESULT " + json.dumps([r.outcome.value, r.reason]))
except ValueError as e:
    print("RESULT " + json.dumps(["ValueError", str(e)]))
'''


def test_env_switch(py):
    from hfpatches import _env

    assert _env.COLLATOR_KEEP_EOS == "HFPATCHES_COLLATOR_KEEP_EOS" and _env.COLLATOR_KEEP_EOS in _env.ALL
    out = {}
    for val in ("1", "maybe"):
        proc = py(ENV_CHILD, env={"HFPATCHES_COLLATOR_KEEP_EOS": val})
        out[val] = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    assert out["1"][0] == "APPLIED", out
    assert out["maybe"][0] == "ValueError" and "HFPATCHES_COLLATOR_KEEP_EOS" in out["maybe"][1], out


def test_declaration():
    from hfpatches._registry import registry

    p = registry()[PID]
    assert not p.default_enabled and p.enable_env == "HFPATCHES_COLLATOR_KEEP_EOS" and p.fixed_in is None
    doc = __import__(f"hfpatches.patches.{PID}", fromlist=["PATCH"]).__doc__
    assert len(doc.strip().splitlines()) <= 30
    heads = [ln for ln in doc.splitlines() if ln and not ln.startswith(" ")][1:]
    assert heads == ["Bug", "Affected", "Upstream", "Probe", "What changes"], heads


@pytest.mark.parametrize("rt", ["pt", "np"])
@pytest.mark.parametrize("as_dicts", [True, False])
def test_prepadded_without_attention_mask_never_labels_padding(rt, as_dicts):
    """Examples padded with EOS before the collator, with no attention_mask: nothing says where
    the padding starts, so a run of EOS keeps upstream's -100 (the padding must never get a
    label); a lone EOS in the same batch still gets its label back."""
    from transformers import DataCollatorForLanguageModeling

    _apply()
    tok = P.tiny_tokenizer()
    eos = tok.eos_token_id
    rows = [[3, 4, eos, eos, eos], [5, eos, 6, eos, eos], [3, eos, 4]]
    examples = [{"input_ids": r} for r in rows] if as_dicts else rows
    labels = _labels(DataCollatorForLanguageModeling(tokenizer=tok, mlm=False, return_tensors=rt)(examples))
    assert labels.tolist() == [[3, 4, -100, -100, -100], [5, eos, 6, -100, -100], [3, eos, 4, -100, -100]]
