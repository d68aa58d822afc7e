"""The patch core on fake targets: order of checks, every outcome, exact revert, env, threads."""
from __future__ import annotations

import importlib
import json
import logging
import sys
import threading
import uuid

import pytest
import wrapt

import hfpatches
from hfpatches import Outcome, PatchError
from hfpatches._declare import Patch, ProbeResult, Target
from hfpatches._engine import ENGINE
from hfpatches._registry import register_for_tests as _register_for_tests, registry
from _fakes import forget, make_fake

HEAVY = ("torch", "transformers", "peft", "flash_attn", "liger_kernel", "flair", "accelerate", "trl", "triton")


@pytest.fixture
def fake(tmp_path):
    """A fresh fake package + a helper that registers patches against it (removed afterwards)."""
    name = "fakelib_" + uuid.uuid4().hex[:8]
    made: list[str] = []

    class F:
        mod = name

        @staticmethod
        def install(version="1.0.0"):
            make_fake(tmp_path, name, version)

        @staticmethod
        def imp():
            return importlib.import_module(name)

        @staticmethod
        def patch(pid=None, **kw):
            pid = pid or f"fake_{uuid.uuid4().hex[:6]}"
            kw.setdefault("summary", "fake")
            kw.setdefault("upstream", ("example/fake#1",))
            kw.setdefault("requires", (f"{name}>=1.0",))
            kw.setdefault("fixed_in", f"{name}>=2.0")
            kw.setdefault("targets", (Target(name, "add", params=("a", "b")),))
            kw.setdefault("probe", lambda: sys.modules[name].add(2, 2) != 4)
            kw.setdefault("apply", _fix_add)
            p = Patch(id=pid, **kw)
            _register_for_tests(p)
            made.append(pid)
            return p

    F.install()
    yield F
    for pid in made:
        hfpatches.revert([pid])
        registry().pop(pid, None)
        ENGINE.results.pop(pid, None)
    forget(name)


def _fix_add(ctx):
    mod = sys.modules[ctx.patch.targets[0].module]
    orig = mod.add

    def add(a, b):
        return a + b

    add.__module__ = mod.__name__  # our replacement; ownership is by identity, not module name
    ctx.replace(mod, "add", add)
    assert orig is not add


# ----------------------------------------------------------------------------- lightness
def test_import_and_apply_import_nothing_heavy(py):
    out = py("""
        import sys, hfpatches
        hfpatches.apply()
        print(",".join(sorted(m for m in %r if m in sys.modules)))
    """ % (HEAVY,)).stdout.strip()
    assert out == "", f"hfpatches.apply() imported heavy modules: {out}"


# ----------------------------------------------------------------------------- outcomes
def test_applied_verified_and_exact_revert(fake):
    mod = fake.imp()
    original = mod.add
    p = fake.patch()
    rep = hfpatches.apply(only=[p.id])
    assert rep[p.id].outcome == Outcome.APPLIED, rep
    assert rep[p.id].bug_present is True and rep[p.id].in_range is True
    assert mod.add(2, 2) == 4 and mod.add is not original
    assert hfpatches.get_original(p.id) is original
    assert hfpatches.get_original(f"{fake.mod}.add") is original
    assert hfpatches.get_original(mod.add) is original
    assert hfpatches.apply(only=[p.id])[p.id].outcome == Outcome.ALREADY_APPLIED
    rev = hfpatches.revert([p.id])
    assert rev[p.id].outcome == Outcome.DISABLED and "reverted" in rev[p.id].reason
    assert mod.add is original and mod.add(2, 2) == 5
    # apply -> revert -> apply works again
    assert hfpatches.apply(only=[p.id])[p.id].outcome == Outcome.APPLIED


def test_deferred_then_attaches_on_import_same_as_other_order(fake):
    p = fake.patch()
    assert fake.mod not in sys.modules
    rep = hfpatches.apply(only=[p.id])
    assert rep[p.id].outcome == Outcome.DEFERRED and fake.mod in rep[p.id].reason
    mod = fake.imp()
    assert hfpatches.status()[p.id].outcome == Outcome.APPLIED
    assert mod.add(2, 2) == 4
    hfpatches.revert([p.id])
    assert mod.add(2, 2) == 5


