"""Reconstruction grids: one PNG per masked-modeling objective, original / input / output rows."""

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from synthetic import Squares

from ssl.backbones.factory import build_backbone
from ssl.callbacks.reconstructions import ReconstructionGrid, can_reconstruct
from ssl.module import SSLModule
from ssl.objectives import recipe_settings
from ssl.objectives.dino import DINO
from ssl.objectives.mae import MAE
from ssl.objectives.mfm import MFM

DATASET = OmegaConf.create({"image_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3})
OPTIM = OmegaConf.load("conf/optimizer/mae.yaml")




def test_grids_for_mae_and_mfm(tmp_path) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(OmegaConf.create({
        "name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "drop_path_rate": None,
        "kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2}}))
    objectives = {
        "mae": MAE(backbone, **recipe_settings(
            "mae", image_size=16, decoder_dim=16, decoder_depth=1, decoder_heads=2,
        )),
        "mfm": MFM(backbone, **recipe_settings("mfm", image_size=16, mean=DATASET.mean, std=DATASET.std)),
    }
    module = SSLModule(backbone, objectives, {"mae": 1.0, "mfm": 1.0}, OPTIM, batch_size=4)
    module.train()
    callback = ReconstructionGrid(Squares(), DATASET, tmp_path / "rec", num_images=5)
    paths = callback.write(module, epoch=3, step=10)
    assert [p.name for p in paths] == ["mae_epoch003.png", "mfm_epoch003.png"]
    for path in paths:
        picture = Image.open(path)
        # 5 columns and 3 rows of 16 px images enlarged x6 to 96 px, with 2 px padding.
        assert picture.size == (5 * 96 + 6 * 2, 3 * 96 + 4 * 2)
        rows = torch.from_numpy(np.array(picture)).float()
        first, second = rows[2:98], rows[100:196]
        assert not torch.equal(first, second)  # the masked input differs from the original
    assert module.training  # train mode restored


def test_dino_has_nothing_to_reconstruct() -> None:
    assert not can_reconstruct(DINO(8, **recipe_settings("dino", out_dim=16, hidden_dim=8, bottleneck_dim=4)))
