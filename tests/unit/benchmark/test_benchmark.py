"""`python -m ssl.benchmark`: several runs per call, isolated processes, precision, real data."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from ssl.benchmark.cli import main, parse_args
from ssl.benchmark.measure import teacher_inputs
from ssl.benchmark.runs import planned_runs
from ssl.benchmark.step import attach_grad_scaler, resolve_precision, synthetic_batch, training_step
from ssl.benchmark.timing import UtilisationSampler, gpu_utilisation_sampler
from ssl.data.datamodule import PretrainDataModule
from ssl.data.spec import PLAIN_VIEWS, VIEWS
from ssl.pretrain import build_module

# A ViT of 2 blocks on Fashion-MNIST-sized crops, one timed step: the numbers mean nothing, the
# plumbing is what is tested.
TINY = ["backbone=vit_t", "+backbone.kwargs.depth=2", "data.batch_size=4", "objective.dino.out_dim=64",
        "objective.dino.local_crops=2", "bench.steps=1", "bench.warmup=0", "bench.num_samples=64",
        "bench.data_pipeline=false"]


def run_main(tmp_path: Path, *args: str) -> tuple[list[dict], str]:
    """main() with JSON and markdown files in `tmp_path`; (rows, markdown)."""
    main([*args, f"bench.json={tmp_path / 'rows.json'}", f"bench.markdown={tmp_path / 'table.md'}"])
    return json.loads((tmp_path / "rows.json").read_text()), (tmp_path / "table.md").read_text()


def data_lines(markdown: str) -> list[str]:
    """The table's rows below its separator line."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|---")) + 1
    return [line for line in lines[start:] if line.startswith("| ")]


