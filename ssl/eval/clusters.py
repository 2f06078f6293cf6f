"""CoKe's cluster sizes from a checkpoint: is any cluster dominating, is any starved?

`python -m ssl.eval.clusters checkpoint=<run>/checkpoints/last.ckpt`

Reads each clustering head's label memory (the latest assignment of every image) and prints,
per head, the smallest and largest cluster next to the lower bound ratio x N / K that the duals
enforce, and a histogram of cluster sizes in multiples of the average size.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import torch

# Histogram bins, in multiples of the average cluster size.
SIZE_BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, float("inf"))


def cluster_size_report(labels: torch.Tensor, num_clusters: int, ratio: float = 0.4) -> dict[str, Any]:
    """Sizes of the clusters in a label memory column (-1 = never assigned, ignored)."""
    labels = labels.long().flatten()
    assigned = labels[labels >= 0]
    sizes = torch.bincount(assigned, minlength=num_clusters).float()
    average = assigned.numel() / num_clusters
    relative = sizes / max(average, 1e-12)
    edges = torch.tensor(SIZE_BINS)
    counts = [int(((relative >= lo) & (relative < hi)).sum()) for lo, hi in zip(edges[:-1], edges[1:])]
    return {
        "num_clusters": num_clusters,
        "images": int(assigned.numel()),
        "min_size": int(sizes.min()),
        "max_size": int(sizes.max()),
        "average_size": average,
        "lower_bound": ratio * average,
        "below_lower_bound": int((sizes < ratio * average).sum()),
        "empty": int((sizes == 0).sum()),
        "histogram": dict(zip(bin_labels(), counts)),
    }


def bin_labels() -> list[str]:
    return [f"[{lo:g}, {hi:g})x avg" for lo, hi in zip(SIZE_BINS[:-1], SIZE_BINS[1:])]


def checkpoint_reports(path: str) -> list[dict[str, Any]]:
    """One report per clustering head of the `coke` objective in a Lightning checkpoint."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    config = (ckpt.get("hyper_parameters") or {}).get("config") or {}
    ratio = float(config.get("objective", {}).get("coke", {}).get("ratio", 0.4))
    pattern = re.compile(r"objectives\.coke\.clusterings\.(\d+)\.labels$")
    heads = sorted(int(m.group(1)) for key in state if (m := pattern.search(key)))
    if not heads:
        raise ValueError(f"{path} holds no CoKe label memory (objectives.coke.clusterings.<j>.labels)")
    reports = []
    for j in heads:
        prefix = f"objectives.coke.clusterings.{j}."
        num_clusters = state[prefix + "pre_centers"].shape[0]
        reports.append(cluster_size_report(state[prefix + "labels"][:, 0], num_clusters, ratio))
    return reports


def main(argv: list[str] | None = None) -> None:
    args = dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv) if "=" in a)
    if "checkpoint" not in args:
        print("usage: python -m ssl.eval.clusters checkpoint=<path to a CoKe checkpoint>", file=sys.stderr)
        sys.exit(2)
    for j, r in enumerate(checkpoint_reports(args["checkpoint"])):
        print(f"head {j}: K={r['num_clusters']} over {r['images']} images: min {r['min_size']}, "
              f"max {r['max_size']}, average {r['average_size']:.1f}, lower bound {r['lower_bound']:.1f} "
              f"({r['below_lower_bound']} clusters below it, {r['empty']} empty)")
        for label, count in r["histogram"].items():
            print(f"    {label:>18}: {count:5d} {'#' * min(count, 60)}")


if __name__ == "__main__":
    main()
