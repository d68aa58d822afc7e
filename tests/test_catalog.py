"""The catalog (issues 20.3, 20.4, 25.4, 25.5): the start-up index, advisories, one range judge,
and facts stated once (docstring citations in ``upstream``, ``affected`` never restating
``requires``, env variables through ``_env``, the README tables generated)."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hfpatches
from conftest import ROOT
from hfpatches import _ranges
from hfpatches._declare import SEVERITIES, Advisory, Patch, Target
from hfpatches._registry import advisories, declarations, register_for_tests, registry

PKG = Path(hfpatches.__file__).resolve().parent
OVERLAY = Path(os.environ.get("HFPATCHES_CACHE", ROOT / ".cache")) / "overlay"


def _matrix():
    spec = importlib.util.spec_from_file_location("_matrix_script", ROOT / "scripts" / "matrix.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- 20.4 the start-up index
def test_index_is_current():
    """``hfpatches/_index.py`` is what the declarations say: regenerate with ``make matrix``."""
    expected = _matrix().index_source()
    assert (PKG / "_index.py").read_text(encoding="utf-8") == expected, \
        "hfpatches/_index.py is stale: run `make matrix` (scripts/matrix.py --write)"


def test_index_entries_equal_the_declarations():
    from hfpatches._index import PATCHES

    decl = declarations()
    assert {p.id: p for p in PATCHES} == {k: v for k, v in decl.items() if k in {p.id for p in PATCHES}}
    assert {k: v for k, v in registry().items() if k in decl} == decl


def test_startup_imports_no_declaration(tmp_path):
    code = ("import sys, hfpatches; hfpatches.apply(); "
            "print(sorted(m for m in sys.modules if m.startswith('hfpatches.patches')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.strip()
    assert out == "[]", out


def test_a_patch_missing_from_the_index_is_still_read(tmp_path):
    """A new patch directory before ``make matrix``: start-up reads its declaration (correct, not
    free); the drift check above is what fails."""
    import shutil

    shutil.copytree(PKG, tmp_path / "hfpatches", ignore=shutil.ignore_patterns("__pycache__"))
    src = tmp_path / "hfpatches" / "patches" / "meta_buffers"
    dst = tmp_path / "hfpatches" / "patches" / "meta_buffers_copy"
    shutil.copytree(src, dst)
    init = dst / "__init__.py"
    init.write_text(init.read_text().replace('id="meta_buffers"', 'id="meta_buffers_copy"'))
    shutil.rmtree(tmp_path / "hfpatches" / "patches" / "strict_loads")   # an index entry without a directory
    code = "import hfpatches; print(sorted(p.id for p in hfpatches.list_patches()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)}).stdout
    assert "meta_buffers_copy" in out and "strict_loads" not in out, out


def test_benchmark_states_the_budget_once():
    """The start-up budget is a number in one place (benchmarks/startup.py: BUDGET_MS)."""
    hits = []
    for path in [*PKG.rglob("*.py"), ROOT / "CONTRIBUTING.md"]:
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"start-up budget[^.]*\b\d+ ?ms", line) or re.search(r"<= ?\d+ ?ms", line):
                hits.append(f"{path.name}:{no}: {line.strip()}")
    assert not hits, hits
    assert "BUDGET_MS = 5" in (ROOT / "benchmarks" / "startup.py").read_text()


# ----------------------------------------------------------------------------- 25.4 one range judge
def test_range_judge():
    assert _ranges.judge("torch>=2.1", "2.13.0+cpu") == _ranges.IN
    assert _ranges.judge("torch<2.13", "2.13.0+cpu") == _ranges.OUT      # a local label compares as its release
    assert _ranges.judge("torch>=2.1", None) == _ranges.MISSING
    assert _ranges.judge("torch>=2.1", "not a version") == _ranges.UNPARSEABLE
    assert _ranges.judge("torch>=2.1; python_version < '3'", "2.13.0") == _ranges.IGNORED
    assert _ranges.judge("torch>=2.1; sys_platform == 'x'", "2.13.0", {"sys_platform": "x"}) == _ranges.IN


def test_engine_and_audit_judge_markers_alike(tmp_path, capsys):
    """``requires`` with an environment marker that is false here: the engine used to ignore the
    marker (and apply), audit honoured it (not-affected). Both say not affected now."""
    from _fakes import forget, make_fake
    from hfpatches import _audit
    from hfpatches.__main__ import main

    name = "fakemarker_lib"
    make_fake(tmp_path, name, "1.0.0")
    p = Patch(id="fake_marker", summary="", upstream=(), requires=(f"{name}>=1.0; python_version < '3'",),
              fixed_in=None, targets=(Target(name, "add", params=("a", "b")),), probe=lambda: True,
              apply=lambda ctx: ctx.replace(sys.modules[name], "add", lambda a, b: a + b))
    register_for_tests(p)
    try:
        __import__(name)
        res = hfpatches.apply(only=["fake_marker"])["fake_marker"]
        assert res.outcome == hfpatches.Outcome.NOT_AFFECTED and res.in_range is False, res
        req = tmp_path / "r.txt"
        req.write_text(f"{name}==1.0.0\n")
        assert main(["audit", str(req), "--json"]) == 0
        row = next(r for r in json.loads(capsys.readouterr().out)["patches"] if r["id"] == "fake_marker")
        assert row["status"] == "not-affected", row
        assert _audit is not None
    finally:
        hfpatches.revert(["fake_marker"])
        registry().pop("fake_marker", None)
        forget(name)


def test_opt_in_hint_built_once():
    p = registry()["strict_loads"]
    assert hfpatches.apply()["strict_loads"].reason == f"opt-in: {p.opt_in_hint}"
    for path in (PKG / "_engine.py", PKG / "_audit.py"):
        assert "enable with only=" not in path.read_text() and "switch it on" not in path.read_text()


def test_declarations_use_env_constants():
    """No declaration spells an ``HFPATCHES_*`` literal; ``enable_env`` names a variable of ``_env``."""
    from hfpatches import _env

    for pid, p in declarations().items():
        if p.enable_env is not None:
            assert p.enable_env in _env.ALL, (pid, p.enable_env)
        tree = ast.parse((PKG / "patches" / pid / "__init__.py").read_text())
        doc = ast.get_docstring(tree, clean=False)
        literals = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                    and n.value != doc and "HFPATCHES_" in n.value]
        assert not literals, (pid, literals)


# ----------------------------------------------------------------------------- 25.5 facts once
_REF = re.compile(r"([A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+)#(\d+)|(?<![\w/])#(\d+)")


def docstring_refs(doc: str) -> set[str]:
    """Every ``owner/repo#N`` of a docstring; a bare ``#N`` belongs to the repo named last before it."""
    refs, repo = set(), None
    for m in _REF.finditer(doc):
        if m.group(1):
            repo = m.group(1)
            refs.add(f"{repo}#{m.group(2)}")
        elif repo is not None:
            refs.add(f"{repo}#{m.group(3)}")
    return refs


