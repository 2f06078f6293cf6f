"""Composite objectives (issue 10): several objectives, weighted, on one backbone; one EMA teacher per
distinct teacher setting (issue 23: objective=[dino,data2vec] keeps both methods' teachers)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import FASHION_MNIST_DIR, REPO_ROOT, pretrain_in_process, pretrain_refusal
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from ssl.backbones.factory import build_backbone
from ssl.composite import (
    HeadOptim,
    drop_unselected_objective_settings,
    head_optim_settings,
    objective_weights,
    resolve_optimizer_recipe,
)
from ssl.config import CONFIG_DIR, objective_names
from ssl.data.frequency import FrequencyMasker
from ssl.module import SSLModule
from ssl.objectives import OBJECTIVES, recipe_settings
from ssl.objectives.base import StepContext
from ssl.objectives.data2vec import Data2Vec
from ssl.objectives.dino import DINO
from ssl.objectives.forward_cache import ForwardCache
from ssl.objectives.mfm import MFM
from ssl.teacher import TeacherGroup, TeacherSpec, separate_teachers_note

MEAN, STD = [0.286] * 3, [0.353] * 3
OPTIM = OmegaConf.load(Path(CONFIG_DIR) / "optimizer" / "dino.yaml")
SIZE, LOCAL = 16, 8


def composed(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


# ----------------------------------------------------------------------------- configuration
def test_a_list_of_objectives_composes_with_weights_and_the_first_recipe() -> None:
    cfg = composed("objective=[dino,mfm]", "objective.mfm.weight=0.5", "optimizer.lr=1e-3")
    assert list(cfg.objective) == ["dino", "mfm"]
    assert objective_weights(cfg.objective) == {"dino": 1.0, "mfm": 0.5}
    assert cfg.optimizer.from_objective == "first"
    resolve_optimizer_recipe(cfg, CONFIG_DIR)
    assert cfg.optimizer.recipe_of == "dino" and "from_objective" not in cfg.optimizer
    assert list(cfg.optimizer.betas) == [0.9, 0.999] and cfg.optimizer.weight_decay_end == 0.4
    assert cfg.optimizer.lr == 1e-3  # a key set on the command line overrides the recipe
    assert objective_names(cfg.objective) == "dino+mfm"


def test_the_recipe_follows_the_order_or_the_named_objective() -> None:
    cfg = composed("objective=[mfm,dino]")
    resolve_optimizer_recipe(cfg, CONFIG_DIR)
    assert cfg.optimizer.recipe_of == "mfm" and list(cfg.optimizer.betas) == [0.9, 0.95]
    cfg = composed("objective=[dino,mfm]", "optimizer.from_objective=mfm")
    resolve_optimizer_recipe(cfg, CONFIG_DIR)
    assert cfg.optimizer.recipe_of == "mfm"
    cfg = composed("objective=[dino,mfm]", "optimizer=mae")  # an explicit recipe is kept as it is
    resolve_optimizer_recipe(cfg, CONFIG_DIR)
    assert cfg.optimizer.clip_mode == "none" and "recipe_of" not in cfg.optimizer
    cfg = composed("objective=dino")  # one objective: its own recipe, as before
    assert cfg.optimizer.name == "adamw" and "from_objective" not in cfg.optimizer


def test_the_preset_composes() -> None:
    cfg = composed("experiment=quickstart_dino_mfm")
    assert list(cfg.objective) == ["dino", "mfm"]
    assert head_optim_settings(cfg.objective) == {"dino": HeadOptim(), "mfm": HeadOptim(1.0, 0.05)}
    resolve_optimizer_recipe(cfg, CONFIG_DIR)
    assert cfg.optimizer.recipe_of == "dino" and cfg.optimizer.lr == 2e-3


def test_a_presets_settings_for_another_objective_are_dropped_with_a_note() -> None:
    """experiment=quickstart writes objective.dino.*; objective=mae on the command line trains MAE
    only, so the partial dino node goes (it made the run fail with 'objective.dino is missing ...')."""
    cfg = composed("experiment=quickstart", "objective=mae")
    assert set(cfg.objective) == {"mae", "dino"} and "hidden_dim" not in cfg.objective.dino
    notes = drop_unselected_objective_settings(cfg, OBJECTIVES)
    assert list(cfg.objective) == ["mae"]
    assert len(notes) == 1 and notes[0].startswith("objective.dino (freeze_last_layer, local_crops")
    assert "not among the objectives trained (mae)" in notes[0]
    # the objective the preset is for, and combinations that include it, keep every node
    for overrides in (["experiment=quickstart"], ["experiment=quickstart", "objective=[dino,supervised]"]):
        cfg = composed(*overrides)
        before = OmegaConf.to_container(cfg.objective)
        assert drop_unselected_objective_settings(cfg, OBJECTIVES) == []
        assert OmegaConf.to_container(cfg.objective) == before


@pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="needs apt-get install dataset-fashion-mnist")
def test_a_dino_preset_trains_another_objective_and_says_what_it_ignored(tmp_path: Path) -> None:
    quiet = ["trainer.max_steps=1", "knn.enabled=false", "export.enabled=false",
             "attention_maps.enabled=false", "reconstructions.enabled=false", "data.batch_size=8",
             "data.num_workers=0", "trainer.enable_progress_bar=false"]
    status, stderr = pretrain_in_process(["experiment=quickstart", "objective=mae", *quiet], tmp_path / "r")
    assert status == 0, stderr[-3000:]
    assert "ssl.pretrain: objective.dino (" in stderr and "ignored" in stderr
    assert "dino" not in OmegaConf.load(tmp_path / "r" / "config.yaml").objective


def test_with_no_complete_objective_nothing_is_dropped() -> None:
    """Only partial nodes: building the objectives reports the missing settings, as before."""
    cfg = OmegaConf.create({"objective": {"dino": {"out_dim": 8}}})
    assert drop_unselected_objective_settings(cfg, OBJECTIVES) == []
    assert list(cfg.objective) == ["dino"]


def test_the_separate_teachers_note_names_the_settings_and_how_to_share() -> None:
    groups = [TeacherGroup(TeacherSpec(0.996), ("a", "c")), TeacherGroup(TeacherSpec(0.99), ("b",))]
    message = separate_teachers_note(groups)
    assert "teacher.momentum: a=0.996, b=0.99" in message and "1 more backbone copy" in message
    assert "objective.b.teacher.momentum=0.996" in message and "export use a's" in message
    fixed = separate_teachers_note([TeacherGroup(TeacherSpec(), ("a",)),
                                    TeacherGroup(TeacherSpec(train_mode=False), ("b",))])
    assert "teacher.train_mode: a=True, b=False" in fixed and "To share one" not in fixed


# ----------------------------------------------------------------------------- tiny models
def tiny_backbone():
    torch.manual_seed(0)
    return build_backbone(OmegaConf.create({
        "name": "vit_tiny_patch16_224", "img_size": SIZE, "patch_size": 4, "drop_path_rate": 0.0,
        "kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2}}))


def tiny_dino(backbone) -> DINO:
    return DINO(backbone.embed_dim, **recipe_settings(
        "dino", out_dim=64, hidden_dim=32, bottleneck_dim=16, local_crops=1, freeze_last_layer=0,
    ))


def tiny_pair(mfm_weight: float = 0.5, head_optim: dict | None = None) -> SSLModule:
    backbone = tiny_backbone()
    objectives = {"dino": tiny_dino(backbone), "mfm": MFM(backbone, **recipe_settings(
        "mfm", image_size=SIZE, mean=MEAN, std=STD, radius=1.0,
    ))}
    return SSLModule(backbone, objectives, {"dino": 1.0, "mfm": mfm_weight}, OPTIM, batch_size=4,
                     head_optim=head_optim)


def sample(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    keep = FrequencyMasker(SIZE, 1.0, 0.5, key="mfm_keep")(1, g)["mfm_keep"][0]
    return {
        "views": [torch.randn(3, SIZE, SIZE, generator=g), torch.randn(3, SIZE, SIZE, generator=g),
                  torch.randn(3, LOCAL, LOCAL, generator=g)],
        "plain_views": [torch.randn(3, SIZE, SIZE, generator=g)],
        "mfm_keep": keep, "label": 0, "index": i,
    }


def batch_of(n: int = 4) -> dict:
    return torch.utils.data.default_collate([sample(i) for i in range(n)])


class Samples(Dataset):
    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> dict:
        return sample(i)


# ----------------------------------------------------------------------------- the combined loss
def test_combined_loss_and_gradients_are_the_weighted_sum_of_the_separate_ones() -> None:
    pair = tiny_pair(mfm_weight=0.5)
    alone = {
        name: SSLModule(copy.deepcopy(pair.backbone), {name: copy.deepcopy(pair.objectives[name])},
                        {name: 1.0}, OPTIM, batch_size=4)
        for name in ("dino", "mfm")
    }
    batch = batch_of()
    total = pair.training_step(batch, 0)
    total.backward()
    separate = {}
    for name, module in alone.items():
        separate[name] = module.training_step(batch, 0)
        separate[name].backward()
    assert total.item() == pytest.approx(separate["dino"].item() + 0.5 * separate["mfm"].item(), rel=1e-6)
    grads = {name: dict(m.backbone.named_parameters()) for name, m in alone.items()}
    for name, param in pair.backbone.named_parameters():
        expected = grads["dino"][name].grad + 0.5 * grads["mfm"][name].grad
        torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-7)
    # Each objective's state moves as it does alone: DINO's centre, from the same teacher logits.
    torch.testing.assert_close(pair.objectives["dino"].center, alone["dino"].objectives["dino"].center)


# ----------------------------------------------------------------------------- forward passes
def count_passes(module: SSLModule, batch: dict) -> tuple[int, int]:
    """Backbone passes (patch embeddings run) of the student and of the teacher in one step."""
    counts = {"student": 0, "teacher": 0}
    hooks = [
        module.backbone.model.patch_embed.register_forward_hook(
            lambda *_: counts.__setitem__("student", counts["student"] + 1)),
        module.teacher.module["backbone"].model.patch_embed.register_forward_hook(
            lambda *_: counts.__setitem__("teacher", counts["teacher"] + 1)),
    ]
    module.training_step(batch, 0)
    for hook in hooks:
        hook.remove()
    return counts["student"], counts["teacher"]


def test_dino_and_mfm_run_one_pass_per_distinct_view() -> None:
    """Globals + locals (one pass per resolution) and MFM's filtered crop; the teacher once."""
    assert count_passes(tiny_pair(), batch_of()) == (3, 1)


