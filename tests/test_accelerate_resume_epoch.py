"""accelerate_resume_epoch: ``skip_first_batches`` drops the loader's epoch (accelerate < 1.15.0).

Scenarios from hfpatches/demos/accelerate_resume_epoch.py: resume after 3 batches of epoch 1 of a
``datasets`` iterable dataset with ``.shuffle()`` (``DataLoaderShard``, ``DataLoaderDispatcher``),
and ``Trainer.train(resume_from_checkpoint=...)``. Expectations follow the installed accelerate
(not the stack's name): in range, every bug case also runs unpatched and shows epoch 0's batches;
patched (or >= 1.15.0) the resumed batches are the uninterrupted run's. The Trainer path shows the
bug from accelerate 1.7.0 (measured); a subprocess reruns it on the accelerate 1.14.0 overlay when
``.cache/overlay/accelerate-1.14.0`` exists.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")

import hfpatches  # noqa: E402
from hfpatches._engine import run_check, run_probe  # noqa: E402
from hfpatches._registry import registry  # noqa: E402
from hfpatches.demos import accelerate_resume_epoch as demo  # noqa: E402
from hfpatches.patches.accelerate_resume_epoch import impl  # noqa: E402

PID = "accelerate_resume_epoch"
ROOT = Path(__file__).resolve().parents[1]
OVERLAY_1_14 = Path(os.environ.get("HFPATCHES_CACHE", ROOT / ".cache")) / "overlay" / "accelerate-1.14.0"


def _accelerate_version():
    import importlib.metadata as md

    from packaging.version import Version

    return Version(md.version("accelerate"))


def in_range() -> bool:
    from packaging.requirements import Requirement

    req = Requirement(registry()[PID].requires[0])
    return req.specifier.contains(_accelerate_version(), prereleases=True)


def trainer_path_affected(accelerate_version=None) -> bool:
    """Measured: the Trainer's seedable sampler is reset by the skipped loader from accelerate
    1.7.0 on, with a transformers 4.x Trainer (it calls ``set_epoch`` on the loader *before*
    ``skip_first_batches``: read in 4.50.3-4.57.6, measured on 4.51.3); transformers 5.x (5.23.0)
    calls it on the skipped loader, so its Trainer resume is right even on accelerate 1.14.0."""
    import importlib.metadata as md

    from packaging.version import Version

    v = Version(accelerate_version) if accelerate_version else _accelerate_version()
    return Version("1.7.0") <= v < Version("1.15.0") and Version(md.version("transformers")) < Version("5")


def _apply():
    rep = hfpatches.apply(only=[PID])[PID]
    want = hfpatches.Outcome.APPLIED if in_range() else hfpatches.Outcome.NOT_AFFECTED
    assert rep.outcome == want, rep.reason
    return rep


def _importers():
    import accelerate
    import accelerate.accelerator
    import accelerate.data_loader

    mods = [accelerate.data_loader, accelerate, accelerate.accelerator]
    try:
        import transformers.trainer
    except ImportError:
        return mods
    return mods + [transformers.trainer]


# ----------------------------------------------------------------------------- declaration, outcome
def test_declaration():
    p = registry()[PID]
    assert p.requires == ("accelerate<1.15.0",) and p.fixed_in == "accelerate>=1.15.0"
    assert p.default_enabled and "huggingface/accelerate#4071" in p.upstream
    assert p.modules == ("accelerate",)
    assert run_check(PID) is None


def test_outcome_and_exact_revert():
    mods = _importers()
    before = {m.__name__: vars(m)["skip_first_batches"] for m in mods}
    original = before["accelerate.data_loader"]
    assert all(v is original for v in before.values()), before      # imported by name everywhere
    rep = _apply()
    after = {m.__name__: vars(m)["skip_first_batches"] for m in mods}
    if in_range():
        proxy = after["accelerate.data_loader"]
        assert proxy is not original and proxy.__wrapped__ is original
        assert all(v is proxy for v in after.values()), after       # every importer reaches the fix
        assert "probe found the bug" in rep.reason
    else:
        assert after == before and all(after[k] is before[k] for k in before)
    hfpatches.revert([PID])
    assert all(vars(m)["skip_first_batches"] is before[m.__name__] for m in mods)


# ----------------------------------------------------------------------------- probe
def test_probe_before_after_revert():
    before = run_probe(PID)
    assert before.bug_present is in_range(), before
    if in_range():
        assert "DataLoaderShard iterates at epoch 0" in before.detail
        assert "DataLoaderDispatcher restarts at epoch 0" in before.detail
        _apply()
        after = run_probe(PID)
        assert after.bug_present is False and "DataLoaderShard iterates at epoch 1" in after.detail, after
        hfpatches.revert([PID])
        assert run_probe(PID).bug_present


def test_probe_is_cheap_silent_and_global_state_free(py):
    """A fresh interpreter, every warning an error: the probe creates neither of accelerate's
    process-wide singletons, leaves the global RNG where it was and prints nothing."""
    proc = py("""
        import json, time, warnings
        warnings.simplefilter("error")
        import torch, accelerate.data_loader
        from accelerate.state import GradientState, PartialState
        from hfpatches._engine import run_probe
        rng = torch.random.get_rng_state()
        t = time.perf_counter(); r = run_probe("accelerate_resume_epoch"); first = time.perf_counter() - t
        t = time.perf_counter(); run_probe("accelerate_resume_epoch"); second = time.perf_counter() - t
        print("RESULT " + json.dumps({"bug": r.bug_present, "first": first, "second": second,
              "rng": torch.equal(rng, torch.random.get_rng_state()),
              "partial": len(PartialState._shared_state), "gradient": len(GradientState._shared_state)}))
    """, env={"PYTHONWARNINGS": "error"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1 and proc.stdout.strip() == lines[0], proc.stdout
    assert proc.stderr == "", proc.stderr
    res = json.loads(lines[0][7:])
    assert res["bug"] is in_range()
    assert res["rng"] and res["partial"] == 0 and res["gradient"] == 0, res
    assert res["second"] < 0.3 and res["first"] < 1.0, res


# ----------------------------------------------------------------------------- the loaders
@pytest.mark.parametrize("kind", demo.KINDS)
def test_loader_resume(kind):
    pytest.importorskip("datasets")
    unpatched = demo.loader_case(kind)
    assert unpatched["epoch0"] != unpatched["epoch1"]                 # set_epoch changes the order
    ok, replay, n = demo.score(unpatched)
    assert n == 5
    if in_range():
        assert (ok, replay) == (0, 5), unpatched                     # epoch 0's batches, not epoch 1's
    else:
        assert ok == 5, unpatched
    _apply()
    patched = demo.loader_case(kind)
    assert patched["epoch1"] == unpatched["epoch1"] and patched["epoch0"] == unpatched["epoch0"]
    assert patched["resumed"] == patched["want"] == unpatched["want"], patched


def test_plain_loaders_are_untouched():
    """A plain ``DataLoader`` (map-style: ``DataLoader`` with a skipping batch sampler; iterable:
    ``SkipDataLoader``): no epoch of its own, the same result with the patch."""
    pytest.importorskip("datasets")
    from accelerate import data_loader as dl_mod

    def run():
        out = []
        for data in (list(range(10)), demo.shuffled_iterable()):
            if not isinstance(data, list):
                data.set_epoch(1)
            loader = torch.utils.data.DataLoader(data, batch_size=2, generator=torch.Generator())
            new = dl_mod.skip_first_batches(loader, 2)
            out.append((type(new).__name__, hasattr(new, "iteration"),
                        [b["x"].tolist() if isinstance(b, dict) else b.tolist() for b in new]))
        return out

    unpatched = run()
    assert [k for k, _, _ in unpatched] == ["DataLoader", "SkipDataLoader"]
    _apply()
    assert run() == unpatched


def test_wrapper_acts_only_while_applied():
    """A module that imported the wrapper while it was applied keeps it after a revert: it then
    passes straight through (the bug is back) and acts again after a new apply."""
    if not in_range():
        pytest.skip("accelerate >= 1.15.0: the patch is not applied")
    import accelerate.data_loader as m

    _apply()
    captured = m.skip_first_batches
    hfpatches.revert([PID])

    def epoch_after_skip():
        loader = impl._epoch_dataset()
        shard = m.DataLoaderShard(loader, batch_size=1, generator=torch.Generator())
        shard.set_epoch(1)
        return captured(shard, 1).iteration

    assert epoch_after_skip() == 0
    _apply()
    assert epoch_after_skip() == 1


# ----------------------------------------------------------------------------- the Trainer
def _trainer_expectations(unpatched: dict, patched: dict, affected: bool) -> None:
    ok, replay, n = demo.score(unpatched)
    assert n == 5
    if affected:
        assert (ok, replay) == (0, 5), unpatched
    else:
        assert ok == 5, unpatched
    assert patched["epoch0"] == unpatched["epoch0"] and patched["epoch1"] == unpatched["epoch1"]
    assert demo.score(patched) == (5, 0, 5), patched


def test_trainer_resume():
    pytest.importorskip("transformers")
    unpatched = demo.trainer_case()
    _apply()
    patched = demo.trainer_case()
    _trainer_expectations(unpatched, patched, trainer_path_affected())


_CHILD = """
import json, warnings
warnings.simplefilter("ignore")
import accelerate, hfpatches
from hfpatches.demos import accelerate_resume_epoch as d
def cases():
    return {"trainer": d.trainer_case(), **{k: d.loader_case(k) for k in d.KINDS}}
