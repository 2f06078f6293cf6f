"""Evaluation of a frozen backbone.

encoder.py / features.py / cache.py     what is evaluated, its features, cached on disk
knn_classifier.py, linear_probe.py,     pure classifiers on cached features; DINO's protocol
augmented_linear_probe.py, metrics.py   (augmented probe); top-k accuracy
knn.py, linear.py, clusters.py          the `python -m ssl.eval.<x>` commands, over cli.py
report.py                               JSON and wandb output
"""
