"""Run manifests (``HFPATCHES_REPORT``): one record per process that no other process overwrites,
safe targets (symlinks followed, devices and FIFOs refused), and ``hfpatches report``.

The multi-launcher acceptance runs (torchrun, accelerate launch) are in tests/test_distributed.py.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import hfpatches
from hfpatches import Outcome
from hfpatches import _manifest as M
from hfpatches.__main__ import main as cli
from hfpatches._declare import Patch, Target
from hfpatches._engine import ENGINE
from hfpatches._registry import register_for_tests, registry
from _autovenv import make_auto_venv
from _fakes import forget, make_fake

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def fresh_record(monkeypatch):
    """Each test gets a record of its own: the engine's writer is process-wide (one record per
    interpreter, its timeline since the first write), so an earlier test in this worker that set
    ``HFPATCHES_REPORT`` (tests/test_core.py, or one here) would otherwise open this test's timeline."""
    monkeypatch.setattr(ENGINE, "manifest", None)


@pytest.fixture
def fake(tmp_path):
    """A fake target package and a patch fixing its ``add`` (removed afterwards)."""
    name = "fakerec_" + uuid.uuid4().hex[:8]
    make_fake(tmp_path / "site", name)
    pid = "fake_" + uuid.uuid4().hex[:6]

    def fix(ctx):
        mod = sys.modules[name]

        def add(a, b):
            return a + b

        add.__module__ = name
        ctx.replace(mod, "add", add)

    register_for_tests(Patch(id=pid, summary="fake", upstream=("example/fake#1",), requires=(f"{name}>=1.0",),
                              fixed_in=None, targets=(Target(name, "add", params=("a", "b")),),
                              probe=lambda: sys.modules[name].add(2, 2) != 4, apply=fix))

    class F:
        id, mod = pid, name

        @staticmethod
        def imp():
            return importlib.import_module(name)

    yield F
    hfpatches.revert([pid])
    registry().pop(pid, None)
    ENGINE.results.pop(pid, None)
    forget(name)


def _records(directory: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]


