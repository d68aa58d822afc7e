"""explain_load / LoadReport / ``python -m hfpatches inspect``: every key lands in the right class.

Fixtures are generated with real transformers classes and tiny configs
(``hfpatches.demos.strict_loads.write_checkpoints``) plus the real all-MiniLM-L6-v2 checkpoint.
Each case asserts the classes and counts, and that every key of both sides is in exactly one class.
"""
from __future__ import annotations

import json
import os
import re

import pytest

from hfpatches.errors import CheckpointError, LoadError

BERT_BUFFERS = {"embeddings.position_ids", "embeddings.token_type_ids"}   # BertEmbeddings' non-persistent buffers


@pytest.fixture(scope="module")
def demo():
    from hfpatches.demos import strict_loads

    return strict_loads


@pytest.fixture(scope="module")
def ckpts(demo, tmp_path_factory):
    return demo.write_checkpoints(str(tmp_path_factory.mktemp("ckpts")))


def file_keys(path: str) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), "numpy") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}


def model_keys(model) -> tuple[set[str], set[str]]:
    sd = set(model.state_dict())
    return sd, {k for k, _ in model.named_buffers() if k not in sd}


def explain(model, ckpt, ck_keys):
    """explain_load + the partition property: each key of both sides in exactly one entry."""
    from hfpatches import explain_load

    report = explain_load(model, ckpt)
    persistent, buffers = model_keys(model)
    m_seen = [e.model_key for e in report.entries if e.model_key]
    c_seen = [e.checkpoint_key for e in report.entries if e.checkpoint_key]
    assert sorted(m_seen) == sorted(persistent | buffers), "every model key exactly once"
    assert sorted(c_seen) == sorted(ck_keys), "every checkpoint key exactly once"
    assert sum(report.counts.values()) == len(report.entries)
    return report


def meta(cls, config):
    import torch

    with torch.device("meta"):
        return cls(config)


# ----------------------------------------------------------------------------- classes and counts
def test_pretraining_into_bertmodel_is_a_prefix_mismatch(demo, ckpts):
    from transformers import BertModel

    keys = file_keys(ckpts["pretraining"])
    model = meta(BertModel, demo.tiny_bert_config())
    r = explain(model, ckpts["pretraining"], keys)
    persistent, _ = model_keys(model)
    assert r.counts == {"prefix-mismatch": 39, "missing-non-persistent-buffer": 2, "unexpected-head": 7}
    assert r.model_keys("prefix-mismatch") == persistent
    assert r.checkpoint_keys("prefix-mismatch") == {"bert." + k for k in persistent}
    assert r.model_keys("missing-non-persistent-buffer") == BERT_BUFFERS
    assert r.checkpoint_keys("unexpected-head") == {k for k in keys if k.startswith("cls.")}
    fix = r.by_kind("prefix-mismatch")[0].fix
    assert "from_pretrained does this itself" in fix and "removeprefix('bert.')" in fix
    assert r.ok and r.verdict() == "ok"


def test_pretraining_into_sequence_classification_new_head(demo, ckpts):
    from transformers import BertForSequenceClassification

    keys = file_keys(ckpts["pretraining"])
    r = explain(meta(BertForSequenceClassification, demo.tiny_bert_config()), ckpts["pretraining"], keys)
    assert r.counts == {"matched": 39, "missing-new-head": 2, "missing-non-persistent-buffer": 2, "unexpected-head": 7}
    assert r.model_keys("matched") == {k for k in keys if k.startswith("bert.")}
    assert r.model_keys("missing-new-head") == {"classifier.weight", "classifier.bias"}
    assert r.model_keys("missing-non-persistent-buffer") == {"bert." + k for k in BERT_BUFFERS}
    assert r.ok