out = {"version": accelerate.__version__, "unpatched": cases()}
out["outcome"] = hfpatches.apply(only=["accelerate_resume_epoch"])["accelerate_resume_epoch"].outcome.value
out["patched"] = cases()
print("RESULT " + json.dumps(out))
"""


def test_accelerate_1_14_overlay(py):
    """accelerate 1.14.0 (the last affected release) beside this stack's transformers, in a fresh
    interpreter: both loader kinds 0/5 unpatched (epoch 0's batches), 5/5 patched; the Trainer
    resume 0/5 -> 5/5 where the Trainer path shows the bug (transformers 4.x), 5/5 both ways
    otherwise."""
    pytest.importorskip("transformers")
    if not (OVERLAY_1_14 / "accelerate").is_dir():
        pytest.skip(f"no accelerate 1.14.0 overlay at {OVERLAY_1_14} (pip install --no-deps --target ... accelerate==1.14.0)")
    if str(_accelerate_version()) == "1.14.0":
        pytest.skip("this stack's accelerate is 1.14.0: test_trainer_resume covers it")
    tests = Path(__file__).resolve().parent
    proc = py(_CHILD, env={"PYTHONPATH": os.pathsep.join([str(OVERLAY_1_14), str(tests), str(ROOT)])})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout + proc.stderr
    res = json.loads(lines[-1][7:])
    assert res["version"] == "1.14.0" and res["outcome"] == "APPLIED", res
    for kind in demo.KINDS:
        assert demo.score(res["unpatched"][kind])[:2] == (0, 5), res["unpatched"][kind]
        assert demo.score(res["patched"][kind]) == (5, 0, 5), res["patched"][kind]
    _trainer_expectations(res["unpatched"]["trainer"], res["patched"]["trainer"],
                          affected=trainer_path_affected("1.14.0"))


def test_xla_wrapped_loaders_carry_the_epoch():
    """Under XLA ``skip_first_batches`` takes and returns accelerate's ``MpDeviceLoaderWrapper``
    (the ``DataLoaderShard`` that owns the epoch is its ``_loader``): the inner loader gets the
    epoch. Stand-in wrappers (no torch_xla here) around real loaders; accelerate's own function is
    replaced by one that builds what it builds under XLA."""
    if not in_range():
        pytest.skip("accelerate >= 1.15.0: the patch is not applied")
    import accelerate.data_loader as m

    class XlaWrapper:            # what MpDeviceLoaderWrapper holds: the shard as ``_loader``
        def __init__(self, loader):
            self._loader = loader

    def under_xla(dataloader, num_batches=0):
        inner = dataloader._loader
        return XlaWrapper(m.DataLoaderShard(inner.dataset, batch_size=1, generator=torch.Generator()))

    _apply()
    old = m.DataLoaderShard(impl._epoch_dataset(), batch_size=1, generator=torch.Generator())
    old.set_epoch(1)
    new = impl.carry_epoch(under_xla, None, (XlaWrapper(old), 1), {})
    assert isinstance(new, XlaWrapper) and new._loader.iteration == 1