def test_revert_before_attach_never_attaches(fake):
    p = fake.patch()
    assert hfpatches.apply(only=[p.id])[p.id].outcome == Outcome.DEFERRED
    assert hfpatches.revert([p.id])[p.id].outcome == Outcome.DISABLED
    mod = fake.imp()
    assert mod.add(2, 2) == 5 and hfpatches.status()[p.id].outcome == Outcome.DISABLED


def test_inherited_attribute_is_deleted_on_revert_not_shadowed(fake):
    mod = fake.imp()

    def apply(ctx):
        ctx.wrap(mod.Child, "greet", lambda w, inst, a, k: w(*a, **k).upper())

    p = fake.patch(targets=(Target(fake.mod, "Child.greet"),), probe=lambda: mod.Child().greet("x") == "hello x",
                   apply=apply)
    assert "greet" not in vars(mod.Child)
    assert hfpatches.apply(only=[p.id])[p.id].outcome == Outcome.APPLIED
    assert mod.Child().greet("x") == "HELLO X" and mod.Base().greet("x") == "hello x"
    hfpatches.revert([p.id])
    assert "greet" not in vars(mod.Child), "revert left a shadow attribute on the subclass"
    assert mod.Child.greet is mod.Base.greet


def test_classmethod_stays_a_classmethod_for_subclasses(fake):
    mod = fake.imp()
    raw = vars(mod.Loader)["load"]

    def apply(ctx):
        ctx.wrap(mod.Loader, "load", lambda w, inst, a, k: ("patched",) + w(*a, **k))

    p = fake.patch(targets=(Target(fake.mod, "Loader.load", params=("cls", "path")),),
                   probe=lambda: mod.SubLoader.load("p")[0] != "patched", apply=apply)
    assert hfpatches.apply(only=[p.id])[p.id].outcome == Outcome.APPLIED
    assert mod.SubLoader.load("p") == ("patched", "SubLoader", "p")
    assert mod.Loader.load("q", 1, k=2) == ("patched", "Loader", "q")
    hfpatches.revert([p.id])
    assert vars(mod.Loader)["load"] is raw
    assert mod.SubLoader.load("p") == ("SubLoader", "p")


def test_not_installed(fake):
    fake.imp()
    p = fake.patch(requires=("surely-not-installed-dist-xyz>=1",))
    r = hfpatches.apply(only=[p.id])[p.id]
    assert r.outcome == Outcome.NOT_INSTALLED and "surely-not-installed-dist-xyz" in r.reason


def test_not_installed_module_is_known_without_importing_anything(fake):
    p = fake.patch(targets=(Target("surely_not_installed_mod_xyz.sub", "f"),))
    r = hfpatches.apply(only=[p.id])[p.id]
    assert r.outcome == Outcome.NOT_INSTALLED and "surely_not_installed_mod_xyz" in r.reason


def test_not_affected_by_version(fake):
    fake.imp()
    p = fake.patch(requires=(f"{fake.mod}<1.0",))
    r = hfpatches.apply(only=[p.id])[p.id]
    assert r.outcome == Outcome.NOT_AFFECTED and r.in_range is False and "fixed in" in r.reason


def test_not_affected_by_probe(fake):
    mod = fake.imp()
    p = fake.patch(probe=lambda: ProbeResult(False, "add is right"))
    r = hfpatches.apply(only=[p.id])[p.id]
    assert r.outcome == Outcome.NOT_AFFECTED and "add is right" in r.reason
    assert "add" not in {rec.name for rec in ENGINE.recorder.records(p.id)}
    assert mod.add(2, 2) == 5


@pytest.mark.parametrize("version", ["1.5.0.dev0", "1.5.0+cu121", "1.5.0rc1", "1.5.0.post2"])
def test_odd_versions_are_parsed_prereleases_allowed(tmp_path, version):
    name = "oddver_" + uuid.uuid4().hex[:6]
    make_fake(tmp_path, name, version)
    p = Patch(id="odd_" + name, summary="", upstream=(), requires=(f"{name}>=1.0,<2",), fixed_in=None,
              targets=(Target(name, "add"),), probe=lambda: sys.modules[name].add(2, 2) != 4, apply=_fix_add)
    _register_for_tests(p)
    try:
        importlib.import_module(name)
        r = hfpatches.apply(only=[p.id])[p.id]
        assert r.outcome == Outcome.APPLIED and r.target_version == f"{name} {version}"
    finally:
        hfpatches.revert([p.id])
        registry().pop(p.id)
        forget(name)