def test_objectives_encoding_the_same_crops_share_the_passes(monkeypatch) -> None:
    """Two DINO heads on the same crops: the student and teacher passes run once, not twice."""
    backbone = tiny_backbone()
    second = tiny_dino(backbone)
    second.name = "dino2"  # its head in the teacher is found under this name
    module = SSLModule(backbone, {"dino": tiny_dino(backbone), "dino2": second},
                       {"dino": 1.0, "dino2": 1.0}, OPTIM, batch_size=4)
    batch = batch_of()
    assert count_passes(module, batch) == (2, 1)
    monkeypatch.setattr(ForwardCache, "get_or_compute", lambda self, net, inputs, mode, compute: compute())
    assert count_passes(module, batch) == (4, 2)  # without the cache


def test_the_cache_tells_grad_modes_and_inputs_apart() -> None:
    cache, net = ForwardCache(), object()
    x, y = torch.ones(1), torch.ones(1)
    assert cache.get_or_compute(net, [x], "m", lambda: 1) == 1
    assert cache.get_or_compute(net, [x], "m", lambda: 2) == 1 and cache.hits == 1
    assert cache.get_or_compute(net, [y], "m", lambda: 3) == 3  # equal values, another tensor
    with torch.no_grad():
        assert cache.get_or_compute(net, [x], "m", lambda: 4) == 4
    assert StepContext().forwards is not StepContext().forwards  # one cache per step


