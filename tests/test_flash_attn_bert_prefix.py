"""flash_attn_bert_prefix: flash-attn's BERT loads prefixed and unprefixed checkpoints, strictly.

Every bug scenario runs unpatched first and asserts the bug (KeyError or random weights), then
patched and asserts parity with transformers on real all-MiniLM-L6-v2 (fp32, padded batch).
flash-attn runs on CPU with its CUDA-only pieces replaced by tests/_stubs.py (tests only).
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os

import pytest

import hfpatches
from hfpatches.errors import CheckpointError

PID = "flash_attn_bert_prefix"
LOGGER = f"hfpatches.{PID}"


@pytest.fixture(scope="module")
def fb():
    """flash_attn.models.bert on CPU. Stubs go in *before* the first ``import flash_attn``: the
    package's ``__init__`` already imports the CUDA extension (so ``importorskip`` first would skip)."""
    if importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed on this stack")
    from _stubs import install_flash_attn_cpu_stubs

    install_flash_attn_cpu_stubs()
    import flash_attn.models.bert as mod

    return mod


@pytest.fixture(scope="module")
def demo():
    from hfpatches.demos import flash_attn_bert_prefix as d

    return d


@pytest.fixture(scope="module")
def data(fb, demo, minilm_dir, tmp_path_factory):
    """Real inputs and transformers' reference outputs, computed once per module."""
    root = tmp_path_factory.mktemp("flashbert")
    b = demo.batch(minilm_dir)
    pre = demo.write_pretraining_checkpoint(minilm_dir, str(root / "pretraining"))
    legacy = demo.write_pretraining_checkpoint(minilm_dir, str(root / "legacy"), fmt="legacy_bin")
    ref_hidden, _ = demo.hf_outputs(minilm_dir, b)
    pre_hidden, pre_logits = demo.hf_outputs(pre, b, pretraining=True)
    return dict(src=minilm_dir, b=b, mask=b["attention_mask"], pre=pre, legacy=legacy, root=root,
                ref_hidden=ref_hidden, pre_hidden=pre_hidden, pre_logits=pre_logits)


def cfg(demo, data, **over):
    """A fresh config each load (flash-attn's BertModel pads ``config.vocab_size`` in place)."""
    return demo.flash_config(data["src"], **over)


def delta_hidden(demo, data, model, ref="ref_hidden") -> float:
    return demo.max_delta(demo.flash_hidden(model, data["b"]), data[ref], data["mask"])


def tiny_bert(tmp, *, hidden=32, layers=2, prefixed=True, name="tiny"):
    """A tiny transformers BERT checkpoint (BertForPreTraining when prefixed, else BertModel)."""
    import torch
    import transformers

    c = transformers.BertConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                intermediate_size=2 * hidden, max_position_embeddings=32,
                                position_embedding_type="absolute")
    torch.manual_seed(1)
    cls = transformers.BertForPreTraining if prefixed else transformers.BertModel
    d = os.path.join(str(tmp), name)
    cls(c).save_pretrained(d, safe_serialization=True)
    return d, c


# ----------------------------------------------------------------------------- probe / lifecycle
def test_probe_sees_the_bug_and_the_fix_keeps_rng(fb):
    import torch

    from hfpatches.patches.flash_attn_bert_prefix import PATCH

    state = torch.get_rng_state()
    before = PATCH.probe()
    assert before.bug_present, before  # unfixed upstream: present on both stacks
    assert torch.equal(state, torch.get_rng_state()), "the probe must not move the caller's RNG"
    rep = hfpatches.apply(only=[PID])
    assert rep[PID].outcome == hfpatches.Outcome.APPLIED, rep[PID].reason
    assert not PATCH.probe().bug_present