def test_target_changed_signature(fake):
    fake.imp()
    p = fake.patch(targets=(Target(fake.mod, "add", params=("x", "y")),))
    r = hfpatches.apply(only=[p.id])[p.id]
    assert r.outcome == Outcome.TARGET_CHANGED and "(a, b)" in r.reason and "(x, y)" in r.reason


def test_target_changed_missing_attribute(fake):
    fake.imp()
    p = fake.patch(targets=(Target(fake.mod, "Nope.add"),))
    r = hfpatches.apply(only=[p.id])[p.id]
    assert r.outcome == Outcome.TARGET_CHANGED and "not found" in r.reason


def test_failed_verify_rolls_back(fake):
    mod = fake.imp()
    original = mod.add
    p = fake.patch(probe=lambda: True)  # the bug never goes away
    r = hfpatches.apply(only=[p.id])[p.id]
    assert r.outcome == Outcome.FAILED and "rolled back" in r.reason
    assert mod.add is original and not ENGINE.recorder.records(p.id)


def test_failed_apply_rolls_back_partial_changes(fake):
    mod = fake.imp()
    original = mod.add

    def half(ctx):
        ctx.replace(mod, "add", lambda a, b: a + b)
        raise RuntimeError("boom")

    p = fake.patch(apply=half)
    r = hfpatches.apply(only=[p.id])[p.id]
    assert r.outcome == Outcome.FAILED and "boom" in r.reason and mod.add is original


def test_probe_that_raises_is_failed_not_hidden(fake):
    fake.imp()
    p = fake.patch(probe=lambda: 1 / 0)
    r = hfpatches.apply(only=[p.id])[p.id]
    assert r.outcome == Outcome.FAILED and "ZeroDivisionError" in r.reason


def test_conflict_with_foreign_wrapt_wrapper(fake):
    mod = fake.imp()
    wrapt.wrap_function_wrapper(mod, "add", lambda w, i, a, k: w(*a, **k))
    foreign = mod.add
    p = fake.patch()
    r = hfpatches.apply(only=[p.id])[p.id]
    assert r.outcome == Outcome.CONFLICT and "wrapt proxy" in r.reason
    assert mod.add is foreign


def test_conflict_with_foreign_function(fake):
    mod = fake.imp()

    def someone_elses_add(a, b):
        return a + b + 1

    mod.add = someone_elses_add  # defined in tests.test_core: not the target's own code
    p = fake.patch()
    r = hfpatches.apply(only=[p.id])[p.id]
    assert r.outcome == Outcome.CONFLICT and "someone_elses_add" in r.reason
    assert mod.add is someone_elses_add


def test_repatched_after_us_is_conflict_and_left_in_place(fake):
    mod = fake.imp()
    p = fake.patch()
    assert hfpatches.apply(only=[p.id])[p.id].outcome == Outcome.APPLIED

    def later(a, b):
        return 0

    mod.add = later
    assert hfpatches.apply(only=[p.id])[p.id].outcome == Outcome.CONFLICT
    r = hfpatches.revert([p.id])[p.id]
    assert r.outcome == Outcome.CONFLICT and mod.add is later


def test_two_patches_same_attribute_conflict(fake):
    fake.imp()
    a = fake.patch()
    b = fake.patch()
    assert hfpatches.apply(only=[a.id])[a.id].outcome == Outcome.APPLIED
    r = hfpatches.apply(only=[b.id])[b.id]
    # b's probe sees the fixed add -> not affected; force the probe to say "bug" to reach apply
    assert r.outcome == Outcome.NOT_AFFECTED
    c = fake.patch(probe=lambda: True)
    assert hfpatches.apply(only=[c.id])[c.id].outcome == Outcome.CONFLICT


