"""Linear probes on cached frozen features: a whole (lr, weight decay) grid trained at once.

dinov2's fast path. Features are extracted once; the K configs of the grid are slices of one
weight tensor [K, D, C], so each mini-batch costs one batched matmul for all of them and a sweep
costs little more than a single probe. The config with the best top-1 on a held-out part of the
train split is chosen, retrained on the whole train split, and scored on the test split.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ssl.eval.metrics import topk_accuracy

DEFAULT_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
DEFAULT_WEIGHT_DECAYS = (0.0, 1e-4)


@dataclass(frozen=True)
class Standardizer:
    """(x - mean) / std with the statistics of the features a probe is fit on.

    This is a non-affine BatchNorm1d evaluated with the exact statistics of the whole fit set
    rather than running estimates, so every config of the grid sees the same inputs. Features
    that are constant on the fit set (the black border of raw pixels) keep scale 1 instead of
    being divided by ~0, which would blow up any test image that differs there.
    """

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, features: torch.Tensor) -> Standardizer:
        mean = features.mean(0)
        std = features.std(0, correction=0)
        std = torch.where(std > 1e-6 * std.max(), std, torch.ones_like(std))
        return cls(mean, std)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return (features.float() - self.mean) / self.std


@dataclass
class LinearClassifiers:
    """K linear classifiers over the same standardised features: weight [K, D, C], bias [K, C]."""

    weight: torch.Tensor
    bias: torch.Tensor
    scaler: Standardizer

    @torch.no_grad()
    def logits(self, features: torch.Tensor, chunk_size: int = 8192) -> torch.Tensor:
        """Logits [K, N, C], standardising `features` a chunk at a time to bound memory."""
        chunks = [
            torch.einsum("nd,kdc->knc", self.scaler(features[start : start + chunk_size]), self.weight)
            for start in range(0, features.shape[0], chunk_size)
        ]
        return torch.cat(chunks, dim=1) + self.bias[:, None]


def fit_linear_classifiers(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    epochs: int = 50,
    batch_size: int = 256,
    momentum: float = 0.9,
    seed: int = 0,
) -> LinearClassifiers:
    """One classifier per pair (lrs[k], weight_decays[k]), all trained on the same batches.

    SGD with momentum (torch.optim.SGD's update, written out so the lr and weight decay can be
    per-config tensors) and a cosine lr schedule per step down to 0. Weights start at zero: the
    problem is convex, and a config then starts in the batch exactly where it starts alone. The
    loss is each config's batch-mean cross-entropy summed over configs, so each config receives
    exactly its own gradient. Weight decay applies to weights, not biases.
    """
    if len(lrs) != len(weight_decays):
        raise ValueError(f"{len(lrs)} learning rates but {len(weight_decays)} weight decays")
    n, dim = features.shape
    k, device = len(lrs), features.device
    scaler = Standardizer.fit(features.float())
    weight = torch.zeros(k, dim, num_classes, device=device, requires_grad=True)
    bias = torch.zeros(k, num_classes, device=device, requires_grad=True)
    weight_buf, bias_buf = torch.zeros_like(weight), torch.zeros_like(bias)
    lr = torch.tensor(list(lrs), dtype=torch.float32, device=device)
    wd = torch.tensor(list(weight_decays), dtype=torch.float32, device=device)[:, None, None]
    generator = torch.Generator().manual_seed(seed)
    total_steps = epochs * math.ceil(n / batch_size)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            x, y = scaler(features[rows]), labels[rows]
            logits = torch.einsum("bd,kdc->kcb", x, weight) + bias[:, :, None]
            loss = F.cross_entropy(logits, y.expand(k, -1), reduction="sum") / len(rows)
            weight_grad, bias_grad = torch.autograd.grad(loss, (weight, bias))
            step_lr = lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
            with torch.no_grad():
                weight_buf.mul_(momentum).add_(weight_grad + wd * weight)
                bias_buf.mul_(momentum).add_(bias_grad)
                weight.sub_(step_lr[:, None, None] * weight_buf)
                bias.sub_(step_lr[:, None] * bias_buf)
            step += 1
    return LinearClassifiers(weight.detach(), bias.detach(), scaler)


def top1_per_config(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy (%) of each of the K configs from logits [K, N, C]."""
    return 100.0 * (logits.argmax(dim=-1) == labels).float().mean(dim=1)


