"""`mergesafe sweep --ray` on a local Ray cluster, the OUT lock, and Ctrl-C / kill / resume.

Real Ray (a local cluster of 2 CPUs, and a simulated two-node cluster), real subprocesses and
real signals; the tiny test Llamas.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mergesafe.errors import UserError
from mergesafe.sweep.api import sweep
from mergesafe.sweep.lock import LOCK_NAME, SweepLock
from mergesafe.sweep.ray_pool import RayOptions, worker_shape
from test_sweep import _metrics, _write_sets

ray = pytest.importorskip("ray")

WEIGHTS = [0.2, 0.4, 0.6, 0.8]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]


def _by_key(rows: list[dict]) -> dict[str, dict]:
    return {r["key"]: _metrics(r) | {"method": r["method"], "weight": r["weight"]} for r in rows}


def _cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "mergesafe", "sweep", *map(str, args)]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _wait_rows(out: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "results.jsonl").exists() and len(_rows(out)) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"sweep ended early: {proc.communicate()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no rows in time")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_pre, tiny_post):
    """The one-process sweep every Ray sweep is compared with."""
    base = tmp_path_factory.mktemp("reference")
    cfg = _write_sets(base / "sets")
    result = sweep(tiny_pre, tiny_post, base / "out", methods=["linear"], weights=WEIGHTS, eval_config=cfg,
                   progress=False)
    return cfg, _by_key(result.rows)


@pytest.fixture(scope="module")
def reference_each(tmp_path_factory, tiny_pre, tiny_post, tiny_post2, reference):
    """The one-process `--each-post` sweep of two posts (fine-tuning seeds)."""
    cfg, _ = reference
    out = tmp_path_factory.mktemp("reference_each") / "out"
    result = sweep(tiny_pre, [tiny_post, tiny_post2], out, methods=["linear"], weights=WEIGHTS,
                   eval_config=cfg, progress=False, each_post=True)
    return result, _by_key(_rows(out))


def test_each_post_evaluates_every_post_alone_and_ranks_their_mean(reference, reference_each, tiny_post,
                                                                  tiny_post2):
    _, one_post = reference
    result, per_post = reference_each
    assert result.computed == 1 + 2 * (len(WEIGHTS) + 1)  # pre once, then (post, λ) for each post
    assert set(one_post) <= set(per_post)  # a post's rows are keyed as its one-post sweep: reusable
    for key, row in one_post.items():
        assert per_post[key] == row
    assert len(result.rows) == len(WEIGHTS) + 2 and len(result.seed_rows) == 1 + 2 * (len(WEIGHTS) + 1)
    for w in WEIGHTS:
        mean = result.row("linear", w)
        seeds = [r for r in result.seed_rows if r["method"] == "linear" and r["weight"] == w]
        assert sorted(r["post"] for r in seeds) == sorted([str(tiny_post), str(tiny_post2)])
        assert mean["safety"]["harm"]["asr"] == pytest.approx(sum(r["safety"]["harm"]["asr"] for r in seeds) / 2)
        assert mean["task"]["task"]["score"] == pytest.approx(sum(r["task"]["task"]["score"] for r in seeds) / 2)
        assert mean["safety"]["harm"]["n"] == sum(r["safety"]["harm"]["n"] for r in seeds)
    assert result.recommended_row["key"] == result.recommendation["key"]


def test_each_post_refuses_save_best(tmp_path, tiny_pre, tiny_post, tiny_post2):
    cfg = _write_sets(tmp_path / "sets")
    with pytest.raises(UserError, match="--each-post"):
        sweep(tiny_pre, [tiny_post, tiny_post2], tmp_path / "out", methods=["linear"], weights=[0.5],
              eval_config=cfg, progress=False, each_post=True, save_best=True)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- Ray


@pytest.mark.slow
def test_ray_sweep_gives_the_rows_of_the_one_process_sweep(tmp_path, tiny_pre, tiny_post, reference,
                                                          local_ray):
    cfg, expected = reference
    result = sweep(tiny_pre, tiny_post, tmp_path / "out", methods=["linear"], weights=WEIGHTS,
                   eval_config=cfg, progress=False, ray=RayOptions(workers=2))
    assert result.computed == len(WEIGHTS) + 2
    rows = _rows(tmp_path / "out")
    assert _by_key(rows) == expected  # same keys, same metrics
    assert set(rows[0]) == {"method", "weight", "params", "safety", "over_refusal", "task", "key", "seed",
                            "seconds", "version"}
    assert not (tmp_path / "out" / LOCK_NAME).exists()
    assert not [a for a in ray.util.list_named_actors() if "mergesafe" in a]  # workers stopped


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_every_trial_appears_once(tmp_path, tiny_pre, tiny_post, reference,
                                                                  local_ray):
    cfg, expected = reference
    out = tmp_path / "out"
    killed: list[str] = []

    def kill_a_worker() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if (out / "results.jsonl").exists() and len(_rows(out)) >= 2:
                names = sorted(a for a in ray.util.list_named_actors() if "mergesafe-sweep-worker" in a)
                if names:
                    ray.kill(ray.get_actor(names[0]), no_restart=True)
                    killed.append(names[0])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_worker)
    killer.start()
    result = sweep(tiny_pre, tiny_post, out, methods=["linear"], weights=WEIGHTS, eval_config=cfg,
                   progress=False, ray=RayOptions(workers=2))
    killer.join()
    assert killed, "the test did not get to kill a worker"
    rows = _rows(out)
    assert len(rows) == len({r["key"] for r in rows}) == len(WEIGHTS) + 2  # exactly once
    assert _by_key(rows) == expected
    assert any("died" in note and "retried" in note for note in result.notes), result.notes


@pytest.mark.slow
def test_two_node_cluster_each_post(tmp_path, tiny_pre, tiny_post, tiny_post2, reference, reference_each):
    """Two simulated nodes, two fine-tuning seeds: the unit of work is (post, method, λ)."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        cfg, _ = reference
        expected_result, expected = reference_each
        result = sweep(tiny_pre, [tiny_post, tiny_post2], tmp_path / "out", methods=["linear"],
                       weights=WEIGHTS, eval_config=cfg, progress=False, each_post=True,
                       ray=RayOptions(address=cluster.address, workers=2))
        assert result.computed == 1 + 2 * (len(WEIGHTS) + 1)
        assert _by_key(_rows(tmp_path / "out")) == expected
        assert result.recommendation == expected_result.recommendation
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_driver_sigkill_then_rerun_recomputes_nothing_finished(tmp_path, tiny_pre, tiny_post, reference):
    _, expected = reference
    sets = tmp_path / "sets"
    _write_sets(sets)
    out = tmp_path / "out"
    args = ["--pre", tiny_pre, "--post", tiny_post, "--out", out, "--weights", ",".join(map(str, WEIGHTS)),
            "--safety", sets / "harm.jsonl", "--over-refusal", sets / "benign.csv", "--task",
            sets / "task.jsonl", "--scorer", "contains", "--max-new-tokens", 6, "--batch-size", 4,
            "--no-progress"]
    proc = subprocess.Popen(_cli(*args, "--ray", "--workers", 1), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_rows(out, 2, proc)
    os.kill(proc.pid, signal.SIGKILL)  # the driver alone, as the OOM killer would
    proc.wait()
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)  # then what the killed driver's local cluster left running
    finished = {r["key"] for r in _rows(out)}
    assert 2 <= len(finished) < len(WEIGHTS) + 2
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == proc.pid  # left behind by the kill

    again = subprocess.run(_cli(*args, "--ray", "--workers", 1), env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"{len(WEIGHTS) + 2 - len(finished)} trials computed, {len(finished)} reused" in again.stdout
    assert "took over the lock" in again.stderr
    rows = _rows(out)
    assert len(rows) == len({r["key"] for r in rows}) == len(WEIGHTS) + 2
    # (other set paths than the reference's, so other keys: compare by trial)
    assert sorted(_by_key(rows).values(), key=str) == sorted(expected.values(), key=str)


def test_worker_shape_follows_the_cluster():
    assert worker_shape({"CPU": 8.0}, RayOptions()) == worker_shape({"CPU": 8.0}, RayOptions(workers=4))
    cpu = worker_shape({"CPU": 8.0}, RayOptions())
    assert (cpu.count, cpu.cpus, cpu.gpus, cpu.threads) == (4, 2.0, 0.0, 2)
    gpu = worker_shape({"CPU": 16.0, "GPU": 8.0}, RayOptions(gpus_per_worker=2))
    assert (gpu.count, gpu.gpus, gpu.cpus) == (4, 2.0, 1.0)
    assert worker_shape({"CPU": 16.0, "GPU": 8.0}, RayOptions()).count == 8
    two = worker_shape({"CPU": 2.0}, RayOptions(workers=2))
    assert (two.count, two.cpus, two.threads) == (2, 1.0, 1)
    assert worker_shape({"CPU": 2.0}, RayOptions(workers=1, threads_per_worker=1)).threads == 1
    over = worker_shape({"CPU": 2.0}, RayOptions(workers=4))
    assert over.cpus == 0.5 and over.threads == 1
    with pytest.raises(UserError, match="needs 6 GPUs"):
        worker_shape({"CPU": 8.0, "GPU": 4.0}, RayOptions(workers=3, gpus_per_worker=2))


def test_ray_flags_need_ray(tmp_path, tiny_pre, tiny_post, capsys):
    from cli_helpers import expect_error

    sets = tmp_path / "sets"
    _write_sets(sets)
    expect_error(["sweep", "--pre", tiny_pre, "--post", tiny_post, "--out", tmp_path / "o", "--safety",
                  sets / "harm.jsonl", "--workers", "2"], capsys, "need --ray")


def test_missing_ray_gives_the_install_line(tmp_path, tiny_pre, tiny_post, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    cfg = _write_sets(tmp_path / "sets")
    with pytest.raises(UserError, match=r"pip install 'mergesafe\[ray\]'"):
        sweep(tiny_pre, tiny_post, tmp_path / "out", methods=["linear"], weights=[0.5], eval_config=cfg,
              progress=False, ray=RayOptions())
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- lock and signals


def test_a_second_sweep_on_the_same_out_exits_2_naming_the_holder(tmp_path, tiny_pre, tiny_post):
    sets = tmp_path / "sets"
    _write_sets(sets)
    out = tmp_path / "out"
    args = ["--pre", tiny_pre, "--post", tiny_post, "--out", out, "--safety", sets / "harm.jsonl",
            "--weights", "0.5", "--max-new-tokens", 4, "--no-progress"]
    # another process holds OUT (as a running sweep does)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from mergesafe.sweep.lock import SweepLock\n"
        f"with SweepLock(Path({str(out)!r})):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run(_cli(*args), env=_env(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        err = second.stderr.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert "another sweep is writing this folder" in err
        assert f"pid {holder.pid} on host {socket.gethostname()}" in err
        assert not (out / "results.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: the next sweep takes the lock over (flock died with it) and runs
    third = subprocess.run(_cli(*args), env=_env(), capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    assert "took over the lock" in third.stderr and f"pid {holder.pid}" in third.stderr
    assert len(_rows(out)) == 3
    assert not (out / LOCK_NAME).exists()


def test_lock_in_process_refuses_a_second_holder(tmp_path):
    with SweepLock(tmp_path / "o"):
        with pytest.raises(UserError, match=f"pid {os.getpid()}"):
            with SweepLock(tmp_path / "o"):
                pass
    with SweepLock(tmp_path / "o") as again:
        assert again.note is None  # released cleanly: no takeover


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_keeps_finished_trials_and_says_how_to_resume(tmp_path, tiny_pre, tiny_post,
                                                                       signum, code):
    sets = tmp_path / "sets"
    _write_sets(sets)
    out = tmp_path / "out"
    args = ["--pre", tiny_pre, "--post", tiny_post, "--out", out, "--weights", "0.1:0.9:0.1",
            "--safety", sets / "harm.jsonl", "--task", sets / "task.jsonl", "--scorer", "contains",
            "--max-new-tokens", 24, "--no-progress"]
    # A shell starts background jobs with SIGINT ignored; the child puts Python's handler back.
    code_line = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                 "from mergesafe.cli import main; sys.argv = ['mergesafe'] + sys.argv[1:]; main()")
    proc = subprocess.Popen([sys.executable, "-c", code_line, "sweep", *map(str, args)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_rows(out, 1, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    kept = len(_rows(out))
    assert 1 <= kept < 11
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == (f"mergesafe: interrupted: {kept} of 11 trials are finished and kept in "
                         f"{out / 'results.jsonl'}; run the same command again to resume"), err
    assert "Traceback" not in err
    assert not (out / LOCK_NAME).exists()
