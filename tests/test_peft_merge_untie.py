"""peft_merge_untie: merge_and_unload() on a tied-embedding model with a trained modules_to_save
copy of lm_head / embed_tokens.

Tiny Llama (tie_word_embeddings=True) built in-process; LoRA on q/v plus modules_to_save, 3 SGD
steps, merge_and_unload(), save_pretrained(), from_pretrained(). In the affected range (peft
0.14-0.18.1) the reload differs from the merged model in memory by O(1) (the config still says
tied, loading re-ties); patched it is exact (0) and the config is untied with one warning. On
peft >= 0.19 the patch is NOT_AFFECTED and the round trip is exact by upstream's own fix.
Exactness: the same fp32 weights are saved and loaded, so the logits are bit-identical (0).
"""
from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import hfpatches  # noqa: E402
from hfpatches import Outcome  # noqa: E402
from hfpatches._engine import run_probe  # noqa: E402
from hfpatches.demos import peft_merge_untie as D  # noqa: E402
from hfpatches.patches.peft_merge_untie import impl as P  # noqa: E402

PID = P.PATCH_ID


@pytest.fixture(scope="module")
def affected() -> bool:
    """The installed peft is inside the patch's range (not decided by the stack's name)."""
    from importlib.metadata import version

    from packaging.requirements import Requirement

    from hfpatches._registry import registry

    req = Requirement(registry()[PID].requires[0])
    return req.specifier.contains(version(req.name), prereleases=True)