def test_revert_restores_the_classmethod_identity(fb):
    orig = vars(fb.BertPreTrainedModel)["from_pretrained"]
    assert isinstance(orig, classmethod)
    sig = inspect.signature(fb.BertModel.from_pretrained)
    with hfpatches.patched(PID) as rep:
        assert rep[PID].outcome == hfpatches.Outcome.APPLIED
        assert vars(fb.BertPreTrainedModel)["from_pretrained"] is not orig
        assert hfpatches.get_original(PID) is orig
        for sub in (fb.BertModel, fb.BertForPreTraining):
            assert "from_pretrained" not in vars(sub)      # inherited, not shadowed
            assert inspect.signature(sub.from_pretrained) == sig
    assert vars(fb.BertPreTrainedModel)["from_pretrained"] is orig
    for sub in (fb.BertModel, fb.BertForPreTraining):
        assert "from_pretrained" not in vars(sub)
        assert sub.from_pretrained.__func__ is orig.__func__
        assert sub.from_pretrained.__self__ is sub


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("cls_name", ["BertModel", "BertForPreTraining"])
def test_unprefixed_minilm_matches_transformers(fb, demo, data, cls_name):
    cls = getattr(fb, cls_name)
    with pytest.raises(KeyError, match=r"bert\.encoder\.layers\.0\.attention\.self\.query\.weight"):
        cls.from_pretrained(data["src"], cfg(demo, data))           # the bug
    with hfpatches.patched(PID):
        model = cls.from_pretrained(data["src"], cfg(demo, data)).eval()
    d = delta_hidden(demo, data, model)
    print(f"{cls_name} <- all-MiniLM-L6-v2: max |delta| vs transformers = {d:.2e}")
    assert d <= demo.TOL


@pytest.mark.parametrize("fmt", ["pre", "legacy"], ids=["safetensors", "legacy_bin"])
@pytest.mark.parametrize("cls_name", ["BertModel", "BertForPreTraining"])
def test_prefixed_checkpoint_matches_transformers(fb, demo, data, fmt, cls_name):
    cls, path = getattr(fb, cls_name), data[fmt]
    unpatched = cls.from_pretrained(path, cfg(demo, data)).eval()
    d0 = delta_hidden(demo, data, unpatched, "pre_hidden")
    if cls_name == "BertModel":
        assert d0 > 0.1, f"expected random weights unpatched, got max |delta| {d0}"   # the bug
    else:
        assert d0 <= demo.TOL  # upstream's one working case: the patch must not change it
    with hfpatches.patched(PID):
        model = cls.from_pretrained(path, cfg(demo, data)).eval()
    d = delta_hidden(demo, data, model, "pre_hidden")
    print(f"{cls_name} <- {fmt}: unpatched {d0:.2e}, patched {d:.2e}")
    assert d <= demo.TOL
    if cls_name == "BertForPreTraining":
        dl = demo.max_delta(demo.flash_mlm_logits(model, data["b"]), data["pre_logits"], data["mask"])
        print(f"  MLM logits max |delta| = {dl:.2e}")
        assert dl <= demo.TOL


def test_two_loads_are_bit_identical(fb, demo, data):
    outs = [demo.flash_hidden(fb.BertModel.from_pretrained(data["pre"], cfg(demo, data)).eval(), data["b"])
            for _ in range(2)]
    assert not bool((outs[0] == outs[1]).all()), "unpatched loads should differ (random weights)"
    with hfpatches.patched(PID):
        for path in (data["pre"], data["src"]):
            a, b = (demo.flash_hidden(fb.BertModel.from_pretrained(path, cfg(demo, data)).eval(), data["b"])
                    for _ in range(2))
            assert bool((a == b).all())


def test_sharded_safetensors_with_index(fb, demo, data):
    path = demo.write_pretraining_checkpoint(data["src"], str(data["root"] / "sharded"), shards=3)
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    assert delta_hidden(demo, data, fb.BertModel.from_pretrained(path, cfg(demo, data)).eval(), "pre_hidden") > 0.1
    with hfpatches.patched(PID):
        model = fb.BertModel.from_pretrained(path, cfg(demo, data)).eval()
    assert delta_hidden(demo, data, model, "pre_hidden") <= demo.TOL


def test_pad_vocab_size_multiple(fb, demo, data):
    # transformers' safetensors drop the tied decoder weight, which remap_state_dict pads: KeyError upstream
    with pytest.raises(KeyError, match="cls.predictions.decoder.weight"):
        fb.BertForPreTraining.from_pretrained(data["pre"], cfg(demo, data, pad_vocab_size_multiple=8))
    with hfpatches.patched(PID):
        model = fb.BertForPreTraining.from_pretrained(data["pre"], cfg(demo, data, pad_vocab_size_multiple=8)).eval()
        bare = fb.BertModel.from_pretrained(data["src"], cfg(demo, data, pad_vocab_size_multiple=8)).eval()
    assert model.config.vocab_size == 30528
    logits = demo.flash_mlm_logits(model, data["b"])
    vocab = data["pre_logits"].shape[-1]
    assert demo.max_delta(logits[..., :vocab], data["pre_logits"], data["mask"]) <= demo.TOL
    assert float(logits[..., vocab:].max()) < -50   # flash-attn's padded decoder bias (-100)
    assert delta_hidden(demo, data, bare) <= demo.TOL