def test_sixteen_threads_apply_once(fake):
    fake.imp()
    calls = []

    def counted(ctx):
        calls.append(1)
        _fix_add(ctx)

    p = fake.patch(apply=counted)
    barrier = threading.Barrier(16)
    outcomes = []

    def worker():
        barrier.wait()
        outcomes.append(hfpatches.apply(only=[p.id])[p.id].outcome)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(outcomes).count(Outcome.APPLIED) == 1
    assert outcomes.count(Outcome.ALREADY_APPLIED) == 15


def test_probe_off_trusts_version_range(fake, monkeypatch):
    fake.imp()
    probed = []
    p = fake.patch(probe=lambda: probed.append(1) or True)
    monkeypatch.setenv("HFPATCHES_PROBE", "0")
    r = hfpatches.apply(only=[p.id])[p.id]
    assert r.outcome == Outcome.APPLIED and "HFPATCHES_PROBE=0" in r.reason and probed == []


def test_probe_that_cannot_run_leaves_it_to_the_version_range(fake):
    """A probe answering ``bug_present=None`` (it could not run here, e.g. no device for the
    kernel it needs): the patch applies on the version range and the reason says no probe ran --
    never "probe found the bug"; outside the range it stays NOT_AFFECTED."""
    fake.imp()
    p = fake.patch(probe=lambda: ProbeResult(None, "no device for the kernel"))
    r = hfpatches.apply(only=[p.id])[p.id]
    assert r.outcome == Outcome.APPLIED and r.bug_present is None, r
    assert "probe could not run (no device for the kernel)" in r.reason and "not verified" in r.reason, r
    assert "found" not in r.reason and sys.modules[fake.mod].add(2, 2) == 4
    hfpatches.revert([p.id])
    q = fake.patch(probe=lambda: ProbeResult(None, "no device"), requires=(f"{fake.mod}>=9",))
    assert hfpatches.apply(only=[q.id])[q.id].outcome == Outcome.NOT_AFFECTED


# ----------------------------------------------------------------------------- selection / env
def test_unknown_id_is_a_clear_error(fake):
    p = fake.patch()
    with pytest.raises(ValueError, match="unknown patch id 'nope'.*valid ids:.*" + p.id):
        hfpatches.apply(only=["nope"])
    with pytest.raises(ValueError, match="unknown patch id 'nope'"):
        hfpatches.apply(exclude=["nope"])
    with pytest.raises(ValueError, match="unknown patch id"):
        hfpatches.revert(["nope"])


def test_env_only_and_disable(fake, monkeypatch):
    fake.imp()
    p = fake.patch()
    monkeypatch.setenv("HFPATCHES_DISABLE", p.id)
    r = hfpatches.apply()[p.id]
    assert r.outcome == Outcome.DISABLED and "HFPATCHES_DISABLE" in r.reason
    hfpatches.revert()  # apply() above switched the other patches on; disabling later never reverts
    monkeypatch.setenv("HFPATCHES_DISABLE", "*")
    rep = hfpatches.apply()
    assert all(x.outcome == Outcome.DISABLED for x in rep.values()), rep
    monkeypatch.delenv("HFPATCHES_DISABLE")
    q = fake.patch(targets=(Target(fake.mod, "Base.greet"),), probe=lambda: False)
    monkeypatch.setenv("HFPATCHES_ONLY", q.id)
    rep = hfpatches.apply()
    assert rep[p.id].outcome == Outcome.DISABLED and "HFPATCHES_ONLY" in rep[p.id].reason
    assert rep[q.id].outcome == Outcome.NOT_AFFECTED
    # arguments beat the environment
    assert hfpatches.apply(only=[p.id])[p.id].outcome == Outcome.APPLIED
    monkeypatch.setenv("HFPATCHES_ONLY", "nope")
    with pytest.raises(ValueError, match="HFPATCHES_ONLY"):
        hfpatches.apply()


@pytest.mark.parametrize("var,value", [("HFPATCHES_STRICT", "maybe"), ("HFPATCHES_PROBE", "2"),
                                       ("HFPATCHES_DISABLE", "meta buffers!")])
def test_malformed_env_is_an_error_at_apply(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=var):
        hfpatches.apply()