def test_docstring_citations_are_in_upstream():
    assert docstring_refs("a/b#1, #2; c/d#3 (#4)") == {"a/b#1", "a/b#2", "c/d#3", "c/d#4"}
    for pid, p in declarations().items():
        doc = importlib.import_module(f"hfpatches.patches.{pid}").__doc__ or ""
        missing = docstring_refs(doc) - set(p.upstream)
        assert not missing, f"{pid}: the docstring cites {sorted(missing)}, PATCH.upstream lacks them"



def test_affected_does_not_restate_requires():
    """``affected=`` says only what ``requires`` does not (the README shows ``requires`` itself)."""
    for pid, p in declarations().items():
        bounds = {s.version for line in p.requires for s in _ranges.requirement(line).specifier}
        repeated = sorted(v for v in bounds if re.search(rf"(?<![\d.]){re.escape(v)}(?![\d])", p.affected))
        assert not repeated, f"{pid}: affected={p.affected!r} restates the bounds {repeated} of requires"
        assert _matrix().affected_text(p).startswith(", ".join(f"`{r}`" for r in p.requires))


def test_readme_tables_are_generated():
    m = _matrix()
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert m.render(text) == text, "README tables are stale: run `make matrix`"
    from hfpatches import _env

    env = text.split("<!-- env:begin -->")[1].split("<!-- env:end -->")[0]
    for name in _env.ALL:
        assert f"| `{name}` |" in env, name
    assert "HFPATCHES_CACHE" in env
    assert all(doc for doc in m.env_docs().values()), m.env_docs()


def test_libraries_listed_once():
    from hfpatches import _doctor, _manifest, _manifest_report
    from hfpatches._declare import LIBRARIES
    from hfpatches._report import BAD_OUTCOMES, LIVE_OUTCOMES

    assert _doctor.STACK == tuple(d for d, _ in LIBRARIES)
    assert _manifest._VERSIONED is LIBRARIES
    assert _manifest._LIVE is LIVE_OUTCOMES and _manifest_report._BAD is BAD_OUTCOMES


# ----------------------------------------------------------------------------- 20.3 advisories
def test_advisories_are_well_formed():
    from packaging.requirements import Requirement

    advs = advisories()
    assert len(advs) >= 5
    assert not set(advs) & set(declarations()), "an advisory id must not be a patch id"
    for aid, a in advs.items():
        assert isinstance(a, Advisory) and re.fullmatch(r"[a-z0-9_]+", aid)
        assert a.severity in SEVERITIES and a.summary and a.workaround and a.evidence and a.upstream
        assert all(re.fullmatch(r"[\w.-]+/[\w.-]+#\d+", u) for u in a.upstream), a.upstream
        for line in a.requires:
            Requirement(line)
        if a.fixed_in:
            fixed = Requirement(a.fixed_in)
            first = min((s.version for s in fixed.specifier), default=None)
            same = [line for line in a.requires if Requirement(line).name == fixed.name]
            assert first and same and all(_ranges.judge(line, first) == _ranges.OUT for line in same), \
                f"{aid}: the first fixed release {first} is inside requires"