def test_last_layer_subset_keeps_flash_attn_remap(fb, demo, data):
    import torch
    from safetensors.torch import load_file

    c = cfg(demo, data, last_layer_subset=True, dense_seq_output=True)
    with hfpatches.patched(PID):
        model = fb.BertForPreTraining.from_pretrained(data["pre"], c)
    ckpt = load_file(os.path.join(data["pre"], "model.safetensors"))
    last = model.bert.encoder.layers[-1].mixer
    assert torch.equal(last.Wq.weight, ckpt["bert.encoder.layer.5.attention.self.query.weight"])
    assert torch.equal(last.Wkv.weight[:384], ckpt["bert.encoder.layer.5.attention.self.key.weight"])


# ----------------------------------------------------------------------------- arguments, subclasses, warnings
def test_inputs_kwargs_and_keywords_still_reach_the_class(fb, demo, data, caplog):
    with hfpatches.patched(PID):
        caplog.set_level(logging.WARNING, logger=LOGGER)
        m1 = fb.BertModel.from_pretrained(model_name=data["src"], config=cfg(demo, data), add_pooling_layer=False)
        m2 = fb.BertModel.from_pretrained(data["src"], cfg(demo, data), False)   # *inputs
    assert m1.pooler is None and m2.pooler is None
    warns = [r for r in caplog.records if r.name == LOGGER]
    assert len(warns) == 2 and all("pooler.dense.weight" in r.getMessage() for r in warns)
    assert delta_hidden(demo, data, m1.eval()) <= demo.TOL


