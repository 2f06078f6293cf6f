"""Real subprocess runs of `python -m ssl.pretrain` and `python -m ssl.eval.knn` on Fashion-MNIST."""

import json
import os
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
    "backbone=vit_t", "+backbone.kwargs.depth=2", "objective.dino.out_dim=256",
    "objective.dino.hidden_dim=128", "objective.dino.local_crops=2", "data.batch_size=16",
    "data.num_workers=0", "trainer.limit_train_batches=3", "trainer.max_epochs=2",
    "knn.max_train_samples=300", "knn.max_test_samples=200", "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
]


def run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    out = subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=timeout, env=env)
    return out


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("runs") / "dino"
    out = run(["ssl.pretrain", *TINY, f"hydra.run.dir={run_dir}"])
    assert out.returncode == 0, out.stderr[-4000:]
    return run_dir, out


def test_run_directory_holds_config_checkpoints_logs_and_export(pretrained_run) -> None:
    run_dir, out = pretrained_run
    assert (run_dir / "config.yaml").is_file()
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and len(ckpts) == 3, ckpts  # two epochs + last
    assert (run_dir / "logs" / "metrics.csv").is_file()
    assert (run_dir / "backbone.safetensors").is_file() and (run_dir / "backbone.json").is_file()
    assert "k-NN (k=20, T=0.07) on fashion_mnist test: top-1" in out.stdout
    metrics = (run_dir / "logs" / "metrics.csv").read_text().splitlines()[0]
    for name in ("train/loss", "train/lr", "train/weight_decay", "train/teacher_momentum",
                 "train/dino/teacher_temp", "train/dino/teacher_entropy", "train/dino/feature_std",
                 "knn/top1"):
        assert name in metrics, name


def test_checkpoint_loads_with_weights_only_and_holds_teacher_and_center(pretrained_run) -> None:
    run_dir, _ = pretrained_run
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    keys = ckpt["state_dict"].keys()
    assert "objectives.dino.center" in keys
    assert any(k.startswith("teacher.module.backbone.") for k in keys)
    assert ckpt["global_step"] == 6
    student = ckpt["state_dict"]["backbone.model.cls_token"]
    teacher = ckpt["state_dict"]["teacher.module.backbone.model.cls_token"]
    assert not torch.equal(student, teacher)  # the teacher is an average, not a copy


def test_knn_eval_of_checkpoint_and_export(pretrained_run, tmp_path: Path) -> None:
    run_dir, _ = pretrained_run
    limits = ["max_train_samples=600", "max_test_samples=300", "num_workers=0"]
    out = run(["ssl.eval.knn", f"checkpoint={run_dir / 'checkpoints' / 'last.ckpt'}", *limits,
               f"output={tmp_path / 'ckpt.json'}"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "k=20" in out.stdout and "top-1" in out.stdout
    from_ckpt = json.loads((tmp_path / "ckpt.json").read_text())
    out = run(["ssl.eval.knn", f"checkpoint={run_dir / 'backbone.safetensors'}", "dataset=fashion_mnist",
               *limits, f"output={tmp_path / 'export.json'}"])
    assert out.returncode == 0, out.stderr[-3000:]
    from_export = json.loads((tmp_path / "export.json").read_text())
    # The export is the teacher's backbone: both routes must give the same numbers.
    assert from_ckpt["k"]["20"] == from_export["k"]["20"]
    assert 10.0 <= from_ckpt["k"]["20"]["top1"] <= 100.0


def test_degradation_analysis_of_a_trained_checkpoint(pretrained_run, tmp_path: Path) -> None:
    """`checkpoint=` adds the trained backbone as a reference, next to pixels and the untrained one."""
    run_dir, _ = pretrained_run
    out = run(["ssl.analyze.degradation", "objective=dino", *TINY[:2], "objective.dino.local_crops=2",
               f"checkpoint={run_dir / 'checkpoints' / 'last.ckpt'}", "analysis.max_samples=100",
               "analysis.max_train_samples=300", "analysis.strengths=[0.1,0.4]", "analysis.linear=false",
               "num_workers=0", f"hydra.run.dir={tmp_path}"])
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "degradation.json").read_text())
    names = [r["reference"] for r in results["references"]]
    assert len(names) == 3 and "teacher backbone of" in names[2], names
    assert results["default"] == [0.05, 0.4]  # the dataset's local crop scale, as DINO trains


def test_a_new_run_never_clobbers_an_old_run_directory(pretrained_run) -> None:
    """Another config in the same directory is refused (the same config resumes: test_resume_exact)."""
    run_dir, _ = pretrained_run
    before = (run_dir / "config.yaml").read_text()
    out = run(["ssl.pretrain", *TINY, f"hydra.run.dir={run_dir}", "seed=1"])
    assert out.returncode != 0
    assert "already holds a run with a different config (seed: 0 -> 1)" in out.stderr
    assert (run_dir / "config.yaml").read_text() == before


