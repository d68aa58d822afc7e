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

    from hfpatches._engine import run_probe

    def probe():
        return run_probe(PID)

    state = torch.get_rng_state()
    before = probe()
    assert before.bug_present, before  # unfixed upstream: present on both stacks
    assert torch.equal(state, torch.get_rng_state()), "the probe must not move the caller's RNG"
    rep = hfpatches.apply(only=[PID])
    assert rep[PID].outcome == hfpatches.Outcome.APPLIED, rep[PID].reason
    assert not probe().bug_present


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
    for part in ("BertModel.from_pretrained", os.path.join(path, "config.json"), "not a BERT checkpoint",
                 "model_type 'llama'", "LlamaForCausalLM", "expected model_type 'bert'", "AutoModel.from_pretrained"):
        assert part in msg, (part, msg)
    os.remove(os.path.join(path, "config.json"))      # judged by its keys alone
    with hfpatches.patched(PID), pytest.raises(CheckpointError) as ei:
        fb.BertModel.from_pretrained(path, cfg(demo, data))
    msg = str(ei.value)
    for part in ("not a BERT checkpoint", "no 'embeddings.word_embeddings.weight' under any prefix", "model.",
                 "AutoModel.from_pretrained"):
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
    # two whole layers are missing: all 2 x 16 of their weights, not only the 2 x 6 of Q/K/V
    assert "missing backbone weights (32): " in str(more.value) and "(+22 more)" in str(more.value)
    assert "encoder.layer.6.attention.output.LayerNorm.bias" in str(more.value)
    assert "layers missing entirely: 6, 7" in str(more.value)
    m = str(less.value)
    assert "unexpected checkpoint weights (" in m and "bert.encoder.layers.4." in m and "(+" in m  # first 10 + count
    assert "the checkpoint has 6 encoder layers, config.num_hidden_layers is 4" in m


# ----------------------------------------------------------------------------- .bin safety
class _NotATensor:
    pass


@pytest.mark.parametrize("form", ["legacy", "sharded"])
def test_bin_is_read_with_weights_only(fb, demo, data, monkeypatch, form):
    import importlib.metadata as md

    import torch
    from packaging.version import Version

    from hfpatches.patches.flash_attn_bert_prefix import impl as mod

    if form == "legacy":
        path = data["legacy"]
    else:
        path = demo.write_pretraining_checkpoint(data["src"], str(data["root"] / "bin_sharded"), fmt="bin", shards=3)
    index = os.path.join(path, "pytorch_model.bin.index.json")
    files = 1 if form == "legacy" else len(set(json.load(open(index))["weight_map"].values()))
    assert files >= (1 if form == "legacy" else 2)

    upstream_safe = mod._upstream_bin_is_safe(fb.state_dict_from_pretrained)
    # 2.8.3 lacks weights_only=True; 2.8.3.post2 has it
    assert upstream_safe == (Version(md.version("flash-attn")) >= Version("2.8.3.post2"))
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

    from hfpatches.patches.flash_attn_bert_prefix import impl as mod

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

    from hfpatches.patches.flash_attn_bert_prefix.impl import _skip_meta_init

    def reference():
        torch.manual_seed(3)
        return torch.nn.Linear(8, 8), torch.nn.init.normal_(torch.empty(5)), torch.empty(5).uniform_()

    ref = reference()
    entered, release, failed = threading.Event(), threading.Event(), []

    def holder():
        try:
            with _skip_meta_init():
                m = torch.nn.Linear(8, 8)
                assert m.weight.is_meta
                # unlike torch.device("meta"), nothing process-global (torch.compile reads this one)
                assert torch.utils._device.CURRENT_DEVICE is None
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
    # (a tensor given an explicit device is not moved to meta)
    with _skip_meta_init():
        torch.manual_seed(3)
        lin = torch.nn.Linear(8, 8, device="cpu")
        filled = torch.nn.init.normal_(torch.empty(5, device="cpu")), torch.empty(5, device="cpu").uniform_()
    assert torch.equal(lin.weight, ref[0].weight)
    assert torch.equal(filled[0], ref[1]) and torch.equal(filled[1], ref[2])
    # and the mode is gone after an error inside it
    with pytest.raises(ValueError), _skip_meta_init():
        raise ValueError("boom")
    assert torch.equal(reference()[0].weight, ref[0].weight)


