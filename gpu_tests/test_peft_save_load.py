"""peft_save_load on CUDA: all-MiniLM-L6-v2 + LoRA(r=4) in bfloat16 on the GPU predicts, trains,
saves and reloads (onto the GPU again) with the same scores; the float32 policy and bf16 mean
sub-token pooling run on CUDA too; ``peft_state_dict(merge=True)`` of a bf16 CUDA model gives a
plain BertModel that computes the same hidden states (within bf16 rounding).

Unpatched, the bf16 predict fails on CUDA exactly as on the CPU (asserted first).
"""
from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
pytest.importorskip("flair")
pytest.importorskip("peft")

import hfpatches  # noqa: E402
from hfpatches.demos import peft_save_load as demo  # noqa: E402

PID = "peft_save_load"


@pytest.fixture(autouse=True)
def flair_on_cuda():
    import flair

    before = flair.device
    flair.device = torch.device("cuda")
    yield
    flair.device = before


def _device_types(model) -> set[str]:
    return {p.device.type for p in model.parameters()}


def test_bf16_cuda_predict_train_save_reload_equal(tmp_path):
    from flair.models import TextClassifier

    model = demo.build_classifier(dtype=torch.bfloat16)
    assert _device_types(model) == {"cuda"}
    with pytest.raises(RuntimeError, match="dtype"):
        demo.scores(model)                                               # the bug, on CUDA
    rep = hfpatches.apply(only=[PID])
    assert rep[PID].outcome == hfpatches.Outcome.APPLIED, rep[PID].reason
    losses = demo.train(model, demo.labelled())
    assert all(math.isfinite(x) for x in losses)
    assert model.decoder.weight.dtype == torch.bfloat16
    want = demo.scores(model)
    path = str(tmp_path / "bf16_cuda.pt")
    with demo.quiet():
        model.save(path)
        again = TextClassifier.load(path)
    assert _device_types(again) == {"cuda"} and again.decoder.weight.dtype == torch.bfloat16
    got = demo.scores(again)
    assert [[lab for lab, _ in r] for r in got] == [[lab for lab, _ in r] for r in want]
    assert demo.max_diff(want, got) <= 1e-6, (want, got)
    (loss,) = demo.train(again, demo.labelled(), steps=1)                # and it trains on
    assert math.isfinite(loss)


def test_float32_policy_on_cuda(tmp_path, monkeypatch):
    from hfpatches import _env

    model = demo.build_classifier(dtype=torch.bfloat16, seed=1)
    hfpatches.apply(only=[PID])
    monkeypatch.setenv(_env.DTYPE_POLICY, "float32")
    (loss,) = demo.train(model, demo.labelled(), steps=1)
    assert math.isfinite(loss)
    assert {p.dtype for p in model.parameters()} == {torch.float32} and _device_types(model) == {"cuda"}
    want = demo.scores(model)
    path = str(tmp_path / "f32_cuda.pt")
    with demo.quiet():
        model.save(path)
    import hfpatches.flair as hf

    with demo.quiet():
        again = hf.load(path)
    assert {p.dtype for p in again.parameters()} == {torch.float32}
    assert demo.max_diff(want, demo.scores(again)) <= 1e-6


def test_bf16_mean_pooling_on_cuda():
    emb = demo.embeddings("word", dtype=torch.bfloat16, peft=False, subtoken_pooling="mean")
    with pytest.raises(RuntimeError, match="scatter"):
        demo.mean_pooled(emb)
    hfpatches.apply(only=[PID])
    got = demo.mean_pooled(emb)
    assert got.dtype == torch.bfloat16 and got.device.type == "cuda" and torch.isfinite(got.float()).all()


def test_merge_of_a_bf16_cuda_model_gives_a_plain_bert():
    from transformers import AutoTokenizer, BertModel

    from hfpatches._models import minilm_dir

    model = demo.build_classifier(dtype=torch.bfloat16, seed=2)
    hfpatches.apply(only=[PID])
    demo.train(model, demo.labelled())
    pm = model.embeddings.model
    sd = hfpatches.peft_state_dict(pm, merge=True)
    assert {v.dtype for v in sd.values() if v.is_floating_point()} == {torch.bfloat16}
    plain = BertModel(pm.base_model.model.config).to(device="cuda", dtype=torch.bfloat16).eval()
    plain.load_state_dict(sd, strict=True)
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    batch = {k: v.cuda() for k, v in tok(demo.HELD_OUT, padding=True, return_tensors="pt").items()}
    with torch.no_grad():
        a = pm(**batch).last_hidden_state.float()
        b = plain(**batch).last_hidden_state.float()
    # bf16 weights: W + scale*B@A rounded once to bf16 vs computed per call; same order of error as bf16 itself
    assert float((a - b).abs().max()) <= 0.05 * float(a.abs().max()), float((a - b).abs().max())
