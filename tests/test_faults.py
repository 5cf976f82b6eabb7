"""Distributed faults on CPU with gloo: a rank killed, or hung, in the middle of training must not hold the others
for hours. Every rank exits non-zero within --dist_timeout (plus torchrun's teardown), the surviving rank's message
names it, and the same command then resumes to the weights of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import base_argv, free_port, make_records, metrics, prepare_run, run_cli, weights

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_MIN = 0.25  # --dist_timeout: 15 s, room for the ranks' start-up skew on a busy 2-core machine
TEARDOWN_S = 30  # torchrun's grace between its SIGTERM and SIGKILL to the other workers


def torchrun(argv):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={free_port()}", "ssd.py"] + argv, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank (a direct child of the launcher)."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    for pid in map(int, children):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no worker with RANK={rank} among {children}")


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_rank_that_dies_or_hangs_stops_all_ranks_and_the_rerun_resumes(fault, tiny_model_dir, prompts_path,
                                                                          tmp_path):
    """Rank 1 is killed (SIGKILL, as the OOM killer does) or stopped (SIGSTOP: a rank stuck in a kernel or a
    collective) once step 3 is logged. Rank 0 stops with a line naming itself and the failed collective, within the
    timeout; torchrun exits non-zero; the same command resumes from the step-2 state to the uninterrupted run's
    weights, bit for bit."""
    records = make_records(24)
    flags = dict(max_steps=8, save_steps=2, per_device_train_batch_size=2, dist_timeout=TIMEOUT_MIN)
    broken = prepare_run(tmp_path / "broken", base_argv(tiny_model_dir, prompts_path, **flags), records)
    launcher = torchrun(broken)
    log, deadline = tmp_path / "broken" / "metrics.jsonl", time.time() + 240
    while launcher.poll() is None and time.time() < deadline and \
            (not log.exists() or log.read_text().count("\n") < 3):
        time.sleep(0.01)
    victim = worker_pid(launcher, 1)
    os.kill(victim, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
    t0 = time.time()
    try:
        _, stderr = launcher.communicate(timeout=TIMEOUT_MIN * 60 + TEARDOWN_S + 30)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        with_victim = Path(f"/proc/{victim}").exists()
        if with_victim:
            os.kill(victim, signal.SIGKILL)
    took = time.time() - t0
    assert launcher.returncode != 0 and took < TIMEOUT_MIN * 60 + TEARDOWN_S + 15, (launcher.returncode, took)
    assert "error: rank 0 of 2: a collective failed or timed out (--dist_timeout 0.25 min)" in stderr, stderr[-3000:]
    if fault == "hung":
        assert "Timed out" in stderr
    assert not (tmp_path / "broken" / "config.json").exists()

    assert "resuming training at step" in run_cli(broken, torchrun=2).stdout
    reference = prepare_run(tmp_path / "reference", base_argv(tiny_model_dir, prompts_path, **flags), records)
    run_cli(reference, torchrun=2)
    w_resumed, w_ref = weights(tmp_path / "broken"), weights(tmp_path / "reference")
    assert w_resumed.keys() == w_ref.keys() and all(torch.equal(w_resumed[k], w_ref[k]) for k in w_ref)
    assert [m["step"] for m in metrics(tmp_path / "broken")] == list(range(1, 9))