def _py(code: str, env: dict | None = None, check: bool = True, python=None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("HFPATCHES_")}
    full.update({"PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}, **(env or {}))
    proc = subprocess.run([str(python or sys.executable), "-c", code], env=full, capture_output=True, text=True,
                          timeout=300, cwd=str(ROOT))
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _report(path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hfpatches", "report", str(path), *args],
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("HFPATCHES_")},
                               "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120, cwd=str(ROOT))


# ----------------------------------------------------------------------------- every process keeps its record
def test_a_later_process_does_not_erase_the_training_process_record(tmp_path):
    """The issue's measurement: a training process with meta_buffers live, then any other
    ``python -c`` in the image. Before: one file, last writer wins ("nothing live")."""
    index = tmp_path / "logs" / "hfpatches.json"
    env = {"HFPATCHES_REPORT": str(index)}
    train = _py("import os, hfpatches; hfpatches.apply(); import torch; print(os.getpid())", env).stdout.split()[-1]
    other = _py("import os, hfpatches; hfpatches.apply(); print(os.getpid())", env).stdout.split()[-1]
    proc = _report(index, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    procs = {str(p["pid"]): p for p in json.loads(proc.stdout)["processes"]}
    assert set(procs) == {train, other}, procs
    assert procs[train]["live"] == ["meta_buffers"] and procs[other]["live"] == []
    assert procs[train]["patches"]["meta_buffers"]["outcome"] == "APPLIED"
    # the file layout: FILE is a small index (same content whoever writes it), records in FILE.d/
    assert json.loads(index.read_text()) == json.loads(M.index_text(str(index)))
    assert len(list((tmp_path / "logs" / "hfpatches.json.d").glob("*.json"))) == 2


def test_directory_layout_and_record_fields(tmp_path, fake, monkeypatch):
    logs = tmp_path / "logs"
    monkeypatch.setenv("HFPATCHES_REPORT", str(logs) + os.sep)   # trailing separator: a directory
    for k, v in {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "TORCHELASTIC_RUN_ID": "abc",
                 "TORCHELASTIC_RESTART_COUNT": "0", "HFPATCHES_DTYPE_POLICY": "backbone"}.items():
        monkeypatch.setenv(k, v)
    hfpatches.apply(only=[fake.id])
    fake.imp()
    [path] = logs.glob("*.json")
    assert path.name.startswith(f"{M.host()}-{os.getpid()}-") and not (tmp_path / "logs.d").exists()
    rec = json.loads(path.read_text())
    assert rec["hfpatches_record"] == 2 and rec["pid"] == os.getpid() and rec["ppid"] == os.getppid()
    assert path.name.endswith(f"-{rec['id']}.json") and len(rec["id"]) == 16 and rec["ended"] is None
    # the timeline: DEFERRED by apply() (nothing live), then attached when the target was imported
    assert [(e["live"], e["via"]) for e in rec["timeline"]] == [([], "apply"), ([fake.id], "import")]
    assert rec["timeline_dropped"] == 0 and 0 <= rec["timeline"][0]["t"] <= rec["timeline"][1]["t"]
    assert (rec["rank"], rec["local_rank"], rec["world_size"], rec["rank_source"]) == (3, 1, 8, "RANK")
    assert rec["run"] == "torchelastic:abc" and rec["restart"] == 0
    assert rec["env"]["WORLD_SIZE"] == "8" and rec["env"]["HFPATCHES_REPORT"].endswith(os.sep)
    assert rec["argv0"] == sys.argv[0] and rec["started_by"] is None and rec["forked_from"] is None
    assert rec["started"].endswith("Z") and abs(rec["started_unix"] - M.process_start()) < 0.05
    assert rec["versions"][fake.mod] == "1.0.0" and rec["python"] == sys.version.split()[0]
    assert rec["patches"][fake.id]["outcome"] == "APPLIED" and rec["live"] == [fake.id]
    assert rec["hfpatches"] == hfpatches.__version__


@pytest.mark.parametrize("env, want", [
    ({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_JOB_ID": "77",
      "SLURM_STEP_ID": "0", "TORCHELASTIC_RUN_ID": "x"}, (1, 1, 2, "RANK", "slurm:77.0")),
    ({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "77"},
     (5, 1, 8, "SLURM_PROCID", "slurm:77")),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4"},
     (2, 0, 4, "OMPI_COMM_WORLD_RANK", None)),
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"},
     (1, None, 2, "PMI_RANK", "master:n1:29500")),
    ({"RANK": "oops"}, (None, None, None, None, None)),
    ({}, (None, None, None, None, None)),
], ids=["torchrun-in-slurm", "srun", "openmpi", "mpich", "malformed", "none"])
def test_launcher_conventions(env, want):
    info = M.launch_info(env)
    assert (info["rank"], info["local_rank"], info["world_size"], info["rank_source"], info["run"]) == want


def test_record_rewritten_in_place_only_when_an_outcome_changes(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("HFPATCHES_REPORT", str(tmp_path / "m.json"))
    hfpatches.apply(only=[fake.id])
    [path] = (tmp_path / "m.json.d").glob("*.json")
    first = path.stat().st_ino
    assert json.loads(path.read_text())["patches"][fake.id]["outcome"] == "DEFERRED"
    hfpatches.apply(only=[fake.id])          # nothing changed: no write
    hfpatches.status()
    assert path.stat().st_ino == first
    fake.imp()                               # attaches: the same file, rewritten (atomic rename)
    assert path.stat().st_ino != first and json.loads(path.read_text())["live"] == [fake.id]
    second = path.stat().st_ino
    hfpatches.apply(only=[fake.id])          # ALREADY_APPLIED: still live, nothing to record
    assert path.stat().st_ino == second
    hfpatches.revert([fake.id])
    assert json.loads(path.read_text())["live"] == []
    assert [p.name for p in (tmp_path / "m.json.d").iterdir()] == [path.name]   # no temp files left


def test_forked_child_writes_its_own_record(tmp_path):
    code = f"""
import json, os, sys
from pathlib import Path
import hfpatches
from _fakes import make_fake
from hfpatches._declare import Patch, Target
from hfpatches._registry import register_for_tests
make_fake(Path({str(tmp_path / 'site')!r}), "fakefork")
def fix(ctx):
    mod = sys.modules["fakefork"]
    def add(a, b):
        return a + b
    add.__module__ = "fakefork"
    ctx.replace(mod, "add", add)
register_for_tests(Patch(id="fake_fork", summary="f", upstream=(), requires=("fakefork>=1.0",), fixed_in=None,
                          targets=(Target("fakefork", "add"),), probe=lambda: sys.modules["fakefork"].add(2, 2) != 4,
                          apply=fix))
hfpatches.apply(only=["fake_fork"])
import fakefork
child = os.fork()
if child == 0:
    hfpatches.revert(["fake_fork"])
    os._exit(0)
os.waitpid(child, 0)
print(json.dumps([os.getpid(), child]))
"""
    parent, child = json.loads(_py(code, {"HFPATCHES_REPORT": str(tmp_path / "r") + "/"}).stdout)
    recs = {r["pid"]: r for r in _records(tmp_path / "r")}
    assert set(recs) == {parent, child}
    assert recs[parent]["live"] == ["fake_fork"] and recs[parent]["started_by"] is None
    assert recs[child]["live"] == [] and recs[child]["forked_from"] == parent
    assert recs[child]["started_by"] == "fork" and recs[child]["ppid"] == parent


def test_child_outliving_its_parent_still_names_it(tmp_path):
    """A child that exits after its parent (multiprocessing's resource tracker outlives the rank
    that started it) is re-parented before its exit write; its record keeps the pid of the
    process that started it, so ``report`` shows it as that rank's child, not a second rank."""
    done = tmp_path / "child.json"
    child = f"""
import json, os, time, hfpatches
parent = os.getppid()
hfpatches.apply(only=["meta_buffers"])   # the first write: the parent is alive
print("ready", flush=True)
deadline = time.time() + 60
while os.getppid() == parent and time.time() < deadline:
    time.sleep(0.01)
open({str(done)!r}, "w").write(json.dumps([os.getpid(), parent, os.getppid()]))
"""   # exits normally: the exit write comes after the parent is gone
    code = f"""
import subprocess, sys, hfpatches
hfpatches.apply(only=["meta_buffers"])
c = subprocess.Popen([sys.executable, "-c", {child!r}], stdout=subprocess.PIPE, text=True)
assert c.stdout.readline() == "ready\\n"
print(c.pid)
"""   # the parent exits without waiting; run() returns once the child closed the inherited stderr
    env = {"HFPATCHES_REPORT": str(tmp_path / "r") + "/", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "TORCHELASTIC_RUN_ID": "t1"}
    proc = _py(code, env)
    pid, parent, ppid_at_exit = json.loads(done.read_text())
    assert pid == int(proc.stdout) and ppid_at_exit != parent   # it did outlive the parent
    recs = {r["pid"]: r for r in _records(tmp_path / "r")}
    assert set(recs) == {parent, pid} and recs[pid]["ended"] is not None and recs[pid]["rank"] == 0
    assert recs[pid]["ppid"] == parent, recs[pid]
    rep = _report(tmp_path / "r", "--json")
    roles = {p["pid"]: p["role"] for p in json.loads(rep.stdout)["processes"]}
    assert rep.returncode == 0 and roles == {parent: "rank", pid: f"child of {parent}"}, rep.stdout


def test_start_up_imports_nothing_new(tmp_path):
    """``import hfpatches; apply()`` with HFPATCHES_REPORT set imports no module that the same
    call without it does not (no json/tempfile/socket/platform/re), and writes the record."""
    code = ("import sys, hfpatches; hfpatches.apply(); "
            "print(' '.join(sorted(m for m in sys.modules if not m.startswith('hfpatches'))))")
    without = set(_py(code).stdout.split())
    with_report = set(_py(code, {"HFPATCHES_REPORT": str(tmp_path / "h.json")}).stdout.split())
    # a built-in module (atexit: the record's last state is written at exit) costs no file I/O
    assert with_report - without <= set(sys.builtin_module_names) and without <= with_report, with_report ^ without
    assert not {"json", "tempfile", "socket", "platform", "re", "logging"} & with_report
    assert len(list((tmp_path / "h.json.d").glob("*.json"))) == 1


@pytest.mark.parametrize("value", [
    "", "plain", 'quote " and \\ backslash', "tab\tnewline\ncr\r\x00\x1f\x7f", "ünïcödé ✓ 𝄞", "\udcff lone surrogate",
])
def test_dumps_matches_json(value):
    obj = {"s": value, "n": [None, True, False, 0, -3, 1.5, 1e300], "d": {"k": [], "e": {}}, value: value}
    for indent in (False, True):
        text = M._dumps(obj, indent=indent)
        assert json.loads(text.encode("utf-8", "backslashreplace").decode("utf-8")) == obj


# ----------------------------------------------------------------------------- bad targets (issue 12, item 10)
def test_symlink_is_followed_never_replaced(tmp_path, fake, monkeypatch):
    real_dir = tmp_path / "real"
    link = tmp_path / "hfpatches.json"
    link.symlink_to(real_dir / "manifest.json")          # dangling until the first write
    monkeypatch.setenv("HFPATCHES_REPORT", str(link))
    hfpatches.apply(only=[fake.id])
    fake.imp()
    assert link.is_symlink() and os.readlink(link) == str(real_dir / "manifest.json")
    assert (real_dir / "manifest.json").is_file()
    [rec] = _records(real_dir / "manifest.json.d")
    assert rec["live"] == [fake.id]
    # a symlink to a directory: records inside the directory, the link stays
    dlink = tmp_path / "logs"
    dlink.symlink_to(real_dir, target_is_directory=True)
    monkeypatch.setenv("HFPATCHES_REPORT", str(dlink))
    hfpatches.revert([fake.id])
    assert dlink.is_symlink() and len(list(real_dir.glob("*.json"))) == 2   # index + this record
    assert _report(dlink).returncode == 0 and _report(link).returncode == 0


@pytest.mark.parametrize("via_symlink", [False, True], ids=["fifo", "symlink-to-fifo"])
def test_non_regular_target_is_refused_with_one_warning(tmp_path, fake, monkeypatch, caplog, via_symlink):
    """A FIFO stands in for ``/dev/stdout`` (a test must never risk replacing a real device)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    target = fifo
    if via_symlink:
        target = tmp_path / "stdout"
        target.symlink_to(fifo)
    monkeypatch.setenv("HFPATCHES_REPORT", str(target))
    with caplog.at_level(logging.WARNING, logger="hfpatches"):
        assert hfpatches.apply(only=[fake.id])[fake.id].outcome == Outcome.DEFERRED
        fake.imp()
        hfpatches.revert([fake.id])
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and target.is_symlink() == via_symlink
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["pipe", "site"] + (["stdout"] if via_symlink else []))
    warned = [r.getMessage() for r in caplog.records if r.name == "hfpatches" and r.levelno == logging.WARNING]
    assert len(warned) == 1, warned
    assert f"HFPATCHES_REPORT={target}" in warned[0]
    assert "a FIFO (named pipe), not a directory or a regular file" in warned[0]
    if via_symlink:
        assert f"resolves to {fifo}" in warned[0]


def test_unwritable_report_never_breaks_training(tmp_path, fake, monkeypatch, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    bad = blocker / "hfpatches.json"
    monkeypatch.setenv("HFPATCHES_REPORT", str(bad))
    with caplog.at_level(logging.WARNING, logger="hfpatches"):
        hfpatches.apply(only=[fake.id])
        mod = fake.imp()
        assert hfpatches.status()[fake.id].outcome == Outcome.APPLIED and mod.add(2, 2) == 4
        hfpatches.revert([fake.id])
    warned = [r.getMessage() for r in caplog.records if r.name == "hfpatches" and r.levelno == logging.WARNING]
    assert len(warned) == 1 and str(bad) in warned[0] and "training goes on" in warned[0], warned


def test_unwritable_report_under_auto_start(tmp_path):
    """The start-up write (``HFPATCHES_AUTO``, this checkout's .pth) fails: one WARNING on
    stderr although nothing imported ``logging``, and the script runs."""
    py = make_auto_venv(tmp_path / "venv")
    blocker = tmp_path / "f"
    blocker.write_text("x")
    proc = _py("import sys; print('trained', 'hfpatches' in sys.modules)",
               {"HFPATCHES_AUTO": "1", "HFPATCHES_REPORT": str(blocker / "x.json")}, python=py)
    assert proc.stdout.split() == ["trained", "True"], proc.stdout + proc.stderr
    assert proc.stderr.count("could not write the run record") == 1, proc.stderr
    assert str(blocker / "x.json") in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------- hfpatches report
def _rec(pid, rank=None, *, live=("meta_buffers",), host="node1", ppid=7, ws=2, run="torchelastic:r1",
         source="RANK", started_by=None, restart=None, versions=None, outcomes=None) -> dict:
    ids = ("liger_flash_kwargs", "meta_buffers")
    patches = {k: {"outcome": "APPLIED" if k in live else "DEFERRED", "reason": "r"} for k in ids}
    patches.update(outcomes or {})
    return {"hfpatches_record": 1, "pid": pid, "ppid": ppid, "host": host, "argv0": "train.py",
            "started": "2026-11-30T08:00:00.000Z", "started_by": started_by, "rank": rank,
            "local_rank": rank, "world_size": ws if rank is not None else None,
            "rank_source": source if rank is not None else None, "run": run, "restart": restart,
            "versions": versions or {"torch": "2.13.0"}, "patches": patches, "live": sorted(live)}


def _write(directory: Path, *recs, extra: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for r in recs:
        (directory / f"{r['host']}-{r['pid']}.json").write_text(json.dumps(r))
    for name, text in (extra or {}).items():
        (directory / name).write_text(text)
    return directory


def _run(path, *args, capsys) -> tuple[int, str, str]:
    rc = cli(["report", str(path), *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_report_consistent_run_with_workers_launcher_and_corrupt_record(tmp_path, capsys):
    d = _write(tmp_path / "r",
               _rec(100, None, ppid=1, run=None),                                  # torchrun agent
               _rec(101, 0, ppid=100), _rec(102, 1, ppid=100),                      # the ranks
               _rec(103, 0, ppid=101, started_by="multiprocessing"),                 # spawn worker
               _rec(104, 1, ppid=102, live=()),                                      # a subprocess of rank 1
               extra={"broken.json": '{"pid": 5, "patc', ".tmp-ignored.json": "x", "notes.txt": "x"})
    rc, out, _ = _run(d, capsys=capsys)
    assert rc == 0, out
    assert "unreadable record skipped: broken.json: not valid JSON" in out and "ignored" not in out
    assert "ranks agree; live on every rank: meta_buffers" in out and "verdict: consistent" in out
    rows = {row[1]: row for row in map(str.split, out.splitlines()) if len(row) > 4 and row[0] == "node1"}
    assert rows["101"][2:4] == ["0/2", "rank"] and rows["102"][2:4] == ["1/2", "rank"]
    assert rows["103"][3:6] == ["child", "of", "101"] and rows["104"][3:6] == ["child", "of", "102"]
    rc, out, _ = _run(d, "--json", capsys=capsys)
    data = json.loads(out)
    assert rc == 0 and data["consistent"] and data["unreadable"][0]["file"] == "broken.json"
    for p in data["processes"]:   # the documented minimum of each element
        assert isinstance(p["pid"], int) and isinstance(p["host"], str) and isinstance(p["live"], list)
        assert p["rank"] is None or isinstance(p["rank"], int)
        assert all(set(v) == {"outcome", "reason"} for v in p["patches"].values())
    ranks = [(p["pid"], p["rank"]) for p in data["processes"] if p["role"] == "rank"]
    assert ranks == [(101, 0), (102, 1)], data["processes"]


@pytest.mark.parametrize("recs, want", [
    ([_rec(1, 0), _rec(2, 1, live=(),
                       outcomes={"meta_buffers": {"outcome": "DISABLED", "reason": "disabled by HFPATCHES_DISABLE"}})],
     "mixed code: meta_buffers live on rank 0, not on the others (rank 1: DISABLED (disabled by HFPATCHES_DISABLE))"),
    ([_rec(1, 0)], "no record from rank 1 of world size 2"),
    ([_rec(1, 0), _rec(2, 1, versions={"torch": "2.12.0"})],
     "mixed versions: torch 2.12.0 on rank 1; 2.13.0 on rank 0"),
    ([_rec(1, 0), _rec(2, 1), _rec(3, 1, ppid=77)], "rank 1 recorded by 2 processes (pids 2, 3)"),
    ([_rec(1, 0), _rec(2, 1, outcomes={"liger_flash_kwargs": {"outcome": "FAILED", "reason": "verify failed"}})],
     "fix failed: pid 2 on node1 (rank 1): liger_flash_kwargs FAILED: verify failed"),
], ids=["mixed-code", "missing-rank", "mixed-versions", "duplicate-rank", "failed-fix"])
def test_report_flags_inconsistent_runs(tmp_path, capsys, recs, want):
    rc, out, _ = _run(_write(tmp_path / "r", *recs), capsys=capsys)
    assert rc == 1 and want in out and "verdict: NOT consistent (exit 1)" in out, out


def test_report_roles_under_srun_torchrun_and_restarts(tmp_path, capsys):
    """``srun torchrun``: the agents carry SLURM_PROCID only (launchers, not ranks); of two
    torchelastic attempts only the latest is judged; different runs are judged separately."""
    job = "slurm:9.0"
    recs = [_rec(10, 0, run=job, source="SLURM_PROCID", live=()),
            _rec(20, 1, run=job, source="SLURM_PROCID", live=(), host="node2"),
            _rec(11, 0, run=job, ppid=10, restart=0), _rec(21, 1, run=job, ppid=20, host="node2", restart=0, live=()),
            _rec(12, 0, run=job, ppid=10, restart=1), _rec(22, 1, run=job, ppid=20, host="node2", restart=1),
            _rec(31, 0, run="torchelastic:other"), _rec(32, 1, run="torchelastic:other")]
    rc, out, _ = _run(_write(tmp_path / "r", *recs), "--json", capsys=capsys)
    data = json.loads(out)
    roles = {p["pid"]: p["role"] for p in data["processes"]}
    assert roles[10] == "launcher (SLURM_PROCID=0)" and roles[20] == "launcher (SLURM_PROCID=1)"
    assert roles[11] == roles[21] == "rank, earlier attempt (restart 0)"
    assert roles[12] == roles[22] == roles[31] == roles[32] == "rank"
    assert rc == 0 and [(v["run"], v["ranks"], v["agree"]) for v in data["runs"]] == \
        [(job, [0, 1], True), ("torchelastic:other", [0, 1], True)], data["runs"]


def test_report_ranks_started_by_multiprocessing_spawn(tmp_path, capsys):
    """``torch.multiprocessing.spawn(train, nprocs=2)``: the ranks are multiprocessing children of
    a script without a rank; they are the ranks (their spawn workers are their children)."""
    recs = [_rec(50, None, run=None, ppid=1), _rec(51, 0, ppid=50, started_by="multiprocessing"),
            _rec(52, 1, ppid=50, started_by="multiprocessing"), _rec(53, 1, ppid=52, started_by="multiprocessing")]
    rc, out, _ = _run(_write(tmp_path / "r", *recs), "--json", capsys=capsys)
    roles = {p["pid"]: p["role"] for p in json.loads(out)["processes"]}
    assert rc == 0 and roles == {50: "process", 51: "rank", 52: "rank", 53: "child of 52 (multiprocessing)"}, roles


def test_report_rank_children_are_not_duplicate_ranks(tmp_path, capsys):
    """torchrun's ranks with a spawn DataLoader worker and multiprocessing's resource tracker each
    (they inherit RANK): the children are shown as their rank's children and the run agrees; a
    process claiming rank 1 that no rank started is still a second rank 1."""
    ranks = [_rec(100, None, ppid=1, run=None), _rec(101, 0, ppid=100), _rec(102, 1, ppid=100)]
    children = [_rec(103, 0, ppid=101, started_by="multiprocessing"), _rec(104, 1, ppid=102, started_by="multiprocessing"),
                _rec(105, 0, ppid=101, started_by="multiprocessing", live=()),   # resource trackers: nothing imported
                _rec(106, 1, ppid=102, started_by="multiprocessing", live=())]
    rc, out, _ = _run(_write(tmp_path / "ok", *ranks, *children), "--json", capsys=capsys)
    data = json.loads(out)
    roles = {p["pid"]: p["role"] for p in data["processes"]}
    assert rc == 0 and data["consistent"], data["runs"]
    assert roles == {100: "process", 101: "rank", 102: "rank", 103: "child of 101 (multiprocessing)",
                     104: "child of 102 (multiprocessing)", 105: "child of 101 (multiprocessing)",
                     106: "child of 102 (multiprocessing)"}, roles
    [run] = data["runs"]
    assert run["ranks"] == [0, 1] and run["live"] == ["meta_buffers"], run
    for stray in (_rec(107, 1, ppid=100), _rec(107, 1, ppid=1, started_by="multiprocessing")):
        # a second rank 1 of the launch, or a child whose record does not name rank 1 as its parent
        rc, out, _ = _run(_write(tmp_path / f"dup{stray['ppid']}", *ranks, *children, stray), capsys=capsys)
        assert rc == 1 and "rank 1 recorded by 2 processes (pids 102, 107)" in out, out


def test_report_single_process_and_legacy_manifest(tmp_path, capsys):
    legacy = tmp_path / "old.json"   # what hfpatches 0.1 wrote: one process, last writer
    legacy.write_text(json.dumps({"hfpatches": "0.1.0", "python": "3.11.7", "pid": 42, "versions": {},
                                  "patches": {"meta_buffers": {"patch_id": "meta_buffers", "outcome": "APPLIED",
                                                               "reason": "r"}}, "live": ["meta_buffers"]}))
    rc, out, _ = _run(legacy, capsys=capsys)
    assert rc == 0 and "older hfpatches" in out and "nothing to compare" in out and " 42 " in out, out


@pytest.mark.parametrize("make, want", [
    (lambda p: p / "missing.json", "no such file or directory"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no records (was HFPATCHES_REPORT set for the run?)"),
    (lambda p: (p / "x.json").write_text("not json") and p / "x.json", "not valid JSON"),
    (lambda p: (p / "x.json").write_text("[1, 2]") and p / "x.json", "not an hfpatches manifest"),
    (lambda p: _write(p / "d", extra={"a.json": "{}", "b.json": "\xff"}), "2 unreadable record(s)"),
    (lambda p: os.mkfifo(p / "fifo") or p / "fifo", "is a FIFO (named pipe), not a manifest"),
    (lambda p: (p / "idx.json").write_text(M.index_text(str(p / "idx.json"))) and p / "idx.json",
     "its records directory"),
], ids=["missing", "empty-dir", "not-json", "not-manifest", "all-corrupt", "fifo", "index-without-records"])
def test_report_unreadable_input_exits_2(tmp_path, capsys, make, want):
    path = make(tmp_path)
    rc, out, err = _run(path, capsys=capsys)
    assert rc == 2 and want in err and out == "", (out, err)
    rc, out, err = _run(path, "--json", capsys=capsys)
    assert rc == 2 and json.loads(out)["processes"] == [] and want in json.loads(out)["error"]


def test_report_command_no_traceback(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "fifo.json").symlink_to(tmp_path / "nowhere")   # a dangling record link
    proc = _report(tmp_path / "d")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "fifo.json" in proc.stderr, proc.stderr


def test_record_that_is_a_fifo_is_skipped_not_read(tmp_path, capsys):
    d = _write(tmp_path / "r", _rec(1, 0), _rec(2, 1))
    os.mkfifo(d / "stuck.json")   # opening it would block forever
    rc, out, _ = _run(d, capsys=capsys)
    assert rc == 0 and "stuck.json: a FIFO (named pipe), not a regular file" in out, out


def test_last_state_at_exit_is_checked_by_identity(tmp_path):
    """A library puts back an attribute it saved before apply(), then the process ends without
    another outcome change: the record still tells the truth (written at exit, by identity)."""
    code = ("import torch, hfpatches; hfpatches.apply(only=['meta_buffers']); "
            "torch.nn.Module.to_empty = hfpatches.get_original('meta_buffers')")
    _py(code, {"HFPATCHES_REPORT": str(tmp_path / "h.json")})
    [rec] = [json.loads(f.read_text()) for f in (tmp_path / "h.json.d").glob("*.json")]
    assert "meta_buffers" not in rec["live"], rec
    assert rec["patches"]["meta_buffers"]["outcome"] == "CONFLICT", rec["patches"]["meta_buffers"]


# ----------------------------------------------------------------------------- issue 24: what was live *during* the run
def test_exec_under_auto_start_runs_start_up_again_and_supersedes_the_old_record(tmp_path):
    """Item 1: a launcher (HFPATCHES_AUTO) execs into the training script. The new interpreter
    has the same pid and inherits the environment; it must apply the fixes itself (the guard is
    per interpreter), write a record of its own, and the launcher's record must be recognised as
    replaced by exec (not as a second rank 0, not as the process's state)."""
    py = make_auto_venv(tmp_path / "venv")
    child = ("import os, sys, json, torch, hfpatches; "
             "print('CHILD ' + json.dumps([os.getpid(), hfpatches.status()['meta_buffers'].outcome]))")
    code = ("import os, sys, torch, hfpatches; "
            "assert hfpatches.status()['meta_buffers'].outcome == 'APPLIED'; sys.stdout.flush(); "
            f"os.execv(sys.executable, [sys.executable, '-c', {child!r}])")
    logs = tmp_path / "logs"
    env = {"HFPATCHES_AUTO": "1", "HFPATCHES_REPORT": str(logs) + "/", "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "TORCHELASTIC_RUN_ID": "exec-test"}
    proc = _py(code, env, python=py)
    [line] = [ln for ln in proc.stdout.splitlines() if ln.startswith("CHILD ")]
    pid, outcome = json.loads(line[len("CHILD "):])
    assert outcome == "APPLIED", proc.stdout + proc.stderr   # before: the exec'd interpreter trained unpatched
    recs = [r for r in _records(logs) if r["pid"] == pid]
    assert len(recs) == 2 and len({r["id"] for r in recs}) == 2, recs
    proc = _report(logs, "--json")
    data = json.loads(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    roles = sorted(p["role"] for p in data["processes"] if p["pid"] == pid)
    assert roles[0] == "rank" and roles[1].startswith("replaced by exec"), roles
    [run] = data["runs"]
    assert run["ranks"] == [0] and run["agree"], run


def test_timeline_records_each_change_of_what_is_live(tmp_path):
    """Item 2: training inside ``with patched(...)`` (reverted at the end) and a fix applied
    only at the end of an unpatched run. The record keeps the timeline; report says the fix
    was not live throughout on that rank (exit 1), with when it changed."""
    logs = tmp_path / "logs"
    base = {"HFPATCHES_REPORT": str(logs) + "/", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "tl"}
    inside = ("import torch, hfpatches\n"
              "with hfpatches.patched('meta_buffers'):\n"
              "    torch.nn.Linear(2, 2).to_empty(device='cpu')\n")
    _py(inside, {**base, "RANK": "0", "LOCAL_RANK": "0"})
    _py("import torch, hfpatches; hfpatches.apply(only=['meta_buffers'])", {**base, "RANK": "1", "LOCAL_RANK": "1"})
    by_rank = {r["rank"]: r for r in _records(logs)}
    tl0 = by_rank[0]["timeline"]
    assert [e["live"] for e in tl0] == [["meta_buffers"], []] and [e["via"] for e in tl0] == ["apply", "revert"], tl0
    assert tl0[0]["t"] <= tl0[1]["t"] and by_rank[0]["timeline_dropped"] == 0 and by_rank[0]["ended"]["how"] == "exit"
    proc = _report(logs)
    assert proc.returncode == 1, proc.stdout + proc.stderr   # before: "live on every rank: none", exit 0
    assert "rank 0: meta_buffers not live throughout" in proc.stdout and "(revert)" in proc.stdout, proc.stdout
    data = json.loads(_report(logs, "--json").stdout)
    assert {p["rank"]: p["throughout"] for p in data["processes"]} == {0: False, 1: True}, data["processes"]


def _trec(pid, rank, timeline, **kw):
    r = _rec(pid, rank, live=tuple(timeline[-1]["live"]) if timeline else ("meta_buffers",), **kw)
    r.update(hfpatches_record=2, id=f"id{pid}", timeline=timeline, timeline_dropped=0, started_unix=1000.0)
    return r


@pytest.mark.parametrize("timeline, want", [
    ([{"t": 0.05, "live": ["meta_buffers"], "via": "startup"}], None),
    ([{"t": 3.0, "live": [], "via": "apply"}, {"t": 900.0, "live": ["meta_buffers"], "via": "import"}], None),
    ([{"t": 4.0, "live": ["meta_buffers"], "via": "apply"}], None),
    ([{"t": 612.0, "live": ["meta_buffers"], "via": "apply"}],
     "at +612.0 s: meta_buffers went live (apply(), on a target already imported"),
    ([{"t": 1.0, "live": ["meta_buffers"], "via": "apply"}, {"t": 50.0, "live": [], "via": "check"}],
     "at +50.0 s: meta_buffers no longer live (check)"),
], ids=["startup", "attached-on-import", "apply-at-start", "apply-late", "replaced-behind-our-back"])
def test_report_judges_each_rank_timeline(tmp_path, capsys, timeline, want):
    good = [{"t": 0.05, "live": ["meta_buffers"], "via": "startup"}]
    rc, out, _ = _run(_write(tmp_path / "r", _trec(1, 0, good), _trec(2, 1, timeline)), capsys=capsys)
    if want is None:
        assert rc == 0 and "verdict: consistent" in out, out
    else:
        assert rc == 1 and want in out and "rank 1: meta_buffers not live throughout" in out, out


def test_report_truncated_timeline_is_not_live_throughout(tmp_path, capsys):
    r = _trec(2, 1, [{"t": 0.1, "live": ["meta_buffers"], "via": "startup"}])
    r["timeline_dropped"] = 3
    rc, out, _ = _run(_write(tmp_path / "r", _trec(1, 0, r["timeline"]), r), capsys=capsys)
    assert rc == 1 and "3 earlier changes not kept" in out, out


def test_report_tells_a_stale_launch_from_today_s(tmp_path, capsys):
    """Item 3: one directory, one TORCHELASTIC_RUN_ID. Yesterday's launch restarted once;
    today's ran at restart 0 with rank 1 missing a fix. Both launches are judged."""
    day = 86400.0
    recs = [_rec(11, 0, restart=0), _rec(12, 1, restart=0), _rec(21, 0, restart=1), _rec(22, 1, restart=1),
            _rec(31, 0, restart=0), _rec(32, 1, restart=0, live=())]
    for r, t in zip(recs, (1000.0, 1001.0, 1100.0, 1100.5, 1000.0 + day, 1000.7 + day)):
        r["started_unix"] = t
    rc, out, _ = _run(_write(tmp_path / "r", *recs), "--json", capsys=capsys)
    data = json.loads(out)
    roles = {p["pid"]: p["role"] for p in data["processes"]}
    assert roles[11] == roles[12] == "rank, earlier attempt (restart 0)", roles
    assert roles[21] == roles[22] == roles[31] == roles[32] == "rank", roles
    assert rc == 1 and len(data["runs"]) == 2, data["runs"]
    old, new = sorted(data["runs"], key=lambda v: v["launch_started"])
    assert old["agree"] and old["restart"] == 1 and old["ranks"] == [0, 1]
    assert not new["agree"] and new["restart"] == 0 and any("mixed code: meta_buffers" in p for p in new["problems"])


@pytest.mark.parametrize("recs, want", [
    ([_rec(1, 0), _rec(2, 1), _rec(3, 2)], "rank 2 is outside world size 2"),
    ([_rec(1, 0, ws=None), _rec(2, 2, ws=None)], "no record from rank 1"),
    ([_rec(1, -1, ws=0)], "world size 0"),
    ([_rec(1, -1, ws=0)], "rank -1 is not a rank"),
], ids=["rank-beyond-world-size", "gap-without-world-size", "world-size-zero", "negative-rank"])
def test_report_impossible_rank_layouts(tmp_path, capsys, recs, want):
    """Item 4: layouts that cannot be one run are not "consistent"."""
    rc, out, _ = _run(_write(tmp_path / "r", *recs), capsys=capsys)
    assert rc == 1 and want in out and "verdict: NOT consistent (exit 1)" in out, out


def test_report_skips_only_its_own_record(tmp_path, capsys):
    """Item 5: a record with the reader's (host, pid) (pids repeat across containers sharing a
    host name) is another process's record unless it is the reader's own (by its id)."""
    me = _rec(os.getpid(), 1, host=M.host())
    rc, out, _ = _run(_write(tmp_path / "r", _rec(1, 0, host=M.host()), _rec(2, 1, host=M.host()), me),
                      capsys=capsys)
    assert rc == 1 and "rank 1 recorded by 2 processes" in out, out
