"""strict_loads: opt-in; from_pretrained raises LoadError (carrying the LoadReport) on missing or
re-initialised backbone weights, new heads allowed; probe, outcome and exact revert.

Every bug scenario runs unpatched first and asserts the silent load (the bug exists on both
stacks: missing weights are a warning by design), then patched.
"""
from __future__ import annotations

import pytest

from hfpatches._engine import run_check, run_probe  # noqa: E402,F401
import hfpatches
from hfpatches.errors import CheckpointError, LoadError

PID = "strict_loads"


@pytest.fixture(scope="module")
def demo():
    from hfpatches.demos import strict_loads

    return strict_loads


@pytest.fixture(scope="module")
def ckpts(demo, tmp_path_factory):
    return demo.write_checkpoints(str(tmp_path_factory.mktemp("strict")))


@pytest.fixture(autouse=True)
def quiet():
    from hfpatches._quiet import Quiet as _Quiet

    with _Quiet():
        yield


def from_file(path):
    from safetensors.torch import load_file

    return load_file(f"{path}/model.safetensors")


def test_opt_in_off_by_default_and_env_switch(py):
    from hfpatches import _env

    assert _env.STRICT_LOADS == "HFPATCHES_STRICT_LOADS"
    import transformers.modeling_utils  # noqa: F401

    rep = hfpatches.apply()
    assert rep[PID].outcome == hfpatches.Outcome.DISABLED and "HFPATCHES_STRICT_LOADS=1" in rep[PID].reason
    proc = py("""
import hfpatches, transformers.modeling_utils
print("OUT", hfpatches.apply()["strict_loads"].outcome.value)
""", env={"HFPATCHES_STRICT_LOADS": "1"})
    assert "OUT APPLIED" in proc.stdout


def test_probe_sees_the_silent_load_then_verifies():
    from transformers.modeling_utils import PreTrainedModel

    from hfpatches._registry import registry

    patch = registry()[PID]
    probe = lambda: run_probe(patch.id)  # noqa: E731
    before = probe()
    assert before.bug_present and "accepted a checkpoint without" in before.detail
    original = PreTrainedModel.__dict__["from_pretrained"]
    rep = hfpatches.apply(only=[PID])
    assert rep[PID].outcome == hfpatches.Outcome.APPLIED, rep[PID].reason
    assert PreTrainedModel.__dict__["from_pretrained"] is not original
    assert not probe().bug_present
    hfpatches.revert([PID])
    assert PreTrainedModel.__dict__["from_pretrained"] is original          # exact restore
    assert hfpatches.get_original(PID) is original
    assert probe().bug_present                                          # and the behaviour is back


def test_another_architecture_silent_unpatched_raises_patched(ckpts):
    from transformers import BertModel

    model, info = BertModel.from_pretrained(ckpts["llama"], output_loading_info=True)   # the bug: no error
    assert len(info["missing_keys"]) == 39 and isinstance(model, BertModel)
    with hfpatches.patched(PID):
        with pytest.raises(LoadError) as ei:
            BertModel.from_pretrained(ckpts["llama"])
    err = ei.value
    assert isinstance(err, CheckpointError) and err.report is not None and not err.report.ok
    assert err.report.counts == {"missing-new-head": 2, "missing-backbone": 37, "missing-non-persistent-buffer": 2,
                                 "unexpected": 20}
    assert err.report.model_keys("missing-new-head") == {"pooler.dense.weight", "pooler.dense.bias"}
    assert str(err).startswith("strict_loads: BertModel <- ") and "37 backbone weights missing" in str(err)
    assert "another architecture" in str(err)


def test_prefix_and_new_heads_still_load(ckpts):
    import torch
    from transformers import AutoModel, BertForSequenceClassification, BertModel, LlamaForCausalLM

    sd = from_file(ckpts["pretraining"])
    with hfpatches.patched(PID) as rep:
        assert rep[PID].outcome == hfpatches.Outcome.APPLIED
        bert = BertModel.from_pretrained(ckpts["pretraining"])                   # prefix: transformers strips it
        assert torch.equal(bert.embeddings.word_embeddings.weight, sd["bert.embeddings.word_embeddings.weight"])
        model, info = BertForSequenceClassification.from_pretrained(ckpts["pretraining"], output_loading_info=True)
        assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}    # the caller's contract kept
        assert isinstance(AutoModel.from_pretrained(ckpts["pretraining"]), BertModel)
        llama = LlamaForCausalLM.from_pretrained(ckpts["llama"])                       # tied lm_head is fine
        assert llama.lm_head.weight is llama.model.embed_tokens.weight


def test_peft_named_checkpoint(ckpts):
    from transformers import BertModel

    _, info = BertModel.from_pretrained(ckpts["peft"], output_loading_info=True)
    assert len(info["missing_keys"]) == 39                                     # silently random unpatched
    with hfpatches.patched(PID), pytest.raises(LoadError) as ei:
        BertModel.from_pretrained(ckpts["peft"])
    r = ei.value.report
    assert r.count("missing-backbone") == 37 and r.count("peft-wrapped") == 39 + 8
    assert all("peft_state_dict" in e.fix for e in r.by_kind("peft-wrapped"))


def test_ignore_mismatched_sizes_backbone_raises_head_allowed(demo, ckpts, tmp_path):
    from transformers import BertForMaskedLM, BertForSequenceClassification

    # a 128-row position table and a 104-word vocabulary re-initialised: silent unpatched
    m, info = BertForMaskedLM.from_pretrained(ckpts["resized"], config=demo.tiny_bert_config(),
                                              ignore_mismatched_sizes=True, output_loading_info=True)
    assert len(info["mismatched_keys"]) == 3 and not info["missing_keys"]
    with hfpatches.patched(PID), pytest.raises(LoadError) as ei:
        BertForMaskedLM.from_pretrained(ckpts["resized"], config=demo.tiny_bert_config(), ignore_mismatched_sizes=True)
    r = ei.value.report
    assert r.model_keys("shape-mismatch") == {"bert.embeddings.word_embeddings.weight",
                                              "bert.embeddings.position_embeddings.weight"}
    assert r.model_keys("missing-new-head") == {"cls.predictions.bias"}          # a head of another size
    # another num_labels: the head is re-initialised, which is what the caller asked for
    BertForSequenceClassification(demo.tiny_bert_config(num_labels=2)).save_pretrained(tmp_path / "cls2")
    with hfpatches.patched(PID):
        model = BertForSequenceClassification.from_pretrained(tmp_path / "cls2", num_labels=5,
                                                              ignore_mismatched_sizes=True)
    assert model.classifier.weight.shape[0] == 5
    # without the flag transformers itself raises (not silent): left as it is
    with hfpatches.patched(PID), pytest.raises(RuntimeError) as ei2:
        BertForMaskedLM.from_pretrained(ckpts["resized"], config=demo.tiny_bert_config())
    assert not isinstance(ei2.value, LoadError)


def test_missing_one_backbone_weight(demo, tmp_path):
    from safetensors.torch import save_file
    from transformers import BertModel

    cfg = demo.tiny_bert_config()
    sd = BertModel(cfg).state_dict()
    gone = "encoder.layer.1.output.dense.weight"
    cfg.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in sd.items() if k != gone}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    BertModel.from_pretrained(tmp_path)                                         # unpatched: a warning only
    with hfpatches.patched(PID), pytest.raises(LoadError) as ei:
        BertModel.from_pretrained(tmp_path)
    assert ei.value.report.model_keys("missing-backbone") == {gone}
    assert ei.value.report.count("matched") == len(sd) - 1