def test_a_different_momentum_alone_gets_its_own_teacher_with_its_own_head() -> None:
    backbone = tiny_backbone()
    other = tiny_dino(backbone)
    other.name = "dino2"
    other._teacher = TeacherSpec(0.9)
    module = SSLModule(backbone, {"dino": tiny_dino(backbone), "dino2": other}, {}, OPTIM, batch_size=4)
    assert set(module.teacher.module) == {"backbone", "dino"}
    assert set(module.teachers) == {"dino2"} and set(module.teachers["dino2"].module) == {"backbone", "dino2"}
    schedules = module.build_schedules(total_steps=10, steps_per_epoch=10)
    assert schedules["momentum"][0] == pytest.approx(0.996) and schedules["momentum"][-1] > 0.996
    assert schedules["momentum/dino2"][0] == pytest.approx(0.9)  # cosine 0.9 -> 1, its own curve
    assert schedules["momentum/dino2"][5] == pytest.approx(0.95)


# ----------------------------------------------------------------------------- optimiser, state, resume
def fit(module: SSLModule, root: Path, epochs: int, ckpt: Path | None = None) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root, log_every_n_steps=1,
        callbacks=[pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True)],
    )
    trainer.fit(module, DataLoader(Samples(), batch_size=4), ckpt_path=ckpt)
    return trainer