def test_missing_heads_are_one_warning(fb, demo, data, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with hfpatches.patched(PID):
        fb.BertModel.from_pretrained(data["src"], cfg(demo, data))
        assert not [r for r in caplog.records if r.name == LOGGER], "a complete load warns about nothing"
        fb.BertForPreTraining.from_pretrained(data["src"], cfg(demo, data))
    warns = [r for r in caplog.records if r.name == LOGGER]
    assert len(warns) == 1 and warns[0].levelno == logging.WARNING
    msg = warns[0].getMessage()
    assert "BertForPreTraining" in msg and "(7)" in msg and "cls.seq_relationship.weight" in msg
    assert "position_ids" not in msg        # a non-weight buffer: ignored


def test_user_subclass_with_its_own_attribute_name(fb, demo, data, caplog):
    import torch

    class Encoder(fb.BertPreTrainedModel):
        def __init__(self, config, n_labels=3):
            super().__init__(config)
            self.backbone = fb.BertModel(config)
            self.classifier = torch.nn.Linear(config.hidden_size, n_labels)

    caplog.set_level(logging.WARNING, logger=LOGGER)
    with hfpatches.patched(PID):
        model = Encoder.from_pretrained(data["pre"], cfg(demo, data), n_labels=5)
    assert type(model) is Encoder and model.classifier.out_features == 5
    assert demo.max_delta(demo.flash_hidden(model.eval().backbone, data["b"]), data["pre_hidden"], data["mask"]) <= demo.TOL
    (msg,) = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert "classifier.weight" in msg and "cls.seq_relationship.weight" in msg


# ----------------------------------------------------------------------------- clear errors
def test_other_architecture_is_a_clear_error(fb, demo, data, tmp_path):
    import torch
    import transformers

    c = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    path = str(tmp_path / "llama")
    transformers.LlamaForCausalLM(c).save_pretrained(path, safe_serialization=True)
    with pytest.raises(KeyError):
        fb.BertModel.from_pretrained(path, cfg(demo, data))        # upstream: a bare KeyError
    with hfpatches.patched(PID), pytest.raises(CheckpointError) as ei:
        fb.BertModel.from_pretrained(path, cfg(demo, data))
    msg = str(ei.value)
    for part in ("BertModel.from_pretrained", path, "not a BERT checkpoint", "LlamaForCausalLM",
                 "embeddings.word_embeddings.weight", "model.embed_tokens.weight", "unexpected checkpoint weights"):
        assert part in msg, (part, msg)


def test_other_hidden_size_is_a_clear_error(fb, demo, data, tmp_path):
    path, c = tiny_bert(tmp_path, hidden=32)
    wrong = demo.flash_config(path, hidden_size=64, intermediate_size=64)
    fb.BertModel.from_pretrained(path, wrong)          # upstream: returns a random model silently
    with hfpatches.patched(PID), pytest.raises(CheckpointError) as ei:
        fb.BertModel.from_pretrained(path, demo.flash_config(path, hidden_size=64, intermediate_size=64))
    msg = str(ei.value)
    assert "shape mismatches" in msg and "embeddings.word_embeddings.weight: checkpoint [64, 32] vs model [64, 64]" in msg
    assert "hidden size is 32, config.hidden_size is 64" in msg
    assert isinstance(ei.value, ValueError)


def test_truncated_safetensors_is_a_clear_error(fb, demo, data, tmp_path):
    d = tmp_path / "truncated"
    d.mkdir()
    src = os.path.join(data["src"], "model.safetensors")
    with open(src, "rb") as f:
        blob = f.read()
    (d / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    (d / "config.json").write_text(open(os.path.join(data["src"], "config.json")).read())
    with pytest.raises(Exception) as raw:
        fb.BertModel.from_pretrained(str(d), cfg(demo, data))
    assert not isinstance(raw.value, CheckpointError)
    with hfpatches.patched(PID), pytest.raises(CheckpointError, match="truncated or corrupted") as ei:
        fb.BertModel.from_pretrained(str(d), cfg(demo, data))
    assert str(d) in str(ei.value)


def test_layer_count_mismatch_is_a_clear_error(fb, demo, data):
    fewer = fb.BertForPreTraining.from_pretrained(data["pre"], cfg(demo, data, num_hidden_layers=4))
    assert len(fewer.bert.encoder.layers) == 4           # upstream: layers 4-5 dropped silently
    with hfpatches.patched(PID):
        with pytest.raises(CheckpointError) as more:
            fb.BertModel.from_pretrained(data["src"], cfg(demo, data, num_hidden_layers=8))
        with pytest.raises(CheckpointError) as less:
            fb.BertForPreTraining.from_pretrained(data["pre"], cfg(demo, data, num_hidden_layers=4))
    assert "encoder.layer.6.attention.self.query.weight" in str(more.value)
    assert "the checkpoint has 6 encoder layers, config.num_hidden_layers is 8" in str(more.value)
    m = str(less.value)
    assert "unexpected checkpoint weights (" in m and "bert.encoder.layers.4." in m and "(+" in m  # first 10 + count
    assert "the checkpoint has 6 encoder layers, config.num_hidden_layers is 4" in m


# ----------------------------------------------------------------------------- .bin safety
class _NotATensor:
    pass


@pytest.mark.parametrize("form", ["legacy", "sharded"])
def test_bin_is_read_with_weights_only(fb, demo, data, monkeypatch, stack, form):
    import torch

    from hfpatches.patches import flash_attn_bert_prefix as mod

    if form == "legacy":
        path = data["legacy"]
    else:
        path = demo.write_pretraining_checkpoint(data["src"], str(data["root"] / "bin_sharded"), fmt="bin", shards=3)
    index = os.path.join(path, "pytorch_model.bin.index.json")
    files = 1 if form == "legacy" else len(set(json.load(open(index))["weight_map"].values()))
    assert files >= (1 if form == "legacy" else 2)

    upstream_safe = mod._upstream_bin_is_safe(fb.state_dict_from_pretrained)
    assert upstream_safe == (stack == "latest")   # 2.8.3 lacks weights_only=True; 2.8.3.post2 has it
    monkeypatch.setattr(mod, "_upstream_bin_is_safe", lambda fn: False)   # our reader on both stacks
    calls = []
    real = torch.load

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    with hfpatches.patched(PID):
        model = fb.BertModel.from_pretrained(path, cfg(demo, data)).eval()
    assert len(calls) == files and all(kw.get("weights_only") is True for kw in calls), calls
    assert delta_hidden(demo, data, model, "pre_hidden") <= demo.TOL


def test_bin_with_pickled_objects_is_refused(fb, demo, data, tmp_path, monkeypatch):
    import torch

    from hfpatches.patches import flash_attn_bert_prefix as mod

    monkeypatch.setattr(mod, "_upstream_bin_is_safe", lambda fn: False)
    d = tmp_path / "evil"
    d.mkdir()
    torch.save({"embeddings.word_embeddings.weight": torch.zeros(2, 2), "x": _NotATensor()}, d / "pytorch_model.bin")
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with hfpatches.patched(PID), pytest.raises(CheckpointError, match="weights_only"):
        fb.BertModel.from_pretrained(str(d), cfg(demo, data))


# ----------------------------------------------------------------------------- how the weights land
def test_complete_checkpoint_takes_the_tensors_and_keeps_ties(fb, demo, data):
    import torch

    with hfpatches.patched(PID):
        for path in (data["pre"], data["legacy"]):   # safetensors lack the tied decoder weight; .bin has it
            model = fb.BertForPreTraining.from_pretrained(path, cfg(demo, data))
            assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
            params = dict(model.named_parameters())
            assert not any(p.is_meta for p in params.values())
            assert all(p.requires_grad and p.dtype == torch.float32 for p in params.values())
            assert len(params) == len(set(map(id, model.parameters())))


def test_training_the_loaded_model_never_writes_the_checkpoint(fb, demo, data, tmp_path):
    import hashlib
    import shutil

    import torch

    d = tmp_path / "ckpt"
    shutil.copytree(data["src"], d, ignore=shutil.ignore_patterns("1_Pooling"))
    digest = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    with hfpatches.patched(PID):
        model = fb.BertModel.from_pretrained(str(d), cfg(demo, data))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(data["b"]["input_ids"]).last_hidden_state.square().mean().backward()
    opt.step()
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.add_(1.0)
    assert hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest() == digest


def test_half_precision_checkpoint_lands_in_the_model_dtype(fb, demo, data, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    d = tmp_path / "fp16"
    d.mkdir()
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in
          load_file(os.path.join(data["src"], "model.safetensors")).items()}
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with hfpatches.patched(PID):
        model = fb.BertModel.from_pretrained(str(d), cfg(demo, data)).eval()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(model.embeddings.word_embeddings.weight, sd["embeddings.word_embeddings.weight"].float())
    assert delta_hidden(demo, data, model) < 1e-2   # fp16 rounding of the weights only


# ----------------------------------------------------------------------------- the meta build skips initialisers
FILLS = ("normal_", "uniform_", "fill_", "zero_")


def meta_fills(fn):
    """Runs ``fn`` and counts the value-filling aten ops it runs on meta tensors (a dispatch mode
    that only watches)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in FILLS and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
                seen.append(name)
            return func(*args, **(kwargs or {}))

    with Watch():
        out = fn()
    return out, seen


def test_meta_build_runs_no_initialiser_and_leaves_rng(fb, demo, data):
    import torch

    with torch.device("meta"):
        _, plain_meta = meta_fills(lambda: fb.BertModel(cfg(demo, data)))
    assert plain_meta, "the watcher must see the initialisers of a plain meta build (else this test proves nothing)"
    with hfpatches.patched(PID):
        torch.manual_seed(7)
        state = torch.get_rng_state()
        model, seen = meta_fills(lambda: fb.BertModel.from_pretrained(data["src"], cfg(demo, data)))
        assert torch.equal(state, torch.get_rng_state()), "a complete load must not move the caller's RNG"
    assert seen == [], f"initialiser kernels ran on meta tensors during the patched load: {seen[:10]}"
    assert not any(p.is_meta for p in model.parameters())
    assert delta_hidden(demo, data, model.eval()) < 5e-5


def test_initialiser_skipping_is_thread_local_and_meta_only(fb):
    import threading

    import torch

    from hfpatches.patches.flash_attn_bert_prefix import _skip_meta_init

    def reference():
        torch.manual_seed(3)
        return torch.nn.Linear(8, 8), torch.nn.init.normal_(torch.empty(5)), torch.empty(5).uniform_()

    ref = reference()
    entered, release, failed = threading.Event(), threading.Event(), []

    def holder():
        try:
            with torch.device("meta"), _skip_meta_init():
                m = torch.nn.Linear(8, 8)
                assert m.weight.is_meta
                entered.set()
                release.wait(30)
        except BaseException as e:  # noqa: BLE001 - reported to the main thread below
            failed.append(e)
            entered.set()

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert entered.wait(30)
        # another thread is inside the meta build: this thread still builds on CPU, initialised
        got = reference()
    finally:
        release.set()
        t.join(30)
    assert not failed, failed
    assert got[0].weight.device.type == "cpu"
    assert torch.equal(got[0].weight, ref[0].weight) and torch.equal(got[0].bias, ref[0].bias)
    assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
    # in the building thread itself, a tensor that is not on meta is still initialised
    with _skip_meta_init():
        same = reference()
    assert all(torch.equal(a, b) for a, b in zip(same[1:], ref[1:]))
    assert torch.equal(same[0].weight, ref[0].weight)
    # and the mode is gone after an error inside it
    with pytest.raises(ValueError), torch.device("meta"), _skip_meta_init():
        raise ValueError("boom")
    assert torch.equal(reference()[0].weight, ref[0].weight)
