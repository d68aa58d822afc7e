"""trainer_grad_accum_scaling: Trainer with GA and no ``num_items_in_batch`` on a model taking ``**kwargs``.

Measured by training (hfpatches.demos.trainer_grad_accum_scaling): one SGD step (lr=1, no
clipping), GA=4 x batch 1 against GA=1 x batch 4 over the same four examples, the ratio of the
update norms and of the logged losses. Where the installed transformers is in the patch's range
(4.51.3 on the affected stack) every bug case also runs without hfpatches and shows 4.0; with the
patch it is 1.0 (+-1e-3). The paths that were already right (labels, compute_loss_func, a model
without **kwargs) give bit-identical updates and logged losses with and without the patch.
Out of range (transformers 5.x on the latest stack) the patch is NOT_AFFECTED and the scenario
gives 1.0 by itself.
"""
from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import hfpatches  # noqa: E402
from hfpatches._engine import run_probe  # noqa: E402
from hfpatches._registry import registry  # noqa: E402
from hfpatches.demos import trainer_grad_accum_scaling as demo  # noqa: E402
from hfpatches.patches.trainer_grad_accum_scaling import impl  # noqa: E402

PID = impl.PATCH_ID
ATOL = 1e-3


@pytest.fixture(scope="module")
def tr():
    import transformers.trainer

    return transformers.trainer


@pytest.fixture(scope="module")
def in_range(tr):
    """Is the installed transformers inside the declared range? (From the engine's own judgement.)"""
    rep = hfpatches.apply(only=[PID])[PID]
    hfpatches.revert([PID])
    return bool(rep.in_range)


def _apply():
    rep = hfpatches.apply(only=[PID])[PID]
    assert rep.outcome == hfpatches.Outcome.APPLIED, rep.reason
    return rep


# ----------------------------------------------------------------------------- declaration, outcome, probe
def test_declaration():
    p = registry()[PID]
    assert p.requires == ("transformers>=4.48.1,<4.53",) and p.fixed_in == "transformers>=4.53"
    assert p.default_enabled and p.modules == ("transformers.trainer",)
    assert [t.path for t in p.targets] == ["transformers.trainer.Trainer.training_step"]


def test_outcome_and_exact_revert(tr, in_range):
    original = vars(tr.Trainer)["training_step"]
    rep = hfpatches.apply(only=[PID])[PID]
    if in_range:
        assert rep.outcome == hfpatches.Outcome.APPLIED and rep.bug_present, rep
        assert "probe found the bug; fix applied and verified" in rep.reason
        assert type(vars(tr.Trainer)["training_step"]).__name__ == "FunctionWrapper"
        assert hfpatches.get_original(PID) is original
        assert hfpatches.apply(only=[PID])[PID].outcome == hfpatches.Outcome.ALREADY_APPLIED
    else:
        assert rep.outcome == hfpatches.Outcome.NOT_AFFECTED, rep
        assert vars(tr.Trainer)["training_step"] is original
    hfpatches.revert([PID])
    assert vars(tr.Trainer)["training_step"] is original


