"""Analyses of what pretraining's degradations do to images.

degradations.py    each objective's training degradations as functions of one strength
measures.py        what survives, on features: label information and view consistency (pure)
strength_sweep.py  one reference encoder x one degradation x a grid of strengths
report.py          JSON, markdown and the PNG; wandb
degradation.py     `python -m ssl.analyze.degradation` (Hydra: objective=, dataset=, checkpoint=)
"""