def image_folder(directory: Path, count: int = 12) -> Path:
    """A flat folder of small random RGB images (an unlabelled `dataset=imagefolder`)."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(directory / f"{i}.png")
    return directory


FOLDER = ["dataset=imagefolder", "dataset.image_size=16", "dataset.local_crop_size=8", "dataset.patch_size=8"]


def test_two_objectives_give_two_rows_and_a_table(tmp_path: Path, capsys) -> None:
    rows, markdown = run_main(tmp_path, *TINY, "bench.objectives=[dino,mfm]", "bench.isolate=false")
    assert [r["objective"] for r in rows] == ["dino", "mfm"]
    assert all(r["status"] == "ok" and r["precision"] == "32" and not r["isolated"] for r in rows)
    assert all(r["step_s"] > 0 and math.isfinite(r["overhead_ratio"]) for r in rows)
    assert len(rows[0]["crops"]) == 4 and len(rows[1]["crops"]) == 1  # 2 global + 2 local; 1 plain
    lines = data_lines(markdown)
    assert len(lines) == 2 and lines[0].startswith("| dino | vit_tiny_patch16_224 | 4 | 32 |")
    header = markdown.splitlines()[0]
    assert f"torch {torch.__version__}" in header and "precision: auto (32)" in header
    assert "`python -m ssl.benchmark backbone=vit_t" in header and "'bench.objectives=[dino,mfm]'" in header
    printed = capsys.readouterr().out
    assert markdown.strip() in printed and json.loads(printed[: printed.index("\nDevice:")]) == rows


def test_one_isolated_run_reports_its_own_process(tmp_path: Path) -> None:
    rows, markdown = run_main(tmp_path, *TINY, "bench.objectives=[mfm]", "bench.precision=32")
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["isolated"]
    assert rows[0]["objective"] == "mfm" and rows[0]["peak_memory_mb"] > 0
    assert len(data_lines(markdown)) == 1


def test_an_incompatible_pair_is_a_row_and_the_others_run(tmp_path: Path) -> None:
    rows, markdown = run_main(
        tmp_path, *TINY[2:], "bench.objectives=[mae,mfm]", "bench.backbones=[resnet18]", "bench.isolate=false"
    )
    assert [(r["objective"], r["status"]) for r in rows] == [("mae", "incompatible"), ("mfm", "ok")]
    assert "MAE needs a ViT backbone" in rows[0]["reason"]
    lines = data_lines(markdown)
    assert len(lines) == 2 and "incompatible: MAE needs a ViT backbone" in lines[0]


def test_a_call_in_which_nothing_ran_fails() -> None:
    with pytest.raises(SystemExit, match="none of the 1 benchmark runs ran .*mae x resnet18: MAE needs"):
        main([*TINY[2:], "bench.objectives=[mae]", "backbone=resnet18", "bench.isolate=false"])


def test_real_data_steps_per_s_from_an_image_folder(tmp_path: Path, monkeypatch) -> None:
    transferred = []

    def after_transfer(self: PretrainDataModule, batch: dict, dataloader_idx: int) -> dict:
        transferred.append(len(batch["index"]))
        return batch

    # Lightning's hook between the copy to the device and the step (GPU-side augmentation).
    monkeypatch.setattr(PretrainDataModule, "on_after_batch_transfer", after_transfer)
    root = image_folder(tmp_path / "images")
    rows, markdown = run_main(
        tmp_path, *TINY, *FOLDER, f"dataset.root={root}", "objective=dino", "data.num_workers=1",
        "bench.real_data=true", "bench.steps=2", "bench.warmup=1", "bench.isolate=false",
    )
    (row,) = rows
    assert transferred == [4] * 4  # the on-device batch, 1 warm-up and 2 timed steps
    for key in ("real_data_steps_per_s", "device_data_steps_per_s", "pipeline_keeps_up"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert row["num_workers"] == 1 and row["real_data_gpu_utilisation_pct"] is None
    assert "| real-data steps/s | on-device steps/s |" in markdown


def test_real_data_without_the_dataset_says_so(tmp_path: Path) -> None:
    rows, markdown = run_main(
        tmp_path, *TINY, *FOLDER, f"dataset.root={tmp_path / 'missing'}", "objective=mfm",
        "bench.real_data=true", "bench.isolate=false",
    )
    (row,) = rows
    assert row["status"] == "ok" and row["real_data_steps_per_s"] is None  # NaN is written as null
    assert "does not exist" in row["real_data_error"]
    assert "does not exist" in data_lines(markdown)[0]


def test_planned_runs_cross_objectives_and_backbones() -> None:
    overrides, bench = parse_args([
        "objective=dino", "backbone=vit_s", "objective.dino.out_dim=64", "+objective.mfm.radius=2",
        "data.batch_size=8", "bench.objectives=[dino+mfm,mae,[dino,mfm]]", "bench.backbones=[vit_t,resnet18]",
    ])
    runs = planned_runs(overrides, bench)
    assert [(r.objective, r.backbone) for r in runs] == [
        ("dino,mfm", "vit_t"), ("dino,mfm", "resnet18"), ("mae", "vit_t"), ("mae", "resnet18"),
        ("dino,mfm", "vit_t"), ("dino,mfm", "resnet18"),
    ]
    assert runs[0].overrides == ["objective.dino.out_dim=64", "+objective.mfm.radius=2", "data.batch_size=8",
                                 "objective=[dino,mfm]", "backbone=vit_t"]
    assert runs[3].overrides == ["data.batch_size=8", "objective=mae", "backbone=resnet18"]
    overrides, bench = parse_args(
        ["objective=[mae, mfm]", "objective.dino.out_dim=64", "objective.mae.mask_ratio=0.5", "bench.steps=2"]
    )
    (run,) = planned_runs(overrides, bench)
    assert (run.objective, run.backbone) == ("mae,mfm", "default")
    assert run.overrides == ["objective=[mae, mfm]", "objective.mae.mask_ratio=0.5"]
    overrides, bench = parse_args(["experiment=quickstart", "objective.dino.out_dim=64"])
    assert planned_runs(overrides, bench)[0].overrides == overrides  # the objectives are not named here


def test_bad_settings_are_refused_with_advice() -> None:
    with pytest.raises(SystemExit, match="unknown setting.* bench.stpes; valid: bench.steps"):
        parse_args(["bench.stpes=3"])
    with pytest.raises(ValueError, match="valid values are auto, 32, bf16, fp16"):
        resolve_precision("fp8", torch.device("cpu"))
    assert resolve_precision("auto", torch.device("cpu")) == "32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("16-mixed", torch.device("cuda")) == "fp16"
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for CPU-only machines")
def test_fp16_on_the_cpu_is_refused() -> None:
    with pytest.raises(SystemExit, match="bench.precision=fp16 needs a CUDA device"):
        main(["objective=mfm", "bench.precision=fp16"])


@pytest.mark.parametrize("optimizer", ["sgd", "dino"], ids=["sgd", "fused_adamw"])
def test_a_loss_scaled_step_matches_the_plain_one(optimizer: str) -> None:
    """The fp16 path's GradScaler plumbing (scaled backward, unscaling before the clipping, the
    scaler's step) on float32 numbers: a power-of-two scale cancels, so the weights agree. SGD is
    unscaled by the step's closure, the fused AdamW by SSLModule itself."""
    overrides = ["objective=dino", *TINY[:5], f"optimizer={optimizer}", "optimizer.clip_grad=0.01",
                 "optimizer.warmup_epochs=0", "run_dir=unused"]
    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    weights = []
    for scaled in (False, True):
        torch.manual_seed(0)
        module = build_module(cfg.copy(), num_samples=64)
        module.train()
        opt = module.configure_optimizers()
        module.schedules = module.build_schedules(100, 10)
        scaler = attach_grad_scaler(module, torch.device("cpu")) if scaled else None
        batch = synthetic_batch(OmegaConf.create(module.hparams["config"]), module, torch.device("cpu"))
        before = [p.detach().clone() for p in module.backbone.parameters()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log without a Trainer
            training_step(module, opt, batch, scaler=scaler)
        assert any(not torch.equal(a, p) for a, p in zip(before, module.backbone.parameters()))
        weights.append([p.detach().clone() for p in module.parameters()])
    assert scaler.get_scale() == 2.0**16  # no overflow: the step was taken
    assert module.guard.overflows == module.guard.skipped == 0
    for plain, scaled_weight in zip(*weights):
        torch.testing.assert_close(scaled_weight, plain, rtol=1e-5, atol=1e-7)


def test_utilisation_is_the_mean_of_its_samples_and_absent_on_the_cpu() -> None:
    calls = iter(range(1, 10**6))
    with UtilisationSampler(lambda: float(next(calls)), interval_s=0.001) as sampler:
        sum(range(100_000))
    n = len(sampler.samples)
    assert sampler.samples == [float(i) for i in range(1, n + 1)] and sampler.mean == (n + 1) / 2
    with UtilisationSampler(lambda: 42.0, interval_s=3600) as once:  # a block shorter than the interval
        pass
    assert once.samples == [42.0] and once.mean == 42.0
    with UtilisationSampler(None) as nothing:
        pass
    assert nothing.mean is None and gpu_utilisation_sampler(torch.device("cpu")) is None


def test_the_least_work_runs_every_teacher_on_its_own_input() -> None:
    """`[dino,data2vec]` keeps two EMA teachers (their momentum settings differ): DINO's encodes
    the global crops, data2vec's the plain unmasked image; both count in the least work."""
    overrides = ["objective=[dino,data2vec]", *TINY[:5], "run_dir=unused"]
    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    module = build_module(cfg, num_samples=64)
    batch = synthetic_batch(OmegaConf.create(module.hparams["config"]), module, torch.device("cpu"))
    pairs = teacher_inputs(module, batch)
    assert [teacher for teacher, _ in pairs] == [t.module for t in module.ema_teachers().values()]
    assert len(pairs) == 2
    (_, dino_crops), (_, data2vec_crops) = pairs
    assert len(dino_crops) == 2 and all(c is v for c, v in zip(dino_crops, batch[VIEWS]))
    assert len(data2vec_crops) == 1 and data2vec_crops[0] is batch[PLAIN_VIEWS][0]
