"""Evaluation of a backbone: frozen (k-NN, linear probe) or fine-tuned, on all or few labels.

encoder.py / features.py / cache.py     what is evaluated, its features, cached on disk
knn_classifier.py, linear_probe.py,     pure classifiers on cached features; DINO's protocol
augmented_linear_probe.py, metrics.py   (augmented probe); top-k accuracy
knn.py, linear.py, clusters.py          the `python -m ssl.eval.<x>` commands, over cli.py
report.py                               JSON and wandb output
labelled.py                             the seeded labelled subset of train (labelled_fraction, ...)
finetune.py, layer_decay.py             full fine-tuning (MAE / BEiT recipe) and its lr groups
label_efficiency.py                     k-NN / linear / fine-tune at 1 %, 10 %, 100 % labels: one table
"""
