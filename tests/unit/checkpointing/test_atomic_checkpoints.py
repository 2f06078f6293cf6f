"""A process SIGKILLed in the middle of writing a checkpoint leaves the previous one whole and loadable.

The kill is deterministic: a subprocess replaces `torch.save` with one that writes half of the
serialised bytes, flushes, and SIGKILLs its own process, at the N-th save.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import FASHION_MNIST_DIR, REPO_ROOT

from ssl.checkpointing.atomic_io import atomic_torch_save, remove_partial_saves
from ssl.checkpointing.resume import latest_checkpoint

UNREADABLE = (RuntimeError, EOFError, pickle.UnpicklingError)  # what torch.load raises on a cut file
ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}

# Prepended to a script: the `kill_at`-th torch.save writes half its bytes and the process dies.
DYING_SAVE = textwrap.dedent("""
    import io, os, signal, sys
    sys.path.insert(0, {root!r})
    import torch
    real_save, saves = torch.save, [0]

    def dying_save(obj, f, *args, **kwargs):
        saves[0] += 1
        if saves[0] != {kill_at}:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = dying_save
""")


def run_script(body: str, kill_at: int, tmp_path: Path, args: list[str] = ()) -> subprocess.CompletedProcess:
    script = tmp_path / "dying.py"
    script.write_text(DYING_SAVE.format(root=str(REPO_ROOT), kill_at=kill_at) + textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script), *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600, env=ENV)


def test_kill_during_an_atomic_save_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "ckpts" / "last.ckpt"
    out = run_script(f"""
        from ssl.checkpointing.atomic_io import atomic_torch_save
        atomic_torch_save({{"global_step": 1, "w": torch.ones(1000)}}, {str(path)!r})
        atomic_torch_save({{"global_step": 2, "w": torch.zeros(1000)}}, {str(path)!r})  # killed
        print("not reached")
    """, kill_at=2, tmp_path=tmp_path)
    assert out.returncode == -signal.SIGKILL and "not reached" not in out.stdout
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 1 and torch.equal(ckpt["w"], torch.ones(1000))
    partial = [p.name for p in path.parent.iterdir() if p.name != "last.ckpt"]
    assert len(partial) == 1 and partial[0].startswith("last.ckpt.tmp-")  # the half-written file
    with pytest.raises(UNREADABLE):
        torch.load(path.parent / partial[0], map_location="cpu", weights_only=True)
    assert [p.name for p in remove_partial_saves(path.parent)] == partial
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_plain_torch_save_is_what_the_kill_would_corrupt(tmp_path: Path) -> None:
    """Control: the same kill during a direct torch.save leaves a truncated file at the final name."""
    path = tmp_path / "last.ckpt"
    out = run_script(f"""
        for step in (1, 2):
            with open({str(path)!r}, "wb") as f:
                torch.save({{"global_step": step, "w": torch.zeros(1000)}}, f)
    """, kill_at=2, tmp_path=tmp_path)
    assert out.returncode == -signal.SIGKILL
    with pytest.raises(UNREADABLE):
        torch.load(path, map_location="cpu", weights_only=True)


def test_a_failed_save_removes_its_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "x.ckpt"
    atomic_torch_save({"global_step": 1}, path)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        atomic_torch_save({"bad": lambda: None}, path)  # not picklable
    assert [p.name for p in tmp_path.iterdir()] == ["x.ckpt"]
    assert torch.load(path, weights_only=True) == {"global_step": 1}


def test_latest_checkpoint_prefers_the_most_steps(tmp_path: Path) -> None:
    atomic_torch_save({"global_step": 4}, tmp_path / "last.ckpt")
    atomic_torch_save({"global_step": 6}, tmp_path / "epoch001-step0000006.ckpt")
    assert latest_checkpoint(tmp_path).name == "epoch001-step0000006.ckpt"
    atomic_torch_save({"global_step": 6}, tmp_path / "last.ckpt")
    assert latest_checkpoint(tmp_path).name == "last.ckpt"
    (tmp_path / "last.ckpt").write_bytes(b"PK\x03\x04 cut short")  # as a non-atomic writer could leave it
    assert latest_checkpoint(tmp_path).name == "epoch001-step0000006.ckpt"


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="needs apt-get install dataset-fashion-mnist")
def test_pretraining_killed_while_writing_last_ckpt_resumes_from_the_newest_whole_one(tmp_path: Path) -> None:
    """Saves of a run checkpointing every 2 steps: step2 file, last@2, step4 file, last@4 (killed).

    The restart resumes from the step-4 file, newer than the surviving last.ckpt, and keeps the last 2.
    """
    run_dir = tmp_path / "run"
    args = [
        "objective=dino", "backbone=vit_t", "+backbone.kwargs.depth=2", "objective.dino.out_dim=256",
        "objective.dino.hidden_dim=128", "objective.dino.local_crops=2", "data.batch_size=16",
        "data.num_workers=0", "trainer.limit_train_batches=6", "trainer.max_epochs=1", "knn.enabled=false",
        "export.enabled=false", "attention_maps.enabled=false", "trainer.enable_model_summary=false",
        "trainer.enable_progress_bar=false", "checkpoint.every_n_train_steps=2", "checkpoint.keep_last=2",
        f"hydra.run.dir={run_dir}",
    ]
    out = run_script("""
        from ssl.pretrain import main
        sys.argv = ["ssl.pretrain", *sys.argv[1:]]
        main()
    """, kill_at=4, tmp_path=tmp_path, args=args)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2  # the previous last.ckpt, whole
    assert len(list(ckpts.glob("last.ckpt.tmp-*"))) == 1  # the interrupted write never took its name
    assert torch.load(ckpts / "epoch000-step0000004.ckpt", weights_only=True)["global_step"] == 4

    out = subprocess.run([sys.executable, "-m", "ssl.pretrain", *args], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=600, env=ENV)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "removed 1 partial file(s) of an interrupted checkpoint save" in out.stderr
    assert "epoch000-step0000004.ckpt (step 4)" in out.stderr  # newer than the surviving last.ckpt
    assert not list(ckpts.glob("*.tmp-*"))
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 6
    # keep_last=2: the two newest periodic checkpoints, and last.ckpt.
    kept = sorted(p.name for p in ckpts.iterdir())
    assert kept == ["epoch000-step0000004.ckpt", "epoch000-step0000006.ckpt", "last.ckpt"], kept