# ----------------------------------------------------------------------------- foreign and ambiguous checkpoints
def tiny_config_kw(hidden=32, layers=2, positions=32):
    return dict(vocab_size=64, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                intermediate_size=2 * hidden, max_position_embeddings=positions)


def flash_bert_config(demo, positions=32, **over):
    """A flash-attn BertConfig with the tiny checkpoints' sizes (what a user would write by hand)."""
    import transformers

    c = transformers.BertConfig(**tiny_config_kw(positions=positions), position_embedding_type="absolute")
    for k, v in {**demo.FLASH_OFF, **over}.items():
        setattr(c, k, v)
    return c


def save_as(model, d: str, fmt: str, *, config=True) -> str:
    """``model`` saved with transformers (safetensors) or as ``pytorch_model.bin`` (a plain state dict
    with ``torch.save``, the format flash-attn reads first); ``config=False`` leaves out config.json."""
    import torch

    os.makedirs(d, exist_ok=True)
    if fmt == "safetensors":
        model.save_pretrained(d, safe_serialization=True)
    else:
        model.config.save_pretrained(d)
        torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(d, "pytorch_model.bin"))
    if not config:
        os.remove(os.path.join(d, "config.json"))
    return d


ROBERTA_SIZES = dict(positions=34, type_vocab_size=1)  # a config matching the checkpoint: old patch loaded it
ROBERTA_KINDS = {
    # name: (transformers class, config class, saved key prefix)
    "roberta-mlm": ("RobertaForMaskedLM", "RobertaConfig", "roberta."),
    "xlmr-bare": ("XLMRobertaModel", "XLMRobertaConfig", ""),
}


def roberta_checkpoint(tmp, kind: str, fmt: str, *, config=True):
    """A tiny random RoBERTa-family checkpoint: RoBERTa with its MLM head (keys under ``roberta.``)
    or a bare XLM-R (unprefixed keys, laid out exactly like a BERT's). Returns (dir, hf model)."""
    import torch
    import transformers

    cls_name, cfg_name, _ = ROBERTA_KINDS[kind]
    c = getattr(transformers, cfg_name)(**tiny_config_kw(positions=34), type_vocab_size=1)
    torch.manual_seed(2)
    model = getattr(transformers, cls_name)(c).eval()
    return save_as(model, os.path.join(str(tmp), f"{kind}-{fmt}-{int(config)}"), fmt, config=config), model


def _hf_hidden(model, ids):
    import torch

    base = getattr(model, "roberta", model)
    with torch.no_grad():
        return base(ids).last_hidden_state


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("kind", list(ROBERTA_KINDS))
def test_roberta_family_is_refused(fb, demo, tmp_path, kind, fmt):
    """Unpatched flash-attn raises KeyError on these; the patch used to load them silently (outputs
    off by ~2 from transformers'); now it refuses, naming the file, model_type and the fix."""
    import torch

    path, hf = roberta_checkpoint(tmp_path, kind, fmt)
    sizes = ROBERTA_SIZES
    with pytest.raises(KeyError, match=r"bert\.encoder\.layers\.0\.attention\.self\.query\.weight"):
        fb.BertModel.from_pretrained(path, flash_bert_config(demo, **sizes))                 # upstream
    # what the patch must not do: the same weights through BertModel are another function
    ids = torch.tensor([[0, 5, 6, 7, 9, 2]])
    ck = {k[len(ROBERTA_KINDS[kind][2]):]: v for k, v in hf.state_dict().items() if k.startswith(ROBERTA_KINDS[kind][2])}
    forced = fb.BertModel(flash_bert_config(demo, **sizes))
    forced.load_state_dict(fb.remap_state_dict({"bert." + k: v for k, v in ck.items()
                                                if k.startswith(("embeddings.", "encoder."))}, forced.config),
                           strict=False)
    gap = (demo.flash_hidden(forced.eval(), {"input_ids": ids, "token_type_ids": torch.zeros_like(ids),
                                             "attention_mask": torch.ones_like(ids)}) - _hf_hidden(hf, ids)).abs().max()
    assert gap > 0.5, f"a RoBERTa through BertModel should compute something else (max |delta| {gap})"
    with hfpatches.patched(PID):
        for cls in (fb.BertModel, fb.BertForPreTraining):
            with pytest.raises(CheckpointError) as ei:
                cls.from_pretrained(path, flash_bert_config(demo, **sizes))
            msg = str(ei.value)
            for part in (f"{cls.__name__}.from_pretrained", os.path.join(path, "config.json"), "model_type",
                         "expected model_type 'bert'", "padding_idx + 1", "AutoModel.from_pretrained"):
                assert part in msg, (part, msg)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("kind", list(ROBERTA_KINDS))