def test_wandb_logger_runs_offline(tmp_path: Path) -> None:
    out = run(["ssl.pretrain", *TINY, "trainer.max_steps=2", "knn.enabled=false", "logger=wandb",
               f"hydra.run.dir={tmp_path / 'w'}"])
    assert out.returncode == 0, out.stderr[-4000:]
    assert list((tmp_path / "w" / "wandb").glob("offline-run-*"))


def test_resnet_and_gradient_accumulation(tmp_path: Path) -> None:
    tiny = [a for a in TINY if not a.startswith("+backbone.kwargs")]
    out = run(["ssl.pretrain", *tiny, "backbone=resnet18", "trainer.max_epochs=1",
               "trainer.accumulate_grad_batches=3", "knn.enabled=false", "export.enabled=false",
               f"hydra.run.dir={tmp_path / 'r'}"])
    assert out.returncode == 0, out.stderr[-4000:]
    ckpt = torch.load(tmp_path / "r" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 1  # 3 batches, one optimizer step


@pytest.mark.distributed
def test_two_cpu_processes_through_lightning_ddp(tmp_path: Path) -> None:
    """`trainer.devices=2 trainer.strategy=ddp` relaunches the Hydra entry point per rank."""
    out = run(["ssl.pretrain", *TINY, "trainer.max_epochs=1", "trainer.accelerator=cpu",
               "trainer.devices=2", "trainer.strategy=ddp", f"hydra.run.dir={tmp_path / 'd'}"])
    assert out.returncode == 0, out.stderr[-4000:]
    run_dir = tmp_path / "d"
    assert (run_dir / "train_ddp_process_1.log").exists()  # rank 1 ran in the same run directory
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    assert out.stdout.count("k-NN (k=20") == 1  # printed by rank 0 only


MASKED_TINY = [
    "data.batch_size=16", "data.num_workers=0", "trainer.limit_train_batches=3", "trainer.max_epochs=1",
    "knn.max_train_samples=300", "knn.max_test_samples=200", "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1", "reconstructions.num_images=4",
]


@pytest.mark.parametrize(("objective", "backbone", "extra"), [
    ("mae", "vit_t", ["+backbone.kwargs.depth=2", "objective.mae.decoder_depth=1"]),
    ("mfm", "resnet18", []),
    ("mfm", "vit_t", ["+backbone.kwargs.depth=2"]),
])
def test_masked_modeling_runs_write_checkpoints_and_reconstructions(
    tmp_path: Path, objective: str, backbone: str, extra: list[str]
) -> None:
    run_dir = tmp_path / objective
    out = run(["ssl.pretrain", f"objective={objective}", f"backbone={backbone}", *MASKED_TINY, *extra,
               f"hydra.run.dir={run_dir}"])
    assert out.returncode == 0, out.stderr[-4000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "reconstructions" / f"{objective}_epoch000.png").is_file()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3 and not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    metrics = (run_dir / "logs" / "metrics.csv").read_text()
    assert f"train/{objective}/loss" in metrics.splitlines()[0]
    config = (run_dir / "config.yaml").read_text()
    if backbone.startswith("vit"):
        assert "drop_path_rate: 0.0" in config  # MAE / MFM pretrain without stochastic depth
    assert "top-1" in out.stdout


def test_data2vec_run_keeps_an_eval_mode_teacher(tmp_path: Path) -> None:
    run_dir = tmp_path / "d2v"
    out = run(["ssl.pretrain", "objective=data2vec", "backbone=vit_t", "+backbone.kwargs.depth=2",
               "objective.data2vec.top_k=2", *MASKED_TINY, f"hydra.run.dir={run_dir}"])
    assert out.returncode == 0, out.stderr[-4000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    assert ckpt["global_step"] == 3
    assert "objectives.data2vec.mask_token" in state
    assert any(k.startswith("teacher.module.backbone.") for k in state)
    assert not any(k.startswith("teacher.module.data2vec") for k in state)  # the head is student-only
    header = (run_dir / "logs" / "metrics.csv").read_text().splitlines()[0]
    for name in ("train/data2vec/loss", "train/data2vec/target_std", "train/teacher_momentum"):
        assert name in header, name
    assert not (run_dir / "reconstructions").exists()
    assert "drop_path_rate: 0.25" in (run_dir / "config.yaml").read_text()


def test_coke_run_keeps_its_clustering_state_in_the_checkpoint(tmp_path: Path) -> None:
    """Two short epochs: the bootstrap epoch at lr 0, then training; the state lands in the checkpoint."""
    run_dir = tmp_path / "coke"
    extra = ["trainer.max_epochs=2", "objective.coke.num_clusters=[8,12]", "knn.every_n_epochs=2"]
    out = run(["ssl.pretrain", "objective=coke", "backbone=resnet18", *MASKED_TINY, *extra,
               f"hydra.run.dir={run_dir}"])
    assert out.returncode == 0, out.stderr[-4000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    assert ckpt["global_step"] == 6
    labels = state["objectives.coke.clusterings.1.labels"]
    assert labels.shape == (60_000, 1) and labels.dtype == torch.int16
    assert 90 <= int((labels >= 0).sum()) <= 6 * 16  # every image the two epochs saw has a label
    assert state["objectives.coke.clusterings.0.pre_centers"].shape == (8, 128)
    assert "num_samples: 60000" in (run_dir / "config.yaml").read_text()
    lines = (run_dir / "logs" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    for name in ("train/coke/loss", "train/coke/target_accuracy", "train/coke/head0_min_cluster_size"):
        assert name in header, name
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    lrs = [float(r["train/lr"]) for r in rows if r.get("train/lr")]
    assert lrs[:3] == [0.0, 0.0, 0.0] and lrs[3] > 0  # epoch 0 only bootstraps labels and centres
    assert "top-1" in out.stdout
    assert "sync_batchnorm: false" in (run_dir / "config.yaml").read_text()  # CoKe's SyncBN needs CUDA

    # Resume for a third epoch: the label memory and centres come back from the checkpoint.
    resumed_dir = tmp_path / "coke_resumed"
    out = run(["ssl.pretrain", "objective=coke", "backbone=resnet18", *MASKED_TINY, *extra,
               "trainer.max_epochs=3", f"resume={run_dir / 'checkpoints' / 'last.ckpt'}",
               f"hydra.run.dir={resumed_dir}"])
    assert out.returncode == 0, out.stderr[-4000:]
    after = torch.load(resumed_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert after["global_step"] == 9
    new_labels = after["state_dict"]["objectives.coke.clusterings.1.labels"]
    kept = labels >= 0
    # A fresh start would label only the third epoch's 48 images; the resumed run keeps all 96 rows.
    assert int((new_labels[kept] >= 0).sum()) == int(kept.sum())
    assert int((new_labels >= 0).sum()) >= int(kept.sum())
    before = state["objectives.coke.clusterings.0.cur_centers"]
    assert not torch.equal(after["state_dict"]["objectives.coke.clusterings.0.cur_centers"], before)


def test_linear_eval_reuses_the_knn_features_and_writes_json_beside_the_checkpoint(
    pretrained_run, tmp_path: Path
) -> None:
    run_dir, _ = pretrained_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    common = [f"checkpoint={ckpt}", "max_train_samples=600", "max_test_samples=300", "num_workers=0",
              f"cache_dir={tmp_path / 'cache'}"]
    out = run(["ssl.eval.knn", *common])
    assert out.returncode == 0, out.stderr[-3000:]
    knn = json.loads(ckpt.with_name("last.knn.json").read_text())
    assert [r["k"] for r in knn["grid"]] == [10, 20, 100, 200]
    assert knn["cache"] == {"train/cls": "miss", "test/cls": "miss"} and knn["extraction_images_per_s"] > 0
    probe = ["probe.epochs=2", "probe.lrs=[0.01,0.1]", "probe.weight_decays=[0]"]
    out = run(["ssl.eval.linear", *common, *probe])
    assert out.returncode == 0, out.stderr[-3000:]
    linear = json.loads(ckpt.with_name("last.linear.json").read_text())
    assert linear["cache"]["train/cls"] == "hit" and linear["cache"]["test/cls"] == "hit"
    assert linear["cache"]["train/last4"] == "miss"
    assert set(linear["variants"]) == {"cls", "cls+avgpool", "last4", "last4+avgpool"}
    assert linear["variant"] in linear["variants"] and len(linear["grid"]) == 4 * 2
    assert "best val top-1 per feature variant" in out.stdout


def test_online_linear_probe_is_logged(tmp_path: Path) -> None:
    run_dir = tmp_path / "probe"
    out = run(["ssl.pretrain", *TINY, "trainer.max_epochs=1", "online_linear.enabled=true",
               "online_linear.max_test_samples=200", "knn.enabled=false", f"hydra.run.dir={run_dir}"])
    assert out.returncode == 0, out.stderr[-4000:]
    lines = (run_dir / "logs" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    for name in ("online_linear/train_loss", "online_linear/top1", "online_linear/top5"):
        assert name in header, name
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    top1 = [float(r["online_linear/top1"]) for r in rows if r.get("online_linear/top1")]
    assert len(top1) == 1 and 0.0 <= top1[0] <= 100.0
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert any("OnlineLinearProbe" in key for key in ckpt["callbacks"])