def test_minilm_into_masked_lm_unprefixed_and_missing_head(minilm_dir):
    from transformers import BertConfig, BertForMaskedLM

    keys = file_keys(minilm_dir)
    assert len(keys) == 104 and "embeddings.position_ids" in keys     # the real checkpoint, unprefixed
    r = explain(meta(BertForMaskedLM, BertConfig.from_pretrained(minilm_dir)), minilm_dir, keys)
    assert r.counts == {"prefix-mismatch": 101, "tied": 1, "missing-new-head": 6,
                        "missing-non-persistent-buffer": 2, "unexpected-head": 2}
    assert all(e.checkpoint_key == e.model_key[len("bert."):] for e in r.by_kind("prefix-mismatch"))
    assert "'bert.' + k" in r.by_kind("prefix-mismatch")[0].fix
    # the decoder weight is the word embeddings (tied); the MLM head itself is new
    assert r.model_keys("tied") == {"cls.predictions.decoder.weight"}
    assert "bert.embeddings.word_embeddings.weight" in r.by_kind("tied")[0].detail
    assert r.model_keys("missing-new-head") == {
        "cls.predictions.bias", "cls.predictions.decoder.bias", "cls.predictions.transform.dense.weight",
        "cls.predictions.transform.dense.bias", "cls.predictions.transform.LayerNorm.weight",
        "cls.predictions.transform.LayerNorm.bias"}
    assert r.checkpoint_keys("unexpected-head") == {"pooler.dense.weight", "pooler.dense.bias"}
    # the checkpoint's position_ids copy goes with the model's non-persistent buffer (ignored)
    buf = {e.model_key: e.checkpoint_key for e in r.by_kind("missing-non-persistent-buffer")}
    assert buf == {"bert.embeddings.position_ids": "embeddings.position_ids", "bert.embeddings.token_type_ids": None}
    assert r.ok


def test_lora_wrapped_state_dict(demo):
    from transformers import BertModel

    sd = demo.lora_state_dict(BertModel(demo.tiny_bert_config()))
    model = meta(BertModel, demo.tiny_bert_config())
    r = explain(model, sd, sd)
    persistent, _ = model_keys(model)
    adapters = {k for k in sd if ".lora_A." in k or ".lora_B." in k}
    assert len(adapters) == 8                                  # 2 layers x (query, value) x (A, B)
    assert r.counts == {"peft-wrapped": 39 + 8, "missing-non-persistent-buffer": 2}
    assert r.model_keys("peft-wrapped") == persistent
    assert {e.checkpoint_key for e in r.by_kind("peft-wrapped") if e.model_key is None} == adapters
    wrapped = {e.model_key: e.checkpoint_key for e in r.by_kind("peft-wrapped") if e.model_key}
    assert wrapped["encoder.layer.0.attention.self.query.weight"] == \
        "base_model.model.encoder.layer.0.attention.self.query.base_layer.weight"
    assert all("hfpatches.peft_state_dict" in e.fix for e in r.by_kind("peft-wrapped"))
    assert r.ok and len(r.untranslated()) == 39 and r.verdict().startswith("ok once keys are translated")