def _scenario(**kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = D.scenario(**kw)
    r["ours"] = [str(w.message) for w in caught if "hfpatches peft_merge_untie" in str(w.message)]
    return r


def _apply(affected):
    r = hfpatches.apply(only=[PID])[PID]
    if affected:
        assert (r.outcome, r.reason) == (Outcome.APPLIED, "probe found the bug; fix applied and verified"), r
    else:
        assert r.outcome == Outcome.NOT_AFFECTED and "fixed in peft>=0.19.0" in r.reason, r
    return r


@pytest.mark.parametrize("save", ["lm_head", "embed_tokens"])
def test_unpatched_reload_loses_the_trained_weights(affected, save):
    r = _scenario(save=save)
    assert not r["same_storage"]
    if affected:
        assert r["tied"] and r["diff"] > 0.1, r
    else:
        assert not r["tied"] and r["diff"] == 0.0, r


@pytest.mark.parametrize("save", ["lm_head", "embed_tokens"])
def test_patched_round_trip_is_exact(affected, save):
    _apply(affected)
    r = _scenario(save=save)
    assert r["diff"] == 0.0 and not r["tied"], r
    assert len(r["ours"]) == (1 if affected else 0), r["ours"]


def test_still_tied_stays_tied(affected):
    """LoRA only (no modules_to_save): after the merge the two embeddings are still one tensor:
    nothing changes, no warning."""
    _apply(affected)
    r = _scenario(save=None)
    assert r["same_storage"] and r["tied"] and r["diff"] == 0.0 and not r["ours"], r


def test_equal_values_stay_tied(affected):
    """A modules_to_save copy that was never trained: two tensors, equal values; a reload that
    re-ties loses nothing, so the config is left tied (no bigger checkpoint, no warning)."""
    _apply(affected)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged, _ = D.train_and_merge(D.tiny_tied(), steps=0)
    assert not any("hfpatches" in str(w.message) for w in caught)
    if affected:
        assert merged.config.tie_word_embeddings is True


def test_unload_and_merge_adapter_untouched(affected):
    """unload() (no merge) and merge_adapter() keep upstream's behaviour (0.19 changes neither)."""
    before = _scenario(merge="unload")
    _apply(affected)
    after = _scenario(merge="unload")
    assert (after["tied"], after["diff"]) == (before["tied"], before["diff"]) and not after["ours"], (before, after)
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(D.tiny_tied(), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        pm.base_model.model.lm_head.modules_to_save["default"].weight.add_(1.0)
    pm.merge_adapter()
    assert pm.base_model.model.config.tie_word_embeddings is True


def test_text_sub_config_is_untied_too():
    """A multimodal-style config: transformers' tie_weights reads get_text_config(decoder=True);
    both it and the top-level config are untied, one warning."""
    import logging

    class Text:
        tie_word_embeddings = True

    class Config:
        tie_word_embeddings = True

        def __init__(self):
            self.text = Text()

        def get_text_config(self, decoder=False):
            return self.text

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = Config()
            self.emb, self.head = torch.nn.Embedding(4, 2), torch.nn.Linear(2, 4, bias=False)

        def get_input_embeddings(self):
            return self.emb

        def get_output_embeddings(self):
            return self.head

    m = Model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = P.untie_after_merge(m, logging.getLogger("test"))
    assert names == ["config", "text config (Text)"] and len(caught) == 1
    assert m.config.tie_word_embeddings is False and m.config.text.tie_word_embeddings is False
    m2 = Model()
    m2.head.weight = m2.emb.weight          # one tensor: untouched
    assert P.untie_after_merge(m2, logging.getLogger("test")) == [] and m2.config.text.tie_word_embeddings


def test_probe(affected):
    """The probe: True in the range, False after the fix and on peft >= 0.19; it shows no warning
    and raises none even under ``-W error``, and leaves the RNG as it was."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = torch.random.get_rng_state()
        res = run_probe(PID)
        assert torch.equal(state, torch.random.get_rng_state())
        assert res.bug_present is affected, res
        if affected:
            _apply(affected)
            assert run_probe(PID).bug_present is False


def test_revert_identity(affected):
    import peft.tuners.tuners_utils as tu

    classes = P.tuner_classes(tu.BaseTuner)
    raw = {c: vars(c)[P.METHOD] for c in classes}
    assert classes and (not affected or any(c.__name__ == "LoraModel" for c in classes) or tu.BaseTuner in classes)
    r = _apply(affected)
    if r.outcome == Outcome.APPLIED:
        assert all(vars(c)[P.METHOD] is not raw[c] for c in classes)
    hfpatches.revert([PID])
    assert all(vars(c)[P.METHOD] is raw[c] for c in classes)
    if affected:
        assert _scenario()["tied"]      # the bug is back


def test_declaration():
    from packaging.requirements import Requirement

    from hfpatches._registry import registry

    p = registry()[PID]
    assert p.default_enabled and p.fixed_in == "peft>=0.19.0"
    spec = Requirement(p.requires[0]).specifier
    assert all(spec.contains(v) for v in ["0.11.1", "0.13.2", "0.14.0", "0.15.2", "0.17.0", "0.18.1"])
    assert not any(spec.contains(v) for v in ["0.19.0", "0.21.2"])
    doc = __import__(f"hfpatches.patches.{PID}", fromlist=["PATCH"]).__doc__
    assert len(doc.strip().splitlines()) <= 30
    heads = [ln for ln in doc.splitlines() if ln and not ln.startswith(" ")][1:]
    assert heads == ["Bug", "Affected", "Upstream", "Probe", "What changes"], heads


@pytest.mark.slow
def test_smollm2_real_weights(affected, smollm_dir):
    """SmolLM2-135M (tied): modules_to_save=["lm_head"], 3 steps, merge, save, reload."""
    from transformers import LlamaForCausalLM

    def case():
        model = LlamaForCausalLM.from_pretrained(smollm_dir, torch_dtype=torch.float32)
        assert model.config.tie_word_embeddings
        return _scenario(model=model)

    before = case()
    if affected:
        assert before["tied"] and before["diff"] > 0.1, before
    _apply(affected)
    after = case()
    # the trained head survives the round trip: what is left is float32 rounding of logits ~600
    # (the bug's difference is > 0.1 above)
    assert after["diff"] <= 1e-6 * after["scale"] and not after["tied"], after