def test_roberta_family_without_config_json_is_refused_by_its_layout(fb, demo, tmp_path, kind, fmt):
    """No config.json to read: the prefix (``roberta.``) or the position table (RoBERTa's padding row
    is all zeros: positions start at padding_idx + 1) still tells."""
    path, _ = roberta_checkpoint(tmp_path, kind, fmt, config=False)
    sizes = ROBERTA_SIZES
    with pytest.raises(KeyError):
        fb.BertModel.from_pretrained(path, flash_bert_config(demo, **sizes))
    with hfpatches.patched(PID), pytest.raises(CheckpointError) as ei:
        fb.BertModel.from_pretrained(path, flash_bert_config(demo, **sizes))
    msg = str(ei.value)
    if ROBERTA_KINDS[kind][2]:
        assert "sits under 'roberta.', the prefix of RoBERTa / XLM-R / CamemBERT models" in msg, msg
    else:
        assert "row 1 of embeddings.position_embeddings.weight is all zeros" in msg, msg
        assert "padding_idx + 1 = 2" in msg and "expected BERT's positions counted from 0" in msg


def dual_encoder(tmp, fmt="safetensors", names=("q_encoder.", "d_encoder.")):
    """Two tiny transformers BERTs (different seeds) under two prefixes in one file."""
    import torch
    import transformers
    from safetensors.torch import save_file

    c = transformers.BertConfig(**tiny_config_kw(), position_embedding_type="absolute")
    sd, parts = {}, {}
    for seed, name in enumerate(names):
        torch.manual_seed(10 + seed)
        part = {k: v.contiguous() for k, v in transformers.BertModel(c).state_dict().items()}
        parts[name] = part
        sd.update({name + k: v for k, v in part.items()})
    d = os.path.join(str(tmp), f"dual-{fmt}")
    os.makedirs(d, exist_ok=True)
    if fmt == "safetensors":
        save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(sd, os.path.join(d, "pytorch_model.bin"))
    return d, parts


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_two_encoders_are_refused_as_ambiguous_and_chosen_explicitly(fb, demo, tmp_path, fmt):
    import torch

    path, parts = dual_encoder(tmp_path, fmt)
    with pytest.raises(KeyError):
        fb.BertModel.from_pretrained(path, flash_bert_config(demo))                 # upstream
    with hfpatches.patched(PID):
        with pytest.raises(CheckpointError) as ei:
            fb.BertModel.from_pretrained(path, flash_bert_config(demo))
        msg = str(ei.value)
        for part in (path, "ambiguous", "'d_encoder.', 'q_encoder.'", "checkpoint_prefix='d_encoder.'"):
            assert part in msg, (part, msg)
        for name in ("q_encoder.", "d_encoder"):      # with or without the trailing dot
            m = fb.BertModel.from_pretrained(path, flash_bert_config(demo), checkpoint_prefix=name)
            want = parts[name.rstrip(".") + "."]["embeddings.word_embeddings.weight"]
            assert torch.equal(m.embeddings.word_embeddings.weight, want)
        with pytest.raises(CheckpointError, match=r"checkpoint_prefix='bert\.' holds no"):
            fb.BertModel.from_pretrained(path, flash_bert_config(demo), checkpoint_prefix="bert.")


def test_a_single_foreign_prefix_needs_an_explicit_choice(fb, demo, tmp_path):
    import torch

    path, parts = dual_encoder(tmp_path, names=("backbone.",))
    with hfpatches.patched(PID):
        with pytest.raises(CheckpointError, match=r"sits under 'backbone\.'.*checkpoint_prefix='backbone\.'"):
            fb.BertModel.from_pretrained(path, flash_bert_config(demo))
        m = fb.BertModel.from_pretrained(path, flash_bert_config(demo), checkpoint_prefix="backbone.")
    assert torch.equal(m.embeddings.word_embeddings.weight, parts["backbone."]["embeddings.word_embeddings.weight"])