def test_state_and_per_objective_optimiser_groups_survive_resume(tmp_path: Path) -> None:
    settings = {"mfm": HeadOptim(lr_scale=0.5, weight_decay=0.05)}
    module = tiny_pair(head_optim=settings)
    trainer = fit(module, tmp_path, epochs=1)
    groups = trainer.optimizers[0].param_groups
    backbone = next(g for g in groups if "objective" not in g and g["apply_weight_decay"])
    dino = next(g for g in groups if g.get("objective") == "dino" and g["apply_weight_decay"])
    mfm = next(g for g in groups if g.get("objective") == "mfm" and g["apply_weight_decay"])
    assert mfm["fixed_weight_decay"] and mfm["params"][0].ndim > 1
    assert mfm["lr"] == pytest.approx(0.5 * backbone["lr"]) and backbone["lr"] > 0
    last_step_wd = float(module.schedules["weight_decay"][trainer.global_step - 1])
    assert mfm["weight_decay"] == 0.05 and backbone["weight_decay"] == pytest.approx(last_step_wd)
    assert dino["lr"] == pytest.approx(backbone["lr"]) and dino["weight_decay"] == backbone["weight_decay"]

    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    center = state["objectives.dino.center"]
    assert center.abs().sum() > 0  # DINO's centre moved; it lives under its objective's name
    assert any(k.startswith("objectives.mfm.head.") for k in state)
    assert any(k.startswith("teacher.module.dino.") for k in state)  # the teacher mirrors DINO's head
    assert not any(k.startswith("teacher.module.mfm") for k in state)  # ... not MFM's
    mfm_head = {k: v for k, v in state.items() if k.startswith("objectives.mfm.head.")}

    restored = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, module) -> None:
            restored["center"] = module.objectives["dino"].center.clone()
            restored["mfm"] = {f"objectives.mfm.{k}": v.clone()
                               for k, v in module.objectives["mfm"].state_dict().items()}
            restored["groups"] = [(g.get("objective"), g.get("lr_scale"), g["weight_decay"])
                                  for g in trainer.optimizers[0].param_groups]

    resumed = tiny_pair(head_optim=settings)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path / "resumed", callbacks=[Probe()])
    trainer.fit(resumed, DataLoader(Samples(), batch_size=4), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    torch.testing.assert_close(restored["center"], center)
    for key, value in mfm_head.items():
        torch.testing.assert_close(restored["mfm"][key], value)
    assert ("mfm", 0.5, 0.05) in restored["groups"]
    assert trainer.global_step == 6


# ----------------------------------------------------------------------------- one teacher per setting
def tiny_dino_data2vec() -> SSLModule:
    """DINO (cosine 0.996 -> 1, train mode, buffers kept) + data2vec (constant 0.9998, eval, copied)."""
    backbone = tiny_backbone()
    objectives = {"dino": tiny_dino(backbone),
                  "data2vec": Data2Vec(backbone, **recipe_settings("data2vec", image_size=SIZE, top_k=1))}
    return SSLModule(backbone, objectives, {"dino": 1.0, "data2vec": 1.0}, OPTIM, batch_size=4)


def masked_loader(module: SSLModule) -> DataLoader:
    """`Samples` batches plus the objectives' masks, as the data module's collate step adds them."""
    maskers = [m for objective in module.objectives.values() for m in objective.batch_maskers()]

    def collate(samples: list[dict]) -> dict:
        batch = torch.utils.data.default_collate(samples)
        for masker in maskers:
            batch.update(masker(len(samples), torch.Generator().manual_seed(int(batch["index"][0]))))
        return batch

    return DataLoader(Samples(), batch_size=4, collate_fn=collate)


def params_of(teacher: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in teacher.module.parameters()]


class TeacherProbe(pl.Callback):
    """Both teachers and the parts they mirror before and after every step; what each loss received."""

    def __init__(self, module: SSLModule) -> None:
        self.before: dict[int, dict] = {}
        self.after: dict[int, dict] = {}
        self.seen: dict[str, list[tuple[int, bool, bool]]] = {"dino": [], "data2vec": []}
        for name, objective in module.objectives.items():
            original = objective.loss

            def loss(batch, backbone, teacher, ctx, name=name, original=original):
                modes = [m.training for m in teacher.modules()]
                self.seen[name].append((id(teacher), all(modes), any(modes)))
                out = original(batch, backbone, teacher, ctx)
                if name == "data2vec" and ctx.step == 1:  # a non-finite step: every teacher stays put
                    out.loss = out.loss * float("nan")
                return out

            objective.loss = loss

    @staticmethod
    def take(module: SSLModule) -> dict:
        def student(key: str) -> list[torch.Tensor]:
            return [p.detach().clone() for p in module.mirrored_by_teacher(key).parameters()]

        teachers = module.ema_teachers().items()
        return {key: {"teacher": params_of(t), "student": student(key)} for key, t in teachers}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.before[trainer.global_step] = self.take(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.after[trainer.global_step - 1] = self.take(module)


def train_dino_data2vec(root: Path) -> tuple[SSLModule, TeacherProbe]:
    module = tiny_dino_data2vec()
    with torch.no_grad():  # teachers away from the student (and apart): the EMA is visible at lr 0
        for i, teacher in enumerate(module.ema_teachers().values()):
            for p in teacher.module.parameters():
                p.add_(torch.randn_like(p), alpha=0.1 * (i + 1))
    probe = TeacherProbe(module)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=root, callbacks=[probe])
    trainer.fit(module, masked_loader(module))
    assert trainer.global_step == 3
    return module, probe


def test_dino_and_data2vec_each_keep_their_own_teacher(tmp_path: Path) -> None:
    module, probe = train_dino_data2vec(tmp_path)
    dino, d2v = module.teacher, module.teachers["data2vec"]
    assert module.ema_teachers() == {"dino": dino, "data2vec": d2v}
    assert dino.spec == module.objectives["dino"].teacher_spec()
    assert d2v.spec == module.objectives["data2vec"].teacher_spec()
    assert set(dino.module) == {"backbone", "dino"} and set(d2v.module) == {"backbone"}
    assert module.eval_backbone("teacher") is dino["backbone"]  # evaluation: the first objective's
    # Each teacher's own schedule: DINO's cosine starts at 0.996, data2vec's constant 0.9998.
    momenta = {"dino": module.schedules["momentum"], "data2vec": module.schedules["momentum/data2vec"]}
    assert momenta["dino"][0] == pytest.approx(0.996) and momenta["dino"][2] > momenta["dino"][1] > 0.996
    assert list(momenta["data2vec"]) == pytest.approx([0.9998] * 3)
    for step in (0, 2):
        for key, m in ((k, float(v[step])) for k, v in momenta.items()):
            before, after = probe.before[step][key], probe.after[step][key]
            for old, new, student in zip(before["teacher"], after["teacher"], after["student"]):
                torch.testing.assert_close(new, m * old + (1 - m) * student, rtol=0, atol=1e-6)
            assert any(not torch.equal(o, n) for o, n in zip(before["teacher"], after["teacher"]))
    for key in momenta:  # step 1 was non-finite: the gate kept both teachers put
        for old, new in zip(probe.before[1][key]["teacher"], probe.after[1][key]["teacher"]):
            assert torch.equal(old, new)
    # Each loss got its own teacher: DINO's in train mode (as the student), data2vec's in eval mode.
    assert probe.seen["dino"] == [(id(dino.module), True, True)] * 3
    assert probe.seen["data2vec"] == [(id(d2v.module), False, False)] * 3


def test_both_teachers_log_their_momentum_and_survive_a_state_dict_round_trip(tmp_path: Path) -> None:
    module = tiny_dino_data2vec()
    module.schedules = module.build_schedules(total_steps=4, steps_per_epoch=4)
    logged = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    module.train()
    module.training_step(masked_loader(module).__iter__().__next__(), 0)
    assert logged["train/teacher_momentum"] == pytest.approx(0.996)
    assert logged["train/teacher_momentum/data2vec"] == pytest.approx(0.9998)
    with torch.no_grad():
        for i, teacher in enumerate(module.ema_teachers().values()):
            for p in teacher.parameters():
                p.fill_(i + 1.0)
    state = module.state_dict()
    assert any(k.startswith("teacher.module.dino.") for k in state)
    assert any(k.startswith("teachers.data2vec.module.backbone.") for k in state)
    assert not any(k.startswith("teachers.data2vec.module.dino") for k in state)
    torch.save(state, tmp_path / "state.pt")
    fresh = tiny_dino_data2vec()
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))  # strict
    assert all((p == 1.0).all() for p in fresh.teacher.parameters())
    assert all((p == 2.0).all() for p in fresh.teachers["data2vec"].parameters())