#: What each advisory's evidence says about releases' source: (advisory, release, file, text, the
#: text is there, the release has the bug). Checked where an overlay of that release exists under
#: HFPATCHES_CACHE/overlay (the version lab makes them); the bug column must agree with requires.
SOURCE_FACTS = [
    ("tf_ddp_no_sync_inverted", "4.46.2", "trainer.py", "if i == len(batch_samples) - 1", True, True),
    ("tf_ddp_no_sync_inverted", "4.46.3", "trainer.py", "if i == len(batch_samples) - 1", False, False),
    ("tf_ddp_no_sync_inverted", "4.46.3", "trainer.py", "if i != len(batch_samples) - 1", True, False),
    ("tf_ga_no_kwargs_models", "4.46.2", "trainer.py", "with self.accelerator.accumulate(model)", False, True),
    ("tf_ga_no_kwargs_models", "4.48.0", "trainer.py", "loss = loss / self.args.gradient_accumulation_steps", True, False),
    ("tf_ga_last_window", "4.48.0", "trainer.py", "loss = loss / self.args.gradient_accumulation_steps", True, True),
    ("tf_ga_no_kwargs_models", "4.47.1", "trainer.py", "loss = loss / self.args.gradient_accumulation_steps", False, True),
    ("tf_ga_last_window", "4.54.1", "trainer.py", "loss = loss / self.current_gradient_accumulation_steps", False, True),
    ("tf_ga_last_window", "4.55.0", "trainer.py", "loss = loss / self.current_gradient_accumulation_steps", True, False),
    ("tf_average_tokens_default_off", "4.46.1", "training_args.py", "average_tokens_across_devices", False, False),
    ("tf_average_tokens_default_off", "4.53.1", "training_args.py",
     "average_tokens_across_devices: Optional[bool] = field(\n        default=False", True, True),
    ("tf_average_tokens_default_off", "4.54.0", "training_args.py",
     "average_tokens_across_devices: Optional[bool] = field(\n        default=True", True, False),
    ("tf_fa2_posids_not_from_zero", "4.53.1", "modeling_flash_attention_utils.py",
     "max_length = cu_seq_lens.diff().max()", False, False),
    ("tf_fa2_posids_not_from_zero", "4.54.0", "modeling_flash_attention_utils.py",
     "max_length = cu_seq_lens.diff().max()", True, True),
    ("tf_fa2_posids_not_from_zero", "4.55.0", "modeling_flash_attention_utils.py", "def _is_packed_sequence", False, True),
    ("tf_fa2_posids_not_from_zero", "4.56.0", "modeling_flash_attention_utils.py", "def _is_packed_sequence", True, False),
]


@pytest.mark.parametrize("aid,version,path,text,present,bug", SOURCE_FACTS,
                         ids=[f"{f[0]}-{f[1]}-{i}" for i, f in enumerate(SOURCE_FACTS)])
def test_advisory_ranges_match_release_sources(aid, version, path, text, present, bug):
    src = OVERLAY / f"transformers-{version}" / "transformers" / path
    if not src.is_file():
        pytest.skip(f"no overlay of transformers {version} here ({src.parent.parent})")
    assert (text in src.read_text(encoding="utf-8")) is present, (aid, version, text)
    inside = all(_ranges.judge(line, version) == _ranges.IN for line in advisories()[aid].requires)
    assert inside is bug, f"{aid}: transformers {version} {'has' if bug else 'lacks'} the bug, requires says otherwise"


def test_doctor_json_carries_advisories(capsys):
    from hfpatches._doctor import advisories_here

    rows = advisories_here()
    assert {r["id"] for r in rows} == set(advisories())
    for r in rows:
        assert {"id", "summary", "upstream", "requires", "fixed_in", "workaround", "applies"} <= set(r)
        assert isinstance(r["applies"], bool)


def test_audit_judges_advisories(tmp_path, capsys):
    from hfpatches.__main__ import main

    req = tmp_path / "r.txt"
    req.write_text("transformers==4.46.2\n")
    assert main(["audit", str(req), "--json"]) == 0
    advs = {a["id"]: a for a in json.loads(capsys.readouterr().out)["advisories"]}
    assert set(advs) == set(advisories())
    assert advs["tf_ddp_no_sync_inverted"]["applies"] is True
    assert advs["tf_ga_last_window"]["applies"] is False
    for a in advs.values():
        assert {"id", "summary", "upstream", "requires", "fixed_in", "workaround", "applies"} <= set(a)
    assert main(["audit", str(req), "--fail-on", "advisory"]) == 1
    out = capsys.readouterr().out
    assert "tf_ddp_no_sync_inverted" in out and "workaround" in out
    req.write_text("transformers==4.57.6\n")
    assert main(["audit", str(req), "--fail-on", "advisory"]) == 0
    capsys.readouterr()
    loose = tmp_path / "l.txt"
    loose.write_text("transformers>=4.40\n")
    assert main(["audit", str(loose), "--json"]) == 0
    assert all(a["applies"] is None for a in json.loads(capsys.readouterr().out)["advisories"])