def split_train_val(n: int, val_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (fit, val): a random `val_fraction` of n rows, fixed by `seed`, held out."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_val:].sort().values, order[:n_val].sort().values


@dataclass
class ProbeResult:
    """Test accuracy of the chosen config, the choice, and the validation top-1 of every config."""

    top1: float
    top5: float
    lr: float
    weight_decay: float
    val_top1: float
    train_size: int
    val_size: int
    test_size: int
    retrained: bool
    grid: list[dict[str, float]] = field(default_factory=list)
    variant: str = "features"
    variants: dict[str, float] = field(default_factory=dict)  # best val top-1 of each variant

    def to_dict(self) -> dict:
        return asdict(self)


def linear_probe_variants(
    variants: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    train_labels: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int | None = None,
    lrs: Sequence[float] = DEFAULT_LRS,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    epochs: int = 50,
    batch_size: int = 256,
    val_fraction: float = 0.1,
    momentum: float = 0.9,
    retrain: bool = True,
    seed: int = 0,
) -> ProbeResult:
    """Sweep feature variants x lrs x weight_decays on one held-out split; test the best config.

    `variants` maps a name ("cls", "cls+avgpool", "last4", ...) to its (train, test) features.
    Every variant's grid is trained at once on the same fit rows and batches; the (variant, lr,
    weight decay) with the best validation top-1 is chosen, retrained on the whole train split
    when `retrain`, and scored on the test split. Deterministic given `seed`.
    """
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    grid = list(itertools.product(lrs, weight_decays))
    grid_lrs, grid_wds = [lr for lr, _ in grid], [wd for _, wd in grid]
    device = next(iter(variants.values()))[0].device
    fit_rows, val_rows = split_train_val(len(train_labels), val_fraction, seed)
    fit_rows, val_rows = fit_rows.to(device), val_rows.to(device)
    train_kwargs = {"epochs": epochs, "batch_size": batch_size, "momentum": momentum, "seed": seed}
    sweeps: dict[str, tuple[LinearClassifiers, torch.Tensor]] = {}
    for name, (train_x, _) in variants.items():
        swept = fit_linear_classifiers(
            train_x[fit_rows], train_labels[fit_rows], num_classes, grid_lrs, grid_wds, **train_kwargs
        )
        sweeps[name] = (swept, top1_per_config(swept.logits(train_x[val_rows]), train_labels[val_rows]))
    variant = max(sweeps, key=lambda n: float(sweeps[n][1].max()))  # ties: the first listed variant
    swept, val_top1 = sweeps[variant]
    best = int(val_top1.argmax())
    lr, wd = grid[best]
    train_x, test_x = variants[variant]
    if retrain:
        chosen = fit_linear_classifiers(train_x, train_labels, num_classes, [lr], [wd], **train_kwargs)
        test_logits = chosen.logits(test_x)[0]
    else:
        test_logits = swept.logits(test_x)[best]
    accuracy = topk_accuracy(test_logits, test_labels)
    return ProbeResult(
        top1=accuracy["top1"],
        top5=accuracy["top5"],
        lr=lr,
        weight_decay=wd,
        val_top1=float(val_top1[best]),
        train_size=len(train_labels),
        val_size=len(val_rows),
        test_size=len(test_labels),
        retrained=retrain,
        grid=[
            {"variant": name, "lr": g_lr, "weight_decay": g_wd, "val_top1": float(acc)}
            for name, (_, accs) in sweeps.items()
            for (g_lr, g_wd), acc in zip(grid, accs)
        ],
        variant=variant,
        variants={name: float(accs.max()) for name, (_, accs) in sweeps.items()},
    )


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    **options: Any,
) -> ProbeResult:
    """Sweep lrs x weight_decays on a held-out split, then score the best config on the test split.

    One feature matrix; `options` as for `linear_probe_variants` (lrs, weight_decays, epochs,
    batch_size, val_fraction, momentum, retrain, seed). With `retrain` the chosen config is trained
    again on the whole train split (the held-out rows included) before testing.
    """
    variants = {"features": (train_features, test_features)}
    return linear_probe_variants(variants, train_labels, test_labels, **options)