def test_opt_in_patch_needs_selection(fake, monkeypatch):
    fake.imp()
    p = fake.patch(default_enabled=False, enable_env="HFPATCHES_FAKE_OPTIN")
    r = hfpatches.apply()[p.id]
    assert r.outcome == Outcome.DISABLED and "opt-in" in r.reason
    monkeypatch.setenv("HFPATCHES_FAKE_OPTIN", "1")
    assert hfpatches.apply()[p.id].outcome == Outcome.APPLIED


def test_strict_raises_on_failure_and_at_deferred_attach(fake, monkeypatch):
    p = fake.patch(probe=lambda: True)  # verify always fails
    rep = hfpatches.apply(only=[p.id], strict=True)  # DEFERRED: nothing to judge yet
    assert rep[p.id].outcome == Outcome.DEFERRED
    with pytest.raises(PatchError, match=p.id):
        fake.imp()
    forget(fake.mod)
    hfpatches.revert([p.id])
    fake.imp()
    with pytest.raises(PatchError, match="FAILED"):
        hfpatches.apply(only=[p.id], strict=True)
    monkeypatch.setenv("HFPATCHES_STRICT", "1")
    with pytest.raises(PatchError):
        hfpatches.apply(only=[p.id])
    # the argument beats the environment
    assert hfpatches.apply(only=[p.id], strict=False)[p.id].outcome == Outcome.FAILED


def test_report_manifest_written_and_updated_on_attach(fake, tmp_path, monkeypatch):
    path = tmp_path / "logs" / "hfpatches.json"
    monkeypatch.setenv("HFPATCHES_REPORT", str(path))
    p = fake.patch()
    hfpatches.apply(only=[p.id])
    [rec_file] = (tmp_path / "logs" / "hfpatches.json.d").glob("*.json")   # this process's record
    data = json.loads(rec_file.read_text())
    assert data["patches"][p.id]["outcome"] == "DEFERRED" and p.id not in data["live"]
    fake.imp()
    data = json.loads(rec_file.read_text())
    assert data["patches"][p.id]["outcome"] == "APPLIED" and p.id in data["live"]
    assert data["versions"][fake.mod] == "1.0.0"


def test_every_outcome_is_logged_at_info(fake, caplog):
    fake.imp()
    p = fake.patch()
    with caplog.at_level(logging.INFO, logger="hfpatches"):
        hfpatches.apply(only=[p.id])
        hfpatches.revert([p.id])
    msgs = [r.getMessage() for r in caplog.records if r.name == "hfpatches"]
    assert any(f"{p.id}: APPLIED" in m for m in msgs) and any(f"{p.id}: DISABLED" in m for m in msgs)


def test_patched_restores_on_exception(fake):
    mod = fake.imp()
    original = mod.add
    p = fake.patch()
    with pytest.raises(KeyError):
        with hfpatches.patched(p.id) as rep:
            assert rep[p.id].outcome == Outcome.APPLIED and mod.add(2, 2) == 4
            raise KeyError("x")
    assert mod.add is original


def test_patched_keeps_what_was_live_before(fake):
    mod = fake.imp()
    p = fake.patch()
    hfpatches.apply(only=[p.id])
    live = mod.add
    with hfpatches.patched(p.id):
        pass
    assert mod.add is live


def test_status_has_no_side_effects(fake):
    p = fake.patch()
    before = set(sys.modules)
    st = hfpatches.status()
    assert st[p.id].outcome == Outcome.DISABLED and fake.mod not in sys.modules
    assert set(sys.modules) - before == set()


def test_report_table_and_json(fake):
    fake.imp()
    p = fake.patch()
    rep = hfpatches.apply(only=[p.id])
    text = str(rep)
    assert text.splitlines()[0].split()[:3] == ["patch", "outcome", "target"] and p.id in text
    data = json.loads(rep.to_json())
    assert data[p.id]["outcome"] == "APPLIED"
    assert rep.raise_for_failures() is rep


def test_list_patches_describes_every_patch():
    infos = hfpatches.list_patches()
    ids = {i.id for i in infos}
    assert {"flash_attn_bert_prefix", "liger_flash_kwargs", "meta_buffers", "peft_save_load"} <= ids
    for info in infos:
        assert info.summary and info.requires and info.targets and info.upstream


