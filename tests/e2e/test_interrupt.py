"""Ctrl-C on a pretraining run: it stops at a step boundary with a checkpoint there, prints one line
with the resume command and exits 130 (no DataLoader-worker tracebacks); that command continues at
the step it stopped at. A second Ctrl-C exits at once."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FASHION_MNIST_DIR, REPO_ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="needs apt-get install dataset-fashion-mnist"),
]

TINY = [
    "objective=dino", "backbone=vit_t", "+backbone.kwargs.depth=1", "objective.dino.out_dim=128",
    "objective.dino.hidden_dim=64", "objective.dino.bottleneck_dim=32", "objective.dino.local_crops=1",
    "data.batch_size=8", "data.num_workers=1", "trainer.limit_train_batches=8", "trainer.max_epochs=1",
    "knn.enabled=false", "export.enabled=false", "attention_maps.enabled=false",
    "reconstructions.enabled=false", "trainer.enable_model_summary=false",
    "trainer.enable_progress_bar=false",
]
ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def test_ctrl_c_stops_cleanly_and_the_printed_command_resumes_at_that_step(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "ssl.pretrain", *TINY, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, start_new_session=True)
    seen = []
    for line in proc.stderr:  # the plan is printed once the fit (and its SIGINT handler) has started
        seen.append(line)
        if "planned" in line:
            break
    assert any("planned 1 epoch(s) x 8 steps = 8 optimizer steps" in line for line in seen), "".join(seen)
    os.killpg(proc.pid, signal.SIGINT)  # the whole group, workers included, as a terminal does
    out, rest = proc.communicate(timeout=300)
    err = "".join(seen) + rest
    assert proc.returncode == 130, err[-4000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-4000:]
    stopped = re.search(r"stopped at step (\d+) \(Ctrl-C\); checkpoint: (\S+)\. Resume with: (.+)", err)
    assert stopped, err[-4000:]
    step, checkpoint, command = int(stopped.group(1)), Path(stopped.group(2)), stopped.group(3)
    assert 1 <= step < 8 and checkpoint == run_dir / "checkpoints" / f"epoch000-step{step:07d}.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert saved["global_step"] == step
    assert not (run_dir / "result.json").exists()  # an interrupted run has not finished

    args = shlex.split(command)
    assert args[:3] == ["python", "-m", "ssl.pretrain"]
    resumed = subprocess.run([sys.executable, *args[1:]], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=600, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"(step {step})" in resumed.stderr and f"resuming at step {step}" in resumed.stderr
    assert (run_dir / "result.json").exists()
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert checkpoints == sorted({checkpoint.name, "epoch000-step0000008.ckpt", "last.ckpt"})
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 8


def test_a_second_ctrl_c_exits_at_once() -> None:
    code = ("import os\nfrom ssl.callbacks.graceful_stop import GracefulStop\n"
            "stop = GracefulStop('.')\nstop.owner_pid = os.getpid()\n"
            "stop.handle(2, None)\nprint('asked', flush=True)\nstop.handle(2, None)\nprint('not reached')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 130
    assert out.stdout.strip() == "asked" and "second Ctrl-C: exiting now" in out.stderr
