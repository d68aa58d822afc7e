"""Distributed acceptance on CPU (gloo): every rank's record survives, and ``hfpatches report``
reads the run back.

``torchrun --nproc-per-node 2`` and ``accelerate launch`` (2 processes) of tests/_dist_train.py
under ``HFPATCHES_AUTO=1`` (this checkout's ``hfpatches_auto.pth``, in a throwaway venv that borrows
the stack: tests/_autovenv.py; no ``apply()`` in the script):
every rank has the expected fixes live -- meta_buffers (a meta-initialised tiny Llama
materialised per rank keeps ``inv_freq``) and, on the affected stack, liger_flash_kwargs (a DDP
step with Liger's real FLCE kernel under ``TRITON_INTERPRET=1`` on a padding-free batch; on the
latest stack it is NOT_AFFECTED and the step runs anyway) -- the spawn DataLoader workers get
records of their own and do not touch the ranks', and ``report`` lists both ranks with their
rank numbers and says they agree. A run where rank 1 has ``HFPATCHES_DISABLE=*`` is flagged.
Kept small for a 2-core CI box: one launch per scenario, tiny model, one step, one worker.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _autovenv import make_auto_venv

pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve().parent / "_dist_train.py"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def python(tmp_path_factory) -> str:
    """An interpreter whose start-up runs this checkout's hfpatches_auto.pth (tests/_autovenv.py)."""
    return str(make_auto_venv(tmp_path_factory.mktemp("autovenv")))


def _expected_live(stack: str) -> list[str]:
    """At least these; outside liger_flash_kwargs' range (liger-kernel 0.8.5 on the latest stack)
    it has no bug: NOT_AFFECTED there (0.5.6 and the boundary stack's 0.6.3 are in it)."""
    from conftest import in_range

    return ["liger_flash_kwargs", "meta_buffers"] if in_range("liger_flash_kwargs") else ["meta_buffers"]


def _env(tmp_path: Path, **extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HFPATCHES_AUTO": "1",
           "HFPATCHES_REPORT": str(tmp_path / "logs" / "hfpatches.json"), "OMP_NUM_THREADS": "1",
           "TRITON_INTERPRET": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    for k in ("HFPATCHES_ONLY", "HFPATCHES_DISABLE", "HFPATCHES_STRICT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(k, None)
    env.update(extra)
    return env


def _launch(cmd: list[str], env: dict, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540, cwd=str(ROOT))
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    assert proc.returncode == 0 and len(ranks) == 2, \
        f"rc={proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    assert not [r for r in ranks if "error" in r], ranks
    return ranks


def _report(path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HFPATCHES_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "hfpatches", "report", str(path), *args], env=env,
                          capture_output=True, text=True, timeout=120, cwd=str(ROOT))


def _check_agreeing_run(tmp_path: Path, ranks: list[dict], stack: str, *, workers: bool) -> None:
    for r in ranks:
        assert r["inv_freq_ok"], f"rank {r['rank']}: meta-initialised model lost inv_freq: {r}"
        assert set(_expected_live(stack)) <= set(r["status_live"]) and r["loss"] == r["loss"], r
    want = ranks[0]["status_live"]   # what hfpatches.status() said inside the rank: the record must say the same
    assert ranks[1]["status_live"] == want, ranks
    index = tmp_path / "logs" / "hfpatches.json"
    proc = _report(index, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(proc.stdout)
    procs = data["processes"]
    by_pid = {p["pid"]: p for p in procs}
    for r in ranks:   # each rank's own record, with its rank, its real live set: no other process wrote it
        rec = by_pid[r["pid"]]
        assert (rec["rank"], rec["role"], rec["live"]) == (r["rank"], "rank", want), rec
        assert rec["patches"]["meta_buffers"]["outcome"] == "APPLIED", rec
    children = [p for p in procs if p["role"].startswith("child of")]
    if workers:       # spawn workers (and multiprocessing's resource tracker) inherit RANK: children
        assert {p["parent"] for p in children} == {r["pid"] for r in ranks}, procs
        assert any("meta_buffers" in p["live"] for p in children), "no DataLoader worker record"
    [run] = data["runs"]
    assert run["agree"] and run["ranks"] == [0, 1] and run["world_size"] == 2 and run["live"] == want, run
    text = _report(index)
    assert text.returncode == 0 and "ranks agree" in text.stdout and "verdict: consistent" in text.stdout, text.stdout
    rows = [row for row in map(str.split, text.stdout.splitlines()) if len(row) > 3 and row[3] == "rank"]
    assert sorted(row[2] for row in rows) == ["0/2", "1/2"], text.stdout


def test_torchrun_two_ranks_with_spawn_workers(tmp_path, stack, python):
    cmd = [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(SCRIPT), "full", str(tmp_path / "out")]
    ranks = _launch(cmd, _env(tmp_path), tmp_path / "out")
    _check_agreeing_run(tmp_path, ranks, stack, workers=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_processes(tmp_path, stack, python):
    pytest.importorskip("accelerate")
    cmd = [python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(SCRIPT), "accelerate", str(tmp_path / "out")]
    # HF_HOME: no accelerate default_config.yaml of this machine's user leaks in
    ranks = _launch(cmd, _env(tmp_path, HF_HOME=str(tmp_path / "hf")), tmp_path / "out")
    _check_agreeing_run(tmp_path, ranks, stack, workers=False)


def test_mixed_run_is_flagged(tmp_path, python):
    """Rank 1 starts with HFPATCHES_DISABLE=* (a wrapper sets it from RANK): its buffer is lost
    while rank 0's is kept, and ``report`` says the run trained with mixed code (exit 1)."""
    wrapper = tmp_path / "rank_wrapper.sh"
    wrapper.write_text('#!/bin/sh\nif [ "$RANK" = "1" ]; then export HFPATCHES_DISABLE="*"; fi\n'
                       f'exec "{python}" "{SCRIPT}" light "{tmp_path / "out"}"\n')
    wrapper.chmod(0o755)
    cmd = [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--no-python", str(wrapper)]
    ranks = _launch(cmd, _env(tmp_path), tmp_path / "out")
    assert [(r["rank"], r["buffer_kept"], r["status_live"]) for r in ranks] == \
        [(0, True, ["meta_buffers"]), (1, False, [])], ranks
    index = tmp_path / "logs" / "hfpatches.json"
    proc = _report(index)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "ranks DISAGREE" in proc.stdout and "mixed code: meta_buffers live on rank 0" in proc.stdout, proc.stdout
    assert "rank 1: DISABLED (disabled by HFPATCHES_DISABLE)" in proc.stdout, proc.stdout
    data = json.loads(_report(index, "--json").stdout)
    assert not data["consistent"] and data["exit_code"] == 1
    assert sorted((p["rank"], p["live"]) for p in data["processes"] if p["role"] == "rank") == \
        [(0, ["meta_buffers"]), (1, [])]
