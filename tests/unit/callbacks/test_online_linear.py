"""The online linear probe trains on detached features and leaves the backbone untouched."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from ssl.backbones.factory import build_backbone
from ssl.callbacks.online_linear import OnlineLinearProbe, first_view


class Recorder:
    """Stands in for the LightningModule: a backbone, a device, and logged values."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        self.backbone = backbone
        self.device = torch.device("cpu")
        self.logged: list[dict] = []

    def log_dict(self, values: dict, **kwargs) -> None:
        self.logged.append({k: float(v) for k, v in values.items()})


def test_probe_learns_without_touching_the_backbone() -> None:
    torch.manual_seed(0)
    backbone = build_backbone(OmegaConf.create({
        "name": "resnet18", "img_size": 28, "patch_size": 4, "drop_path_rate": None,
        "small_image_stem": None, "kwargs": {},
    })).train()
    module = Recorder(backbone)
    probe = OnlineLinearProbe(backbone.embed_dim, 2, dataset_cfg=None, test_set=None, lr=0.05)
    probe.on_fit_start(None, module)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    images = torch.randn(16, 3, 28, 28)
    images[8:] += 2.0  # two classes a linear layer can tell apart
    labels = torch.tensor([0] * 8 + [1] * 8)
    labels[0] = -1  # an unlabeled image is ignored
    for step in range(30):
        probe.on_train_batch_end(None, module, None, {"views": [images], "label": labels}, step)
    assert backbone.training  # the eval-mode forward restored the mode
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, before[key]), key  # BN running statistics included
    assert all(p.grad is None for p in backbone.parameters())
    assert module.logged[-1]["online_linear/train_top1"] == 100.0
    assert module.logged[-1]["online_linear/train_loss"] < module.logged[0]["online_linear/train_loss"]

    restored = OnlineLinearProbe(backbone.embed_dim, 2, dataset_cfg=None, test_set=None)
    restored.load_state_dict(probe.state_dict())
    assert torch.equal(restored.linear.weight, probe.linear.weight)
    assert restored.optimizer.state_dict()["state"]  # momentum buffers come back too


def test_first_view_of_any_objective() -> None:
    a, b = torch.zeros(1), torch.ones(1)
    assert first_view({"views": [a, b]}) is a and first_view({"plain_views": [b]}) is b
