"""No host-device sync in the training step: a CPU-visible detector, and the device-side skip.

On a GPU every `.item()`, `bool(t)`, blocking copy or data-sized op in the step makes the CPU wait
for the GPU. `SyncDetector` sees them on CPU; every objective's full optimizer step (after a
warm-up step) must record none, a skipped (non-finite) step included. The skip itself is decided
on the device: the optimizer reads `found_inf`, the EMA a gated weight.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import REPO_ROOT
from omegaconf import OmegaConf
from test_module import Crops, tiny_module
from test_nonfinite import Snapshots, assert_applied, assert_skipped, fit, inject_nan_loss
from test_objectives_ddp import build, global_batch
from torch.utils.data import DataLoader

import ssl.module
from ssl.benchmark import training_step
from ssl.callbacks.progress import LazyProgressBar
from ssl.module import SSLModule
from ssl.optim.factory import FusedSGD, skips_on_device
from ssl.optim.lars import LARS
from ssl.optim.nonfinite import NonFiniteLossError
from ssl.sync_detector import SyncDetector
from ssl.teacher import EMATeacher, TeacherSpec

OPTIMIZER_DIR = REPO_ROOT / "conf" / "optimizer"


def test_the_detector_sees_each_kind_of_sync() -> None:
    x = torch.tensor([1.0, 0.0, 2.0])
    mask = x > 0
    syncs = {
        "item": lambda: x[0].item(),
        "bool": lambda: bool(x[0]),
        "tolist": lambda: x.tolist(),
        "float": lambda: float(x[0]),
        "int": lambda: int(x[0]),
        "index": lambda: [0, 1][torch.tensor(1)],
        "cpu": lambda: x.cpu(),
        "numpy": lambda: x.numpy(),
        "nonzero": lambda: x.nonzero(),
        "masked_select": lambda: torch.masked_select(x, mask),
        "boolean mask indexing": lambda: x[mask],
        "unique": lambda: torch.unique(x),
        "bincount": lambda: torch.bincount(torch.arange(3)),
        "where(condition)": lambda: torch.where(mask),
        "equal": lambda: torch.equal(x, x),
        "repeat_interleave": lambda: torch.repeat_interleave(torch.arange(3)),
        "tensor(host data, device=...)": lambda: torch.tensor(1.0, device=x.device),
    }
    for kind, call in syncs.items():
        with SyncDetector() as detector:
            call()
        assert [s.kind for s in detector.syncs] == [kind], kind
        assert detector.syncs[0].where.startswith(__file__), detector.syncs[0].where
    quiet = [
        lambda: torch.where(mask, x, 0.0), lambda: x[torch.tensor([0, 2])], lambda: x.sum() > 0,
        lambda: torch.tensor(1.0), lambda: x.repeat_interleave(2), lambda: x.to(torch.float64),
        lambda: torch.ones((), device=x.device),
    ]
    with SyncDetector() as detector:
        for call in quiet:
            call()
    assert detector.syncs == [], detector.report()


def module_for(case: str, optimizer: str | None = None) -> tuple[SSLModule, torch.optim.Optimizer]:
    """A tiny ViT with the objective's own optimizer recipe (fused AdamW, or LARS for CoKe)."""
    module = build(case)
    name = case.split("_")[0]
    module.optim_cfg = OmegaConf.load(OPTIMIZER_DIR / f"{optimizer or name}.yaml")
    module.train()
    if name == "coke":
        module.objectives["coke"].head.eval()  # as in test_objectives_ddp: BN on 2 rows otherwise
    optim = module.configure_optimizers()
    module.schedules = module.build_schedules(100, 10)
    return module, optim