def test_equal_teacher_settings_keep_one_teacher_and_its_keys() -> None:
    module = tiny_pair()
    assert len(module.teachers) == 0 and module.ema_teachers() == {"dino": module.teacher}
    mirrored = torch.nn.ModuleDict({"backbone": module.backbone, "dino": module.objectives["dino"].head})
    teacher_keys = {k for k in module.state_dict() if k.startswith("teacher")}
    assert teacher_keys == {f"teacher.module.{k}" for k in mirrored.state_dict()}
    assert set(module.build_schedules(10, 10)) == {"lr", "weight_decay", "momentum"}


def test_fsdp_shards_the_blocks_of_every_teacher(monkeypatch) -> None:
    module = tiny_dino_data2vec()
    sharded: list[torch.nn.Module] = []
    monkeypatch.setattr("ssl.module.shard_modules", lambda blocks, mesh, root: sharded.extend(blocks))
    module._device_mesh = object()
    module.configure_model()
    head = module.objectives["dino"].head
    expected = [module.backbone.model.blocks[0], head.mlp, head.last_layer,
                module.teacher["backbone"].model.blocks[0], module.teacher["dino"].mlp,
                module.teacher["dino"].last_layer, module.teachers["data2vec"]["backbone"].model.blocks[0]]
    assert [id(b) for b in sharded] == [id(b) for b in expected]