def test_probe_is_behavioural_quiet_and_cheap(tr, in_range, capsys):
    import time

    rng, dtype = torch.random.get_rng_state(), torch.get_default_dtype()
    registry_before = dict(getattr(tr, "__warningregistry__", {}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = time.perf_counter()
        before = run_probe(PID)
        took = time.perf_counter() - t
    assert took < 0.3, took
    assert torch.equal(rng, torch.random.get_rng_state()) and torch.get_default_dtype() == dtype
    assert dict(getattr(tr, "__warningregistry__", {})) == registry_before
    assert capsys.readouterr() == ("", "")
    assert before.bug_present is in_range, before
    assert ("backward 1, returned 1" if in_range else "backward 0.5, returned 0.5") in before.detail
    if in_range:
        _apply()
        after = run_probe(PID)
        assert after.bug_present is False and "backward 0.5, returned 0.5" in after.detail, after
        hfpatches.revert([PID])
        assert run_probe(PID).bug_present is True


# ----------------------------------------------------------------------------- the bug, trained
@pytest.mark.parametrize("stage", ["unpatched", "patched"])
def test_own_compute_loss_without_labels(in_range, stage):
    """A Trainer subclass with its own compute_loss on batches without labels, a Llama."""
    if stage == "patched":
        if not in_range:
            pytest.skip("out of the affected range: NOT_AFFECTED, nothing to apply")
        _apply()
    ratio, loss_ratio, _, _ = demo.update_ratio("custom")
    expected = 4.0 if (in_range and stage == "unpatched") else 1.0
    assert ratio == pytest.approx(expected, abs=ATOL), ratio
    assert loss_ratio == pytest.approx(expected, abs=ATOL), loss_ratio


@pytest.mark.parametrize("stage", ["unpatched", "patched"])
def test_trl_orpo(in_range, stage):
    pytest.importorskip("datasets")
    try:
        from trl import ORPOTrainer  # noqa: F401
    except ImportError:
        pytest.skip("the installed TRL has no trl.ORPOTrainer")
    if stage == "patched":
        if not in_range:
            pytest.skip("out of the affected range: NOT_AFFECTED, nothing to apply")
        _apply()
    ratio, loss_ratio, _, _ = demo.update_ratio("orpo")
    expected = 4.0 if (in_range and stage == "unpatched") else 1.0
    assert ratio == pytest.approx(expected, abs=ATOL), ratio
    assert loss_ratio == pytest.approx(expected, abs=ATOL), loss_ratio


@pytest.mark.parametrize("case", ["labels", "compute_loss_func", "no_kwargs"])
def test_correct_paths_are_bit_identical(in_range, case):
    """Paths the installed code already scales right: every update and logged loss is the same,
    bit for bit, with the patch (GA=4 x 1, and the GA=1 reference they match)."""
    if not in_range:
        pytest.skip("out of the affected range: the patch does not apply")
    runs = {}
    for stage in ("unpatched", "patched"):
        if stage == "patched":
            _apply()
        runs[stage] = demo.update_ratio(case)
    (r0, l0, u0, losses0), (_, _, u1, losses1) = runs["unpatched"], runs["patched"]
    assert r0 == pytest.approx(1.0, abs=ATOL) and l0 == pytest.approx(1.0, abs=ATOL)
    for a, b in zip(u0, u1):
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert losses0 == losses1


# ----------------------------------------------------------------------------- the wrapper itself
class _Recording(impl._StandInTrainer):
    """A stand-in whose compute_loss records what it sees of ``self``."""

    def __init__(self, loss, distributed_type="NO", **attrs):
        super().__init__(loss)
        self.accelerator.distributed_type = distributed_type
        self.kwargs_seen: list = []
        self.accepts_seen: list = []
        for k, v in attrs.items():
            setattr(self, k, v)
        acc = self.accelerator

        def backward(loss, **kwargs):
            acc.losses.append(loss)
            self.kwargs_seen.append(kwargs)

        acc.backward = backward

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.accepts_seen.append(self.model_accepts_loss_kwargs)
        return self._loss


def _step(tr, trainer, num_items=None, *, via="bound"):
    model = torch.nn.Module()
    if via == "class":
        return tr.Trainer.training_step(trainer, model, {}, num_items)
    if via == "keyword":
        return tr.Trainer.training_step(trainer, model, {}, num_items_in_batch=num_items)
    return vars(tr.Trainer)["training_step"].__get__(trainer, type(trainer))(model, {}, num_items)


@pytest.mark.parametrize("distributed_type", ["NO", "DEEPSPEED"])
def test_only_the_buggy_case_changes(tr, in_range, distributed_type):
    """The installed training_step on stand-ins, unpatched vs patched: with num_items_in_batch,
    with compute_loss_func, or with a model without **kwargs the loss handed to backward, the
    returned loss and backward's keywords (DeepSpeed: scale_wrt_gas=False) are the same; with none
    of them the loss is halved (GA=2) and backward's keywords are unchanged. The trainer is not
    modified and its compute_loss sees model_accepts_loss_kwargs True."""
    if not in_range:
        pytest.skip("out of the affected range: the patch does not apply")
    from accelerate.utils import DistributedType

    dt = getattr(DistributedType, distributed_type)
    cases = {"num_items": ({}, torch.tensor(7)), "compute_loss_func": ({"compute_loss_func": len}, None),
             "no_kwargs": ({"model_accepts_loss_kwargs": False}, None), "buggy": ({}, None)}
    seen: dict = {}
    for stage in ("unpatched", "patched"):
        if stage == "patched":
            _apply()
        for name, (attrs, num) in cases.items():
            for via in ("bound", "class", "keyword"):
                loss = torch.tensor(3.0)
                t = _Recording(loss, dt, **attrs)
                before = dict(vars(t))
                out = _step(tr, t, num, via=via)
                assert vars(t).keys() == before.keys() and all(vars(t)[k] is v for k, v in before.items()
                                                               if k not in ("kwargs_seen", "accepts_seen"))
                seen[stage, name, via] = (float(t.accelerator.losses[0]), float(out), t.kwargs_seen[0],
                                          t.accepts_seen[0])
    for (stage, name, via), (handed, returned, kw, accepts) in seen.items():
        want = {"scale_wrt_gas": False} if distributed_type == "DEEPSPEED" else {}
        assert kw == want, (stage, name, via, kw)
        assert accepts == cases[name][0].get("model_accepts_loss_kwargs", True)
        if name == "buggy":
            expected = 3.0 if stage == "unpatched" else 1.5
            assert handed == returned == expected, (stage, via, handed, returned)
        else:
            assert (handed, returned) == seen["unpatched", name, via][:2]


def test_subclass_calling_super_is_covered(tr, in_range):
    """A subclass overriding training_step and calling super() (like TRL's GKDTrainer) goes
    through the fix; one that never calls it (TRL's OnlineDPO/NashMD/XPO) is untouched."""
    if not in_range:
        pytest.skip("out of the affected range: the patch does not apply")

    class Calls(_Recording, tr.Trainer):     # the stand-in's attributes, Trainer's training_step
        def training_step(self, model, inputs, num_items_in_batch=None):
            return super().training_step(model, inputs, num_items_in_batch)

    _apply()
    t = Calls(torch.tensor(2.0))
    assert float(t.training_step(torch.nn.Module(), {}, None)) == 1.0
    assert float(t.accelerator.losses[0]) == 1.0
    assert t.accepts_seen == [True] and "model_accepts_loss_kwargs" not in vars(t)


def test_demo_runs(in_range):
    lines: list[str] = []
    assert demo.run(lines.append), lines
    assert any("with hfpatches" in ln for ln in lines)