DETERMINISM = r"""
import hashlib, sys
sys.path.insert(0, {tests!r})
from _stubs import install_flash_attn_cpu_stubs
install_flash_attn_cpu_stubs()
import flash_attn.models.bert as fb
import transformers
import hfpatches
c = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=32, position_embedding_type="absolute")
for k in ("use_flash_attn", "fused_bias_fc", "fused_mlp", "fused_dropout_add_ln"):
    setattr(c, k, False)
hfpatches.apply(only=["flash_attn_bert_prefix"])
try:
    m = fb.BertModel.from_pretrained({path!r}, c)
    print("LOADED", hashlib.sha256(m.embeddings.word_embeddings.weight.detach().numpy().tobytes()).hexdigest())
except Exception as e:
    print("REFUSED", type(e).__name__, str(e).replace(chr(10), " "))
"""


def test_ambiguous_load_is_the_same_in_every_process(fb, tmp_path, py):
    """Before: the prefix was the shortest of a *set*, so two same-length prefixes were ordered by
    string hashing, i.e. by PYTHONHASHSEED (seeds 1 and 2 picked different encoders). Now every
    process refuses, with the same message."""
    path, _ = dual_encoder(tmp_path)
    code = DETERMINISM.format(tests=os.path.dirname(os.path.abspath(__file__)), path=path)
    outs = []
    for seed in ("1", "2"):
        proc = py(code, env={"PYTHONHASHSEED": seed})
        outs.append(proc.stdout.strip().splitlines()[-1])
    assert outs[0] == outs[1], outs
    assert outs[0].startswith("REFUSED CheckpointError") and "ambiguous" in outs[0], outs[0]


# ----------------------------------------------------------------------------- parameters never depend on the file
SAVE_OVER = r"""
import hashlib, os, sys
sys.path.insert(0, {tests!r})
from _stubs import install_flash_attn_cpu_stubs
install_flash_attn_cpu_stubs()
import torch
import flash_attn.models.bert as fb
import transformers
import hfpatches
from hfpatches.patches.flash_attn_bert_prefix import impl as mod
if {force_reader}:
    mod._upstream_bin_is_safe = lambda fn: False      # the patch's own .bin reader, on both stacks
c = transformers.BertConfig.from_pretrained({path!r})
for k in ("use_flash_attn", "fused_bias_fc", "fused_mlp", "fused_dropout_add_ln"):
    setattr(c, k, False)
c.position_embedding_type = "absolute"
hfpatches.apply(only=["flash_attn_bert_prefix"])
m = fb.BertModel.from_pretrained({path!r}, c)
want = {{k: v.detach().clone() for k, v in m.state_dict().items()}}
f = os.path.join({path!r}, {name!r})
if f.endswith(".bin"):
    torch.save(m.state_dict(), f)                 # over the very file the model was loaded from
    back = torch.load(f, weights_only=True)
else:
    from safetensors.torch import load_file, save_file
    save_file({{k: v.contiguous() for k, v in m.state_dict().items()}}, f)   # replaces the file: a new inode
    back = load_file(f)
got = {{k: v for k, v in m.state_dict().items()}}
print("SAME", all(torch.equal(want[k], got[k]) for k in want))
print("FILE", all(torch.equal(want[k], back[k]) for k in want))
"""


@pytest.mark.parametrize("fmt,force", [("bin", True), ("bin", False), ("safetensors", False)],
                         ids=["bin-own-reader", "bin-installed-reader", "safetensors"])
def test_saving_over_the_loaded_checkpoint(fb, tmp_path, py, fmt, force):
    """flash-attn 2.8.3 (the patch's own .bin reader used mmap and kept the mapped tensors as the
    parameters): torch.save over the loaded .bin truncated the file under the model -> SIGBUS, file
    destroyed. Now .bin tensors are never mapped: the save works, the file holds the weights, the
    model is unchanged. Safetensors stay on the file's private mapping (as in transformers' own
    loads): safe for safetensors' writer, which replaces the file instead of rewriting it in place.
    Run in a subprocess: SIGBUS kills the process."""
    import transformers

    path, _ = tiny_bert(tmp_path, prefixed=False, name=f"save-over-{fmt}")
    if fmt == "bin":
        import torch
        from safetensors.torch import load_file

        sd = load_file(os.path.join(path, "model.safetensors"))
        os.remove(os.path.join(path, "model.safetensors"))
        torch.save(sd, os.path.join(path, "pytorch_model.bin"))
    name = "pytorch_model.bin" if fmt == "bin" else "model.safetensors"
    assert transformers.BertConfig.from_pretrained(path).num_hidden_layers == 2
    code = SAVE_OVER.format(tests=os.path.dirname(os.path.abspath(__file__)), path=path, name=name, force_reader=force)
    proc = py(code, check=False)
    assert proc.returncode == 0, f"rc={proc.returncode} (-7 is SIGBUS)\n{proc.stderr[-2000:]}"
    assert "SAME True" in proc.stdout and "FILE True" in proc.stdout, proc.stdout