# ----------------------------------------------------------------------------- CLI
def test_cli_list_and_doctor_json(py):
    out = py("import sys; from hfpatches.__main__ import main; sys.exit(main(['list']))").stdout
    assert "meta_buffers" in out
    proc = py("import sys; from hfpatches.__main__ import main; sys.exit(main(['doctor', '--json']))")
    data = json.loads(proc.stdout)
    assert {r["patch"] for r in data["patches"]} >= {"meta_buffers", "liger_flash_kwargs"}
    assert data["versions"]["torch"].startswith("2.13.0")


def test_cli_doctor_strict_fails_on_bad_outcome(py):
    code = """
        import sys
        from hfpatches._declare import Patch, Target
        from hfpatches._registry import register_for_tests as _register_for_tests
        _register_for_tests(Patch(id="fake_changed", summary="", upstream=(), requires=("packaging>=1",),
            fixed_in=None, targets=(Target("packaging.version", "Version.__init__", params=("nope",)),),
            probe=lambda: True, apply=lambda ctx: None))
        from hfpatches.__main__ import main
        sys.exit(main(["doctor", "--strict"]))
    """
    proc = py(code, check=False, env={"HFPATCHES_ONLY": None})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "fake_changed" in proc.stdout and "TARGET_CHANGED" in proc.stdout and "strict: FAIL" in proc.stdout


def test_hook_waits_until_the_whole_package_is_initialised(tmp_path):
    """A target submodule imported by its package's __init__ fires its post-import hook while the
    package is half-initialised (torch.nn.modules.module inside `import torch`): attach after."""
    name = "halfinit_" + uuid.uuid4().hex[:6]
    make_fake(tmp_path, name, "1.0.0", source="from . import sub\nREADY = sub.add\n")
    (tmp_path / name / "sub.py").write_text("def add(a, b):\n    return a + b + (1 if (a, b) == (2, 2) else 0)\n")

    def apply(ctx):
        sub = sys.modules[f"{name}.sub"]
        ctx.replace(sub, "add", lambda a, b: a + b)

    p = Patch(id="fake_" + name, summary="", upstream=(), requires=(f"{name}>=1",), fixed_in=None,
              targets=(Target(f"{name}.sub", "add"),),
              probe=lambda: sys.modules[name].READY is not None and sys.modules[f"{name}.sub"].add(2, 2) != 4,
              apply=apply)
    _register_for_tests(p)
    try:
        assert hfpatches.apply(only=[p.id])[p.id].outcome == Outcome.DEFERRED
        importlib.import_module(name)
        st = hfpatches.status()[p.id]
        assert st.outcome == Outcome.APPLIED, st
    finally:
        hfpatches.revert([p.id])
        registry().pop(p.id)
        forget(name)


def test_cli_doctor_strict_fails_when_a_target_cannot_be_imported(py, tmp_path):
    """A patch whose target is installed but cannot be imported stays DEFERRED: nothing is
    verified, so ``doctor --strict`` exits 1 and --json says ok: false (issue 12 item 15)."""
    name = "brokenlib_" + uuid.uuid4().hex[:6]
    make_fake(tmp_path, name, "1.0.0", source="raise ImportError('needs a CUDA driver')\n")
    code = f"""
        import sys, json
        sys.path.insert(0, {str(tmp_path)!r})
        from hfpatches._declare import Patch, Target
        from hfpatches._registry import register_for_tests
        register_for_tests(Patch(id="fake_broken", summary="", upstream=(), requires=("{name}>=1",),
            fixed_in=None, targets=(Target("{name}", "x"),), probe=lambda: True, apply=lambda ctx: None))
        from hfpatches.__main__ import main
        sys.exit(main(["doctor", "--json", "--strict"]))
    """
    proc = py(code, check=False, env={"HFPATCHES_ONLY": "fake_broken"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    data = json.loads(proc.stdout)
    row = next(r for r in data["patches"] if r["patch"] == "fake_broken")
    assert row["outcome"] == "DEFERRED" and "cannot be imported" in row["reason"] and data["ok"] is False, row
    loose = py(code.replace('"--strict"', '"--json"'), check=False, env={"HFPATCHES_ONLY": "fake_broken"})
    assert loose.returncode == 0, loose.stdout + loose.stderr


@pytest.mark.parametrize("var", ["HFPATCHES_ONLY", "HFPATCHES_DISABLE"])
@pytest.mark.parametrize("value", [",,,", " , "])
def test_a_list_naming_no_patch_is_refused(monkeypatch, var, value):
    """HFPATCHES_ONLY=",,," used to disable every patch silently (issue 12 item 21)."""
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=f"{var}=.*names no patch id"):
        hfpatches.apply()


@pytest.mark.parametrize(("var", "value", "valid"), [("HFPATCHES_DTYPE_POLICY", "bf16", "backbone, float32"),
                                                       ("HFPATCHES_STRICT_LOADS", "maybe", "use 1 or 0"),
                                                       ("HFPATCHES_PROBE", "sometimes", "use 1 or 0")])
def test_every_switch_is_checked_at_apply_time(monkeypatch, var, value, valid):
    """A typo fails at apply(), naming the valid values, not at the first predict (item 14)."""
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=valid):
        hfpatches.apply()