def test_vocab_resized_and_longer_position_table(demo, ckpts):
    from transformers import BertForMaskedLM

    keys = file_keys(ckpts["resized"])
    r = explain(meta(BertForMaskedLM, demo.tiny_bert_config()), ckpts["resized"], keys)
    assert r.counts == {"matched": 39, "shape-mismatch": 3, "tied": 2, "missing-non-persistent-buffer": 2}
    shapes = {e.model_key: (e.checkpoint_shape, e.model_shape) for e in r.by_kind("shape-mismatch")}
    assert shapes == {"bert.embeddings.word_embeddings.weight": ((104, 32), (99, 32)),
                      "cls.predictions.bias": ((104,), (99,)),
                      "bert.embeddings.position_embeddings.weight": ((128, 32), (64, 32))}
    fixes = {e.model_key: e.fix for e in r.by_kind("shape-mismatch")}
    assert "resize_token_embeddings(104)" in fixes["bert.embeddings.word_embeddings.weight"]
    assert "resize_token_embeddings(104)" in fixes["cls.predictions.bias"]
    assert "max_position_embeddings=128" in fixes["bert.embeddings.position_embeddings.weight"]
    assert "ignore_mismatched_sizes" in fixes["bert.embeddings.position_embeddings.weight"]
    assert r.model_keys("tied") == {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    assert not r.ok
    with pytest.raises(LoadError) as ei:
        r.raise_if_bad()
    assert ei.value.report is r and isinstance(ei.value, CheckpointError)
    assert "3 shapes differ" in str(ei.value) and "[128, 32]" in str(ei.value)


def test_bf16_checkpoint_into_fp32_model(demo, ckpts):
    from transformers import BertModel

    keys = file_keys(ckpts["bf16"])
    r = explain(meta(BertModel, demo.tiny_bert_config()), ckpts["bf16"], keys)
    assert r.counts == {"dtype-differs": 39, "missing-non-persistent-buffer": 2}
    e = r.by_kind("dtype-differs")[0]
    assert (e.checkpoint_dtype, e.model_dtype) == ("bfloat16", "float32")
    assert "torch_dtype=torch.bfloat16" in e.fix
    assert r.ok and r.raise_if_bad() is r


def test_llama_with_tied_embeddings(demo, ckpts, stack):
    from transformers import LlamaForCausalLM

    keys = file_keys(ckpts["llama"])
    assert "lm_head.weight" not in keys
    model = meta(LlamaForCausalLM, demo.tiny_llama_config())
    r = explain(model, ckpts["llama"], keys)
    rotary = {"model.rotary_emb.inv_freq"} | ({"model.rotary_emb.original_inv_freq"} if stack == "latest" else set())
    assert r.model_keys("matched") == set(keys) and len(keys) == 20
    assert r.model_keys("tied") == {"lm_head.weight"}
    assert r.by_kind("tied")[0].detail == "tied to model.embed_tokens.weight"
    assert r.model_keys("missing-non-persistent-buffer") == rotary
    assert r.counts == {"matched": 20, "tied": 1, "missing-non-persistent-buffer": len(rotary)}
    assert r.ok


def test_another_architecture_is_missing_backbone(demo, ckpts):
    from transformers import BertModel

    keys = file_keys(ckpts["llama"])
    r = explain(meta(BertModel, demo.tiny_bert_config()), ckpts["llama"], keys)
    assert r.counts == {"missing-new-head": 2, "missing-backbone": 37, "missing-non-persistent-buffer": 2,
                        "unexpected": 20}
    assert r.model_keys("missing-new-head") == {"pooler.dense.weight", "pooler.dense.bias"}
    assert not r.ok and "37 backbone weights missing" in r.verdict()
    assert r.notes and "another architecture" in r.notes[0]
    with pytest.raises(LoadError, match="embeddings.word_embeddings.weight"):
        r.raise_if_bad()


def test_extra_layers_are_unexpected_not_heads(demo, ckpts):
    from transformers import BertForPreTraining

    keys = file_keys(ckpts["pretraining"])
    r = explain(meta(BertForPreTraining, demo.tiny_bert_config(num_hidden_layers=1)), ckpts["pretraining"], keys)
    extra = {k for k in keys if k.startswith("bert.encoder.layer.1.")}
    assert r.checkpoint_keys("unexpected") == extra and len(extra) == 16
    assert r.count("unexpected-head") == 0 and r.ok


def test_foreign_prefix_is_not_done_by_from_pretrained(demo):
    from transformers import BertModel

    model = BertModel(demo.tiny_bert_config())
    sd = {"module." + k: v for k, v in model.state_dict().items()}      # saved from DDP without unwrapping
    r = explain(meta(BertModel, demo.tiny_bert_config()), sd, sd)
    assert r.count("prefix-mismatch") == 39
    assert "neither from_pretrained nor load_state_dict" in r.by_kind("prefix-mismatch")[0].fix
    assert r.ok and len(r.untranslated()) == 39


# ----------------------------------------------------------------------------- report output
def test_report_table_json_and_queries(demo, ckpts):
    from transformers import BertForMaskedLM

    r = explain(meta(BertForMaskedLM, demo.tiny_bert_config()), ckpts["resized"], file_keys(ckpts["resized"]))
    text = str(r)
    lines = text.splitlines()
    assert lines[0].startswith("BertForMaskedLM <- ") and lines[1].startswith("verdict: NOT OK")
    # counts come first, before any key listing
    table = lines[3:3 + 2 + len(r.counts)]
    assert [ln.split()[0] for ln in table[2:]] == list(r.counts)
    assert text.index("shape-mismatch (3)") > text.index(table[-1])
    data = json.loads(r.to_json())
    assert data["ok"] is False and data["counts"] == r.counts and len(data["entries"]) == len(r.entries)
    assert r.kind_of("cls.predictions.decoder.weight") == "tied"
    with pytest.raises(KeyError):
        r.kind_of("nope")
    with pytest.raises(ValueError):
        r.by_kind("missing")


# ----------------------------------------------------------------------------- readers
def test_readers_agree_sharded_bin_and_state_dict(demo, tmp_path):
    import torch
    from transformers import BertForPreTraining

    from hfpatches.loading import read_checkpoint

    model = BertForPreTraining(demo.tiny_bert_config())
    model.save_pretrained(tmp_path / "st", max_shard_size="20KB")
    # a sharded .bin written by hand (transformers 5.x always writes safetensors)
    sd = model.state_dict()
    names = list(sd)
    (tmp_path / "bin").mkdir()
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        shard = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, tmp_path / "bin" / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (tmp_path / "bin" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    torch.save(model.state_dict(), tmp_path / "single.bin")
    a = read_checkpoint(str(tmp_path / "st"))
    b = read_checkpoint(str(tmp_path / "bin"))
    c = read_checkpoint(model.state_dict())
    d = read_checkpoint(str(tmp_path / "single.bin"))
    assert a.format == "safetensors (sharded)" and len(a.files) > 2
    assert b.format == "bin (sharded)" and c.format == "state dict" and d.format == "bin"
    shapes = {k: t.shape for k, t in c.tensors.items()}
    # safetensors drop the tied decoder weight and bias; .bin and the state dict keep them (shared storage)
    tied = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    assert {k: t.shape for k, t in a.tensors.items()} == {k: v for k, v in shapes.items() if k not in tied}
    assert {k: t.shape for k, t in b.tensors.items()} == shapes
    assert {k: t.shape for k, t in d.tensors.items()} == shapes
    assert d.shared_bytes > 0          # the tied decoder weight is counted once in the size


def test_safetensors_header_only(tmp_path):
    """A 256 MiB tensor in a sparse file: reading it needs no data (RSS does not grow)."""
    from hfpatches.loading import read_checkpoint, summarize

    rows = 8192
    size = rows * rows * 4
    header = json.dumps({"w": {"dtype": "F32", "shape": [rows, rows], "data_offsets": [0, size]},
                         "__metadata__": {"format": "pt"}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as fh:
        fh.write(len(header).to_bytes(8, "little") + header)
        fh.truncate(8 + len(header) + size)
    import safetensors  # noqa: F401 - imports outside the measurement

    before = rss()
    ck = read_checkpoint(str(path))
    s = summarize(ck)
    grew = rss() - before
    assert ck.tensors["w"].shape == (rows, rows) and s["bytes"] == size and s["parameters"] == rows * rows
    assert grew < 16 << 20, f"RSS grew by {grew >> 20} MiB: tensor data was read"


def rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# ----------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def bad(ckpts, tmp_path_factory):
    """Each: (path, words the one-line error must contain)."""
    import argparse
    import shutil

    import torch

    root = tmp_path_factory.mktemp("bad")
    out = {}
    src = os.path.join(ckpts["pretraining"], "model.safetensors")
    data = open(src, "rb").read()
    trunc = root / "truncated" / "model.safetensors"
    trunc.parent.mkdir()
    trunc.write_bytes(data[: len(data) // 2])
    out["truncated"] = (str(trunc.parent), [str(trunc), "truncated"])
    sharded = root / "sharded"
    from transformers import BertModel

    from hfpatches.demos.strict_loads import tiny_bert_config

    BertModel(tiny_bert_config()).save_pretrained(sharded, max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[-1]
    os.remove(sharded / gone)
    out["missing_shard"] = (str(sharded), ["model.safetensors.index.json", gone, "does not exist"])
    pkl = root / "pickle" / "pytorch_model.bin"
    pkl.parent.mkdir()
    torch.save({"w": torch.zeros(2), "args": argparse.Namespace(lr=1e-3)}, pkl)
    out["pickle"] = (str(pkl.parent), [str(pkl), "argparse.Namespace", "weights_only=True"])
    mixed = root / "mixed.bin"
    torch.save({"w": torch.zeros(2), "epoch": 3}, mixed)
    out["non_tensor_value"] = (str(mixed), [str(mixed), "'epoch' is not a tensor (int)"])
    empty = root / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    out["no_weights"] = (str(empty), [str(empty), "no weights found", "model.safetensors"])
    yield out
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("case", ["truncated", "missing_shard", "pickle", "non_tensor_value", "no_weights"])
def test_bad_input_one_line_exit_2(bad, case, capsys):
    from hfpatches.__main__ import main

    path, words = bad[case]
    with pytest.raises(CheckpointError):
        from hfpatches.loading import read_checkpoint

        read_checkpoint(path)
    assert main(["inspect", path]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hfpatches inspect: error: ") and "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert main(["inspect", path, "--model", "transformers.BertModel"]) == 2   # same with --model
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["inspect", path, "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_cli_subprocess_bad_input_and_no_torch(bad, ckpts, py):
    """The real entry point: exit code 2 and one line; without --model, safetensors never import torch."""
    path, words = bad["truncated"]
    proc = py(f"import sys; from hfpatches.__main__ import main; sys.exit(main(['inspect', {path!r}]))", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and words[1] in proc.stderr
    proc = py(f"""
import sys
from hfpatches.__main__ import main
rc = main(['inspect', {ckpts['pretraining']!r}, '--json'])
print('TORCH', 'torch' in sys.modules)
sys.exit(rc)
""")
    out = proc.stdout
    assert out.rstrip().endswith("TORCH False")
    data = json.loads(out[: out.rindex("TORCH")])
    assert data["format"] == "safetensors" and data["tensors"] == 46
    assert data["prefixes"] == {"bert.": 39, "cls.": 7}


# ----------------------------------------------------------------------------- inspect
def test_inspect_summary_text(ckpts, capsys):
    from hfpatches.__main__ import main

    assert main(["inspect", ckpts["peft"]]) == 0
    out = capsys.readouterr().out
    assert "format      safetensors" in out and "prefixes    base_model.model. 47" in out
    assert "8 adapter weights, 39 PEFT-wrapped names" in out and "metadata    format=pt" in out


def test_inspect_with_model(ckpts, capsys):
    from hfpatches.__main__ import main

    assert main(["inspect", ckpts["pretraining"], "--model", "transformers.BertModel"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("BertModel <- ") and re.search(r"^prefix-mismatch +39$", out, re.M)
    # another architecture: exit 1 (the load would leave the backbone random), JSON says why
    assert main(["inspect", ckpts["llama"], "--model", "BertModel", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["counts"]["missing-backbone"] == 37
    # a checkpoint file with the config elsewhere
    f = os.path.join(ckpts["bf16"], "model.safetensors")
    assert main(["inspect", f, "--model", "transformers.BertModel", "--config", ckpts["pretraining"]]) == 0
    assert "dtype-differs" in capsys.readouterr().out
    assert main(["inspect", ckpts["llama"], "--model", "transformers.NoSuchModel"]) == 2
    err = capsys.readouterr().err
    assert "--model transformers.NoSuchModel: cannot import it" in err and len(err.strip().splitlines()) == 1


def test_meta_model_has_no_weight_memory(ckpts):
    from hfpatches._inspect import build_meta_model

    for cls in ("transformers.LlamaForCausalLM", "transformers.AutoModelForCausalLM"):
        model = build_meta_model(cls, ckpts["llama"])
        assert {p.device.type for p in model.parameters()} == {"meta"}
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_state_dict_with_non_tensor_is_refused():
    from hfpatches.loading import read_checkpoint

    with pytest.raises(CheckpointError, match=re.escape("'epoch' is not a tensor (int)")):
        read_checkpoint({"w": __import__("torch").zeros(1), "epoch": 3})


# ----------------------------------------------------------------------------- non-regular files, odd indexes, --model
def test_fifo_named_safetensors_is_refused_not_read(tmp_path, py):
    """Opening a FIFO blocks until a writer comes: inspect used to hang forever. Subprocess with a
    timeout, so the old behaviour fails the test instead of hanging it."""
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    for target in (str(fifo), str(tmp_path)):          # the file itself, and a directory holding it
        code = f"import sys; from hfpatches.__main__ import main; sys.exit(main(['inspect', {target!r}]))"
        proc = py(code, check=False, timeout=60)
        assert proc.returncode == 2, proc
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1 and f"{fifo}: is a FIFO (named pipe), not a regular file" in err[0], err


def test_symlink_to_a_directory_is_named_not_called_truncated(tmp_path, capsys):
    from hfpatches.__main__ import main

    (tmp_path / "real").mkdir()
    ck = tmp_path / "ckpt"
    ck.mkdir()
    os.symlink(tmp_path / "real", ck / "weights.safetensors")
    assert main(["inspect", str(ck)]) == 2
    err = capsys.readouterr().err
    assert f"{ck / 'weights.safetensors'}: is a directory (a symlink to {tmp_path / 'real'})" in err, err
    assert "truncated" not in err
    # the same link passed directly is a directory: said so, with where it points
    assert main(["inspect", str(ck / "weights.safetensors")]) == 2
    assert f"(a symlink to the directory {tmp_path / 'real'}): no weights found" in capsys.readouterr().err


@pytest.mark.parametrize("shard,words", [
    ("model.safetensors.index.json", "that is the index itself"),
    ("config.json", "not a .safetensors or .bin file"),
    ("../outside.safetensors", "outside the checkpoint directory is refused"),
])
def test_index_with_a_bad_shard_name(tmp_path, capsys, shard, words):
    from hfpatches.__main__ import main

    (tmp_path / "config.json").write_text("{}")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"embeddings.word_embeddings.weight": shard}}))
    with pytest.raises(CheckpointError) as ei:
        from hfpatches.loading import read_checkpoint

        read_checkpoint(str(tmp_path))
    msg = str(ei.value)
    assert str(index) in msg and repr(shard) in msg and words in msg, msg
    assert "torch" not in msg.lower() or "weights_only" not in msg
    assert main(["inspect", str(tmp_path)]) == 2
    assert words in capsys.readouterr().err


def test_model_must_be_a_model_class(ckpts, capsys, monkeypatch):
    """``--model os.system`` used to call ``os.system(config)``."""
    from hfpatches.__main__ import main

    calls = []
    monkeypatch.setattr(os, "system", lambda *a, **kw: calls.append(a) or 0)
    for dotted in ("os.system", "json.loads", "builtins.dict"):
        assert main(["inspect", ckpts["pretraining"], "--model", dotted]) == 2
        err = capsys.readouterr().err
        assert f"--model {dotted}: is " in err and "not a model class" in err, err
    assert calls == [], "the named object must never be called"
    assert main(["inspect", ckpts["pretraining"], "--model", "transformers.AutoModel"]) == 0   # Auto classes: fine
    capsys.readouterr()


# ----------------------------------------------------------------------------- another architecture under BERT's names
def tiny_roberta(tmp, *, config=True, prefixed=False):
    """A tiny random RoBERTa (bare: keys exactly like a BERT's; or with its MLM head: ``roberta.``)."""
    import torch
    import transformers

    c = transformers.RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=34, type_vocab_size=1)
    torch.manual_seed(2)
    cls = transformers.RobertaForMaskedLM if prefixed else transformers.RobertaModel
    d = os.path.join(str(tmp), f"roberta-{int(config)}-{int(prefixed)}")
    cls(c).save_pretrained(d, safe_serialization=True)
    if not config:
        os.remove(os.path.join(d, "config.json"))
    return d


def test_roberta_into_bert_is_not_ok(tmp_path, demo, capsys):
    """It used to say 'verdict: ok' (every key matches by name), and transformers' BertModel would
    load it with a warning and compute other outputs (positions counted from 0, not padding_idx + 1)."""
    from transformers import BertModel

    from hfpatches import explain_load
    from hfpatches.__main__ import main

    path = tiny_roberta(tmp_path)
    assert main(["inspect", path, "--model", "transformers.BertModel"]) == 1
    out = capsys.readouterr().out
    assert "verdict: NOT OK: the checkpoint is refused for this model (see 'refused')" in out
    assert f"refused: {os.path.join(path, 'config.json')} says model_type 'roberta'" in out
    assert "BertModel is a 'bert' model" in out and "transformers.AutoModel" in out
    # no config.json beside it (config from elsewhere): the position table's padding row tells
    bare = tiny_roberta(tmp_path, config=False)
    r = explain_load(meta(BertModel, demo.tiny_bert_config(max_position_embeddings=34, type_vocab_size=1)), bare)
    assert not r.ok and "row 1 of embeddings.position_embeddings.weight is all zeros" in r.incompatible[0]
    assert "padding_idx + 1 = 2" in r.incompatible[0]
    # a real BERT is not touched by either check
    r = explain_load(meta(BertModel, demo.tiny_bert_config()), demo.write_checkpoints(str(tmp_path / "b"))["pretraining"])
    assert r.ok and r.incompatible == []


def test_two_encoders_are_ambiguous_not_a_pick(demo, tmp_path):
    """Two BERTs under 'd_encoder.' / 'q_encoder.': inspect used to pick one (the first in sorted
    order) and call the other one's weights an unexpected head."""
    import torch
    from transformers import BertModel

    from hfpatches import explain_load

    sd = {}
    for seed, name in enumerate(("q_encoder.", "d_encoder.")):
        torch.manual_seed(seed)
        sd.update({name + k: v for k, v in BertModel(demo.tiny_bert_config()).state_dict().items()})
    r = explain_load(meta(BertModel, demo.tiny_bert_config()), sd)
    assert not r.ok and r.count("prefix-mismatch") == 0
    (why,) = r.incompatible
    assert why.startswith("ambiguous:") and "'d_encoder.', 'q_encoder.'" in why and "removeprefix('d_encoder.')" in why
    # one encoder alone is still an ordinary prefix mismatch with its fix
    one = {k: v for k, v in sd.items() if k.startswith("q_encoder.")}
    r = explain_load(meta(BertModel, demo.tiny_bert_config()), one)
    assert r.ok and r.count("prefix-mismatch") == 39 and r.incompatible == []


def test_inspect_builds_on_meta_in_this_thread_only(ckpts):
    """inspect --model's meta model is built under a thread-local mode: torch.device("meta") would set
    torch.utils._device.CURRENT_DEVICE, a process global that torch.compile reads in every thread."""
    import threading

    import torch

    from hfpatches._inspect import build_meta_model

    seen, stop = set(), threading.Event()

    def watch():
        while not stop.is_set():
            seen.add(str(torch.utils._device.CURRENT_DEVICE))

    t = threading.Thread(target=watch)
    t.start()
    try:
        for _ in range(3):
            assert build_meta_model("transformers.BertModel", ckpts["pretraining"]).embeddings.word_embeddings.weight.is_meta
    finally:
        stop.set()
        t.join(30)
    assert seen == {"None"}, seen


def test_one_peft_key_parser(demo):
    """loading and peft_keys read PEFT names with the same parser: a modules_to_save head's
    ``original_module`` is the plain model's weight for both (it used to be an "adapter weight"
    for explain_load), the trained copy is what only a merge puts in, tuner weights have no place."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    from hfpatches import explain_load, peft_state_dict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(BertForSequenceClassification(demo.tiny_bert_config()),
                                    LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS"))
    sd = dict(peft_model.state_dict())
    orig = "base_model.model.classifier.original_module.weight"
    assert orig in sd and "base_model.model.classifier.modules_to_save.default.weight" in sd
    plain = peft_state_dict(sd, to="plain")
    assert plain["classifier.weight"] is sd[orig]
    r = explain_load(meta(BertForSequenceClassification, demo.tiny_bert_config()), sd)
    by_model = {e.model_key: e.checkpoint_key for e in r.entries if e.model_key and e.checkpoint_key}
    assert by_model["classifier.weight"] == orig
    unplaced = {e.checkpoint_key for e in r.by_kind("peft-wrapped") if e.model_key is None}
    assert "base_model.model.classifier.modules_to_save.default.weight" in unplaced
    assert orig not in unplaced
    assert {k for k in sd if ".lora_" in k} <= unplaced
