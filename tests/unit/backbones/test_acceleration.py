"""`backbone.compile` and `backbone.channels_last`: same numbers, no per-step recompilation."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import REPO_ROOT
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ssl.benchmark import synthetic_batch
from ssl.module import SSLModule
from ssl.pretrain import build_module


def module_for(*overrides: str) -> SSLModule:
    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "run_dir=unused"])
    torch.manual_seed(0)
    return build_module(cfg, num_samples=100)


def losses(module: SSLModule, steps: int) -> list[float]:
    """`steps` training steps (forward, backward, AdamW, EMA) on one fixed synthetic batch."""
    module.train()
    optimizer = module.configure_optimizers()
    module.schedules = module.build_schedules(100, 10)
    torch.manual_seed(1)
    batch = synthetic_batch(OmegaConf.create(module.hparams["config"]), module, torch.device("cpu"))
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        for _ in range(steps):
            loss = module.training_step(batch, 0)
            loss.backward()
            module.on_before_optimizer_step(optimizer)
            module.optimizer_step(0, 0, optimizer, None)
            optimizer.zero_grad(set_to_none=True)
            out.append(float(loss.detach()))
    return out


def test_channels_last_resnet_gives_the_same_features_and_teacher() -> None:
    plain = module_for("objective=dino", "backbone=resnet18", "objective.dino.out_dim=64",
                       "objective.dino.local_crops=2", "backbone.channels_last=false")
    fast = module_for("objective=dino", "backbone=resnet18", "objective.dino.out_dim=64",
                      "objective.dino.local_crops=2", "backbone.channels_last=true")
    conv = fast.backbone.model.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert fast.teacher["backbone"].channels_last  # the teacher's copy converts its inputs too
    images = torch.randn(3, 3, 28, 28)
    plain.eval(), fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast.backbone(images), plain.backbone(images), rtol=1e-4, atol=1e-5)
    assert not module_for("objective=dino", "backbone=vit_t").backbone.__dict__.get("channels_last")


@pytest.mark.slow
def test_compiled_vit_matches_eager_and_compiles_once_per_crop_size() -> None:
    """DINO's 2 crop sizes (student) + the teacher's no-grad pass: a fixed set of graphs after the
    first step, then none more however many steps follow."""
    import torch._dynamo

    settings = ["experiment=quickstart", "backbone.kwargs.depth=1", "objective.dino.out_dim=64",
                "objective.dino.local_crops=2", "data.batch_size=4", "backbone.drop_path_rate=0"]
    eager = losses(module_for(*settings), 4)
    torch._dynamo.reset()
    compiled_module = module_for(*settings, "backbone.compile=true")
    first = losses(compiled_module, 1)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames > 0  # something was compiled
    rest = losses(compiled_module, 3)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # no recompilation
    # Same state dict keys as without compile: checkpoints and exports do not change.
    assert set(compiled_module.state_dict()) == set(module_for(*settings).state_dict())
    torch.testing.assert_close(torch.tensor(first + rest), torch.tensor(eager), rtol=1e-4, atol=1e-4)