def test_identity_status_and_revert_conflict_on_a_fake(fake):
    """status() checks identity: an original put back behind our back is not APPLIED; after a
    conflicting revert, apply() applies afresh once the original is back (item 8)."""
    m = fake.imp()
    p = fake.patch()
    assert hfpatches.apply(only=[p.id])[p.id].outcome == Outcome.APPLIED
    original = hfpatches.get_original(p.id)
    m.add = original                           # a library restores what it saved before apply()
    st = hfpatches.status()[p.id]
    assert st.outcome == Outcome.CONFLICT and "not live" in st.reason, st
    assert p.id not in ENGINE.live_ids()
    assert hfpatches.apply(only=[p.id])[p.id].outcome == Outcome.APPLIED
    m.add = lambda a, b: 0                     # somebody else re-patches on top
    m.add.__module__ = "somebody_else"
    assert hfpatches.revert([p.id])[p.id].outcome == Outcome.CONFLICT
    m.add = original
    assert hfpatches.apply(only=[p.id])[p.id].outcome == Outcome.APPLIED
    hfpatches.revert([p.id])
    assert m.add is original


def test_multi_target_patch_reverts_as_a_unit(fake):
    """Issue 24 item 7: a patch with two targets, one of them wrapped by somebody else after
    apply (a profiler wraps a patched ``forward``). ``revert()`` must never leave one target
    restored and the other patched: the whole patch stays in place, CONFLICT with the reason;
    once the other code puts our object back, revert restores both."""
    mod = fake.imp()

    def fix_both(ctx):
        def add(a, b):
            return a + b

        def greet(self, name):
            return "hi " + name

        add.__module__ = greet.__module__ = mod.__name__
        ctx.replace(mod, "add", add)
        ctx.replace(mod.Base, "greet", greet)

    p = fake.patch(apply=fix_both)
    raw_add, raw_greet = mod.add, vars(mod.Base)["greet"]
    assert hfpatches.apply(only=[p.id])[p.id].outcome == Outcome.APPLIED
    ours_add, ours_greet = mod.add, vars(mod.Base)["greet"]

    def profiled(a, b):   # somebody wraps our add
        return ours_add(a, b)

    profiled.__module__ = "a_profiler"
    mod.add = profiled
    r = hfpatches.revert([p.id])[p.id]
    assert r.outcome == Outcome.CONFLICT and "add" in r.reason and "left in place" in r.reason, r
    # the invariant: never one half patched and the other restored
    assert vars(mod.Base)["greet"] is ours_greet, "greet was restored while add stays patched (half-reverted)"
    assert mod.add is profiled and mod.Base().greet("x") == "hi x"
    assert hfpatches.status()[p.id].outcome == Outcome.CONFLICT
    mod.add = ours_add   # the profiler unwraps
    assert hfpatches.revert([p.id])[p.id].outcome == Outcome.DISABLED
    assert mod.add is raw_add and vars(mod.Base)["greet"] is raw_greet
