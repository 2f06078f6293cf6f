"""2-D embeddings of backbone features (t-SNE) and the figures the notebooks save.

scikit-learn and matplotlib are development dependencies (`pip install -e ".[dev]"`), imported
inside the functions so that training never needs them. Figures are built without pyplot
(`matplotlib.figure.Figure`, Agg canvas), so nothing needs a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def tsne_2d(
    features: torch.Tensor, seed: int = 0, perplexity: float = 30.0, threads: int | None = 1
) -> np.ndarray:
    """[N, 2] t-SNE of L2-normalised features (the cosine geometry k-NN uses), reproducible by seed.

    One thread by default: a few thousand points take seconds, while OpenMP's spinning workers next
    to torch's own pool on a busy machine made the same call 10-40x slower. None: all cores.
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = F.normalize(features.float(), dim=1).cpu().numpy()
    perplexity = min(float(perplexity), max(1.0, (len(x) - 1) / 3))  # TSNE needs perplexity < N
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    with threadpool_limits(limits=threads):
        return tsne.fit_transform(x)


def plot_embedding(
    points: np.ndarray, labels: Sequence[int] | torch.Tensor, class_names: Sequence[str] | None = None,
    title: str = "", ax: Any = None,
) -> Any:
    """Scatter of 2-D points coloured by label, with a legend of class names; returns the Figure."""
    import matplotlib
    from matplotlib.figure import Figure

    if ax is None:
        ax = Figure(figsize=(8.5, 6), layout="constrained").add_subplot()
    labels = np.asarray(labels)
    colours = matplotlib.colormaps["tab10" if labels.max(initial=0) < 10 else "tab20"]
    for label in np.unique(labels):
        chosen = labels == label
        known = class_names is not None and 0 <= label < len(class_names)
        name = class_names[label] if known else str(label)
        colour = colours(int(label) % colours.N)
        ax.scatter(points[chosen, 0], points[chosen, 1], s=6, color=colour, label=name)
    ax.legend(markerscale=3, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    return ax.figure


def picture_figure(
    picture: Image.Image, row_labels: Sequence[str] = (), title: str = "", width: float = 8.0
) -> Any:
    """A matplotlib Figure showing a grid picture, each row named on the left (for saving as PNG)."""
    from matplotlib.figure import Figure

    array = np.asarray(picture)
    height = width * array.shape[0] / array.shape[1]
    # Margins in inches, laid out by hand so that row labels and title are never clipped.
    left, top, pad = (1.4 if row_labels else 0.1), 0.4, 0.1
    fig_w, fig_h = left + width + pad, height + top + pad
    fig = Figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes((left / fig_w, pad / fig_h, width / fig_w, height / fig_h))
    ax.imshow(array, interpolation="nearest")
    ax.set_xticks([])
    rows = len(row_labels)
    if rows:
        step = array.shape[0] / rows
        ax.set_yticks([step * (i + 0.5) for i in range(rows)], list(row_labels))
    else:
        ax.set_yticks([])
    ax.set_title(title)
    return fig
