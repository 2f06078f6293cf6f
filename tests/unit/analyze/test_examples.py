"""The pictured degradations are the ones the sweep measured: same function, same seeds."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402
from test_strength_sweep import SETTINGS, class_images, knob  # noqa: E402

from ssl.analyze.examples import degraded_examples, examples_beside_curves  # noqa: E402
from ssl.analyze.strength_sweep import Reference, normaliser, sweep_reference  # noqa: E402


def noisy(images01: torch.Tensor, strength: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (images01 + strength * torch.randn(images01.shape, generator=g)).clamp(0, 1)


def test_examples_are_the_first_images_the_sweep_encoded_at_each_strength() -> None:
    images, labels = class_images(40, seed=5)
    seen: list[torch.Tensor] = []

    def encode(x: torch.Tensor) -> torch.Tensor:  # identity normalisation: x is the degraded image
        seen.append(x.clone())
        return x.flatten(1)

    bank, bank_labels = class_images(100, seed=6)
    reference = Reference("pixels", encode, bank.float().div(255).flatten(1), bank_labels)
    strengths = [0.1, 0.4]
    settings = SETTINGS.__class__(**{**SETTINGS.__dict__, "linear": False, "chunk_size": 64, "seed": 3})
    result = sweep_reference(reference, images, labels, normaliser([0.0] * 3, [1.0] * 3), knob(noisy),
                             strengths, settings)
    examples = degraded_examples(knob(noisy), strengths, images[:4], seed=3)
    assert examples.shape == (3, 4, 3, 8, 8)
    assert torch.equal(examples[0], images[:4].float() / 255)
    # The sweep encodes: clean, then per strength two independent draws; the first draw is pictured.
    assert torch.allclose(examples[1], seen[1][:4]) and torch.allclose(examples[2], seen[3][:4])
    assert not torch.allclose(examples[1], seen[2][:4])  # the second draw differs

    figure = examples_beside_curves(examples, {**result, "references": [result], "strengths": strengths,
                                               "objective": "test", "knob": "noise", "dataset": "synthetic"})
    assert len(figure.axes) == 3 * 4 + 2