def test_a_missing_middle_layer_is_counted_whole(fb, demo, data, tmp_path):
    """A partial checkpoint (layer 3 gone, e.g. a lost shard): every weight of the layer is named."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / "partial"
    d.mkdir()
    sd = load_file(os.path.join(data["src"], "model.safetensors"))
    gone = sorted(k for k in sd if k.startswith("encoder.layer.3."))
    assert len(gone) == 16
    save_file({k: v for k, v in sd.items() if k not in gone}, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(open(os.path.join(data["src"], "config.json")).read())
    with pytest.raises(KeyError):
        fb.BertModel.from_pretrained(str(d), cfg(demo, data))                  # upstream
    with hfpatches.patched(PID), pytest.raises(CheckpointError) as ei:
        fb.BertModel.from_pretrained(str(d), cfg(demo, data))
    msg = str(ei.value)
    assert "missing backbone weights (16): encoder.layer.3.attention.self.query.weight" in msg, msg
    assert "(+6 more)" in msg and "layers missing entirely: 3" in msg and "partial" in msg, msg


# ----------------------------------------------------------------------------- inspect says what the load does
def inspect_flash(path: str, cls_name: str, config_dir: str | None = None):
    """``python -m hfpatches inspect PATH --model flash_attn.models.bert.CLS --json`` -> (rc, report)."""
    import contextlib
    import io

    from hfpatches.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    args = ["inspect", path, "--model", f"flash_attn.models.bert.{cls_name}", "--json"]
    args += ["--config", config_dir] if config_dir else []
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    return rc, (json.loads(out.getvalue()) if out.getvalue() else err.getvalue())


def test_inspect_refuses_what_the_load_refuses(fb, demo, tmp_path):
    cases = {
        "roberta (config.json)": (roberta_checkpoint(tmp_path, "roberta-mlm", "safetensors")[0], None, ROBERTA_SIZES),
        "xlm-r (no config.json)": (roberta_checkpoint(tmp_path, "xlmr-bare", "bin", config=False)[0], "cfg", ROBERTA_SIZES),
        "dual encoder": (dual_encoder(tmp_path)[0], "cfg", {}),
    }
    cfg_dir = str(tmp_path / "bert-config")
    for name, (path, config_dir, sizes) in cases.items():
        c = flash_bert_config(demo, **sizes)
        if config_dir:        # a BERT config with the checkpoint's sizes, elsewhere (as a user would pass it)
            c.save_pretrained(cfg_dir)
        for cls_name in ("BertModel", "BertForPreTraining"):
            cls = getattr(fb, cls_name)
            with hfpatches.patched(PID), pytest.raises(CheckpointError) as ei:
                cls.from_pretrained(path, c)
            rc, rep = inspect_flash(path, cls_name, cfg_dir if config_dir else None)
            assert rc == 1 and rep["ok"] is False, (name, rep)
            assert rep["incompatible"] == [" ".join(str(ei.value).split())], (name, rep["incompatible"], str(ei.value))


def test_inspect_maps_keys_like_the_patched_load(fb, demo, data):
    """A good checkpoint: inspect used to call all of flash-attn's fused/renamed weights missing
    (74 of them, NOT OK); it now maps them as the patched load does."""
    for path, cls_name in ((data["src"], "BertModel"), (data["pre"], "BertModel"), (data["src"], "BertForPreTraining")):
        rc, rep = inspect_flash(path, cls_name)
        assert rc == 0 and rep["ok"] is True, (path, cls_name, rep if isinstance(rep, str) else rep["verdict"])
        assert rep["counts"].get("missing-backbone", 0) == 0 and rep["counts"]["matched"] >= 70
        assert any("flash_attn_bert_prefix" in n for n in rep["notes"])
    rc, rep = inspect_flash(data["src"], "BertForPreTraining")
    assert {e["model_key"] for e in rep["entries"] if e["kind"] == "missing-new-head"} >= {"cls.seq_relationship.weight"}