@pytest.mark.parametrize("nan", [False, True], ids=["finite", "skipped"])
@pytest.mark.parametrize(
    "case, optimizer",
    [("dino", None), ("mae", None), ("mfm", None), ("data2vec", None), ("coke_single", None),
     ("coke_two", None), ("dino", "sgd")],
)
def test_one_optimizer_step_has_no_host_sync(case: str, optimizer: str | None, nan: bool) -> None:
    module, optim = module_for(case, optimizer)
    assert skips_on_device(optim)
    batch = global_batch(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        training_step(module, optim, batch)  # warm-up: optimizer state, schedules on the device
        if nan:
            key = "views" if "views" in batch else "plain_views"
            batch[key] = [v.clone() for v in batch[key]]
            batch[key][0][0, 0, 0, 0] = math.nan
        with SyncDetector() as detector:
            training_step(module, optim, batch)
    assert detector.syncs == [], detector.report()
    assert int(module.device_guard.skipped) == int(nan)


def dino_batch(nan: bool = False) -> dict:
    batch = next(iter(DataLoader(Crops(), batch_size=4)))
    if nan:
        batch["views"] = [v.clone() for v in batch["views"]]
        batch["views"][0][0, 0, 0, 0] = math.nan
    return batch


def snapshot(module: SSLModule, optim: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Student, teacher and every optimizer state tensor (moments, momentum buffers, step counts)."""
    state = {f"student.{k}": v for k, v in module.backbone.state_dict().items()}
    state.update({f"teacher.{k}": v for k, v in module.teacher.state_dict().items()})
    for i, p in enumerate(p for g in optim.param_groups for p in g["params"]):
        for key, value in optim.state.get(p, {}).items():
            state[f"optim.{i}.{key}"] = value
    return {k: v.detach().clone() for k, v in state.items()}


@pytest.mark.parametrize("name, state_keys", [
    ("adamw", {"exp_avg", "exp_avg_sq", "step"}), ("sgd", {"momentum_buffer"}), ("lars", {"mu"}),
])
def test_a_skipped_step_leaves_weights_optimizer_state_and_teacher_untouched(
    name: str, state_keys: set
) -> None:
    module = tiny_module()
    module.optim_cfg = OmegaConf.merge(module.optim_cfg, {"name": name})
    optim = module.configure_optimizers()
    assert skips_on_device(optim)
    for group in optim.param_groups:
        group["lr"], group["weight_decay"] = 1e-2, 0.04 if group["apply_weight_decay"] else 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        training_step(module, optim, dino_batch())
        before = snapshot(module, optim)
        assert {k.rsplit(".", 1)[1] for k in before if k.startswith("optim.")} == state_keys
        corrupt = dino_batch(nan=True)
        with SyncDetector() as detector:
            training_step(module, optim, corrupt)
        after = snapshot(module, optim)
        assert detector.syncs == [], detector.report()
        assert before.keys() == after.keys()
        for key, value in before.items():
            assert torch.equal(value, after[key]), key
        assert not hasattr(optim, "found_inf")  # set for the step only
        training_step(module, optim, dino_batch())  # a finite step moves all of them again
    moved = snapshot(module, optim)
    for prefix in ("student.", "teacher.", "optim."):
        assert any(not torch.equal(v, moved[k]) for k, v in after.items() if k.startswith(prefix)), prefix
    assert (int(module.device_guard.skipped), int(module.device_guard.consecutive)) == (1, 0)


def test_an_optimizer_that_cannot_skip_itself_falls_back_to_one_sync_per_step() -> None:
    module = tiny_module()
    groups = module.configure_optimizers().param_groups
    optim = torch.optim.AdamW([{"params": g["params"]} for g in groups], lr=1e-2, foreach=True)
    assert not skips_on_device(optim)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        training_step(module, optim, dino_batch())
        before = snapshot(module, optim)
        corrupt = dino_batch(nan=True)
        with SyncDetector() as detector:
            training_step(module, optim, corrupt)
        assert [s.kind for s in detector.syncs] == ["tolist"]  # step_is_finite
        after = snapshot(module, optim)
        assert all(torch.equal(v, after[k]) for k, v in before.items())
        assert module.guard.skipped == 1 and module.device_guard is None
        training_step(module, optim, dino_batch())
    assert not torch.equal(after["optim.0.exp_avg"], snapshot(module, optim)["optim.0.exp_avg"])


def test_lars_gated_step_is_the_plain_step_or_nothing() -> None:
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))
    twin_w, twin_b = (torch.nn.Parameter(p.detach().clone()) for p in (w, b))

    def lars(params: list) -> LARS:
        groups = [{"params": params[:1], "weight_decay": 0.01}, {"params": params[1:], "lars_exclude": True}]
        return LARS(groups, lr=0.5, momentum=0.9, trust_coefficient=0.01)

    gated, plain = lars([w, b]), lars([twin_w, twin_b])
    for step in range(3):
        grads = [torch.randn(4, 3), torch.randn(3)]
        for p, q, g in zip((w, b), (twin_w, twin_b), grads):
            p.grad, q.grad = g.clone(), g.clone()
        gated.found_inf = torch.tensor(0.0)
        gated.step()
        plain.step()
        assert torch.equal(w, twin_w) and torch.equal(b, twin_b), step  # bit for bit
    state = [t.detach().clone() for t in (w, b, gated.state[w]["mu"], gated.state[b]["mu"])]
    w.grad, b.grad = torch.full((4, 3), math.nan), torch.full((3,), math.inf)
    gated.found_inf = torch.tensor(1.0)
    gated.step()
    now = [w, b, gated.state[w]["mu"], gated.state[b]["mu"]]
    assert all(torch.equal(x, y) for x, y in zip(state, now))


def test_fused_sgd_starts_from_zero_buffers() -> None:
    """A skipped first step leaves zero (not uninitialised) buffers, and a parameter whose first
    gradient comes late (DINO's frozen last layer) steps like plain SGD."""
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
    ref_a, ref_b = (torch.nn.Parameter(p.detach().clone()) for p in (a, b))
    fused = FusedSGD([a, b], lr=0.1, momentum=0.9)
    plain = torch.optim.SGD([ref_a, ref_b], lr=0.1, momentum=0.9)
    a.grad = torch.full((5,), math.nan)
    fused.found_inf = torch.tensor(1.0)
    fused.step()
    del fused.found_inf
    assert torch.equal(fused.state[a]["momentum_buffer"], torch.zeros(5)) and torch.equal(a, ref_a)
    for grads in ([torch.ones(5), None], [torch.ones(5), torch.full((5,), 2.0)]):
        for p, q, g in zip((a, b), (ref_a, ref_b), grads):
            p.grad, q.grad = g, g
        fused.step()
        plain.step()
    assert torch.allclose(a, ref_a) and torch.allclose(b, ref_b)
    restored = FusedSGD([a, b], lr=0.1, momentum=0.9)
    restored.load_state_dict({"state": {}, "param_groups": fused.state_dict()["param_groups"]})
    assert torch.equal(restored.state[b]["momentum_buffer"], torch.zeros(5))


def test_gated_ema_moves_like_lerp_or_not_at_all() -> None:
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    student = torch.nn.ModuleDict({"backbone": body})
    teacher = EMATeacher(student, TeacherSpec(buffers="copy"))
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student["backbone"][1].running_mean.fill_(5.0)
    before = [t.clone() for t in teacher.module.state_dict().values()]
    teacher.update(student, 0.9, skip=torch.tensor(True))
    assert all(torch.equal(x, y) for x, y in zip(before, teacher.module.state_dict().values()))
    teacher.update(student, 0.9, skip=torch.tensor(False))
    for b, t, s in zip(before, teacher.module.parameters(), student.parameters()):
        assert torch.allclose(t, torch.lerp(b, s.detach(), 0.1), atol=1e-7)
    assert torch.all(teacher.module["backbone"][1].running_mean == 5.0)


class DetectFrom(pl.Callback):
    """Records host syncs from the batch of optimizer step `start` until the end of training."""

    def __init__(self, start: int) -> None:
        self.start, self.detector, self.on = start, SyncDetector(), False

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.start and not self.on:
            self.detector.__enter__()
            self.on = True

    def on_train_end(self, trainer, module) -> None:  # before the module's own end-of-training read
        if self.on:
            self.detector.__exit__(None, None, None)


def test_lightning_reads_the_device_once_every_log_every_n_steps(tmp_path: Path) -> None:
    """Under Lightning (progress bar refreshed every step included), the only syncs after the
    warm-up steps are the module's reads, one per `log_every_n_steps` steps."""
    module = tiny_module()
    watch = DetectFrom(start=2)
    trainer = pl.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
        log_every_n_steps=2, default_root_dir=tmp_path, callbacks=[watch, LazyProgressBar(refresh_rate=1)],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(Crops(), batch_size=4))
    assert trainer.global_step == 6
    # Reads after steps 1, 3 and 5: two of them in the watched steps 2-5, one copy each.
    syncs = [(s.kind, s.where.rsplit(":", 1)[0]) for s in watch.detector.syncs]
    assert syncs == [("tolist", ssl.module.__file__)] * 2, watch.detector.report()
    assert math.isfinite(module.progress_metrics["train/loss"]) and "train/lr" in module.progress_metrics
    bar = LazyProgressBar()
    assert bar.get_metrics(trainer, module)["train/loss"] == module.progress_metrics["train/loss"]


@pytest.mark.parametrize(
    "every, nan, consecutive_at_read",
    [(5, {1, 2, 3}, 0), (50, {3, 4, 5}, 3)],
    ids=["read_after_more_steps", "read_at_the_end"],
)
def test_the_limit_reached_between_reads_still_stops_the_run(
    tmp_path: Path, every: int, nan: set[int], consecutive_at_read: int
) -> None:
    """A limit of 3 reached between two reads: the run stops at the next read (after step 4, or
    at the end of training), naming the step that reached it."""
    module = tiny_module()
    module.guard.max_consecutive = 3
    inject_nan_loss(module, nan)
    with pytest.raises(NonFiniteLossError) as caught:
        fit(module, tmp_path, log_every_n_steps=every)
    message = str(caught.value)
    assert f"3 consecutive optimizer steps had a non-finite loss or gradient (the last at step {max(nan)}; " \
           "3 skipped in all)" in message
    assert "Last good checkpoint: none" in message
    assert module.guard.skipped == 3 and module.guard.longest == 3
    assert module.guard.consecutive == consecutive_at_read


def test_steps_after_the_limit_and_before_the_read_still_train(tmp_path: Path) -> None:
    module = tiny_module()
    module.guard.max_consecutive = 2
    inject_nan_loss(module, {2, 3})
    snaps = Snapshots()
    with pytest.raises(NonFiniteLossError, match=r"2 consecutive .*\(the last at step 3; 2 skipped"):
        fit(module, tmp_path, log_every_n_steps=50, callbacks=[snaps])
    for step in (2, 3):
        assert_skipped(snaps, step)
    for step in (4, 5):  # past the limit, before the read at the end: finite, applied
        assert_applied(snaps, step)