# ----------------------------------------------------------------------------- command line
needs_data = pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="needs dataset-fashion-mnist")


def pretrain(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ssl.pretrain", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


@needs_data
def test_a_bad_combination_exits_2_before_training(tmp_path: Path) -> None:
    overrides = ["objective=[dino,mfm]", "optimizer.from_objective=mae", "backbone=vit_t",
                 "knn.enabled=false"]
    status, stderr = pretrain_refusal(overrides, tmp_path / "r")
    assert status == 2, stderr[-3000:]
    assert "optimizer.from_objective=mae is not one of" in stderr
    assert not (tmp_path / "r" / "config.yaml").exists()


@needs_data
@pytest.mark.slow
def test_dino_with_data2vec_trains_with_two_teachers_and_logs_each_objective(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out = pretrain(
        "objective=[dino,data2vec]", "backbone=vit_t", "+backbone.kwargs.depth=1", "dataset.patch_size=7",
        "dataset.local_crop_size=14", "objective.dino.out_dim=64", "objective.dino.hidden_dim=32",
        "objective.dino.bottleneck_dim=16", "objective.dino.local_crops=1", "data.batch_size=16",
        "data.num_workers=0", "trainer.limit_train_batches=2", "trainer.max_epochs=1",
        "trainer.log_every_n_steps=1", "knn.enabled=false", "trainer.enable_model_summary=false",
        "reconstructions.enabled=false", "attention_maps.enabled=false", f"hydra.run.dir={run_dir}",
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "each keeps its own EMA teacher" in out.stderr
    header = (run_dir / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    for name in ("train/dino/loss", "train/data2vec/loss", "train/teacher_momentum",
                 "train/teacher_momentum/data2vec"):
        assert name in header, name
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    assert any(k.startswith("teachers.data2vec.module.backbone.") for k in state)
    assert (run_dir / "backbone.safetensors").exists()  # exported: the first (DINO) teacher


@needs_data
@pytest.mark.slow
def test_the_dino_mfm_preset_trains_and_logs_each_objective(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out = pretrain(
        "experiment=quickstart_dino_mfm", "backbone.kwargs.depth=1", "objective.dino.out_dim=128",
        "objective.dino.hidden_dim=64", "objective.dino.local_crops=2", "data.batch_size=16",
        "data.num_workers=0", "trainer.limit_train_batches=3", "trainer.log_every_n_steps=1",
        "knn.max_train_samples=200", "knn.max_test_samples=100", "trainer.enable_model_summary=false",
        f"hydra.run.dir={run_dir}", timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    header = (run_dir / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    for name in ("train/loss", "train/dino/loss", "train/mfm/loss", "train/dino/teacher_entropy",
                 "train/mfm/lowpass_fraction"):
        assert name in header, name
    recorded = OmegaConf.load(run_dir / "config.yaml")
    assert recorded.optimizer.recipe_of == "dino" and recorded.objective.mfm.weight_decay == 0.05
    assert "top-1" in out.stdout
