"""Analyses of what pretraining's degradations do to images.

degradations.py    each objective's training degradations as functions of one strength
measures.py        what survives, on features: label information and view consistency (pure)
strength_sweep.py  one reference encoder x one degradation x a grid of strengths
report.py          JSON, markdown and the PNG; wandb
examples.py        a few degraded images per strength, beside the curves
degradation.py     `python -m ssl.analyze.degradation` (Hydra: objective=, dataset=, checkpoint=)
merge.py           `python -m ssl.analyze.merge`: analyses of one sweep, references side by side
training_curve.py  `python -m ssl.analyze.training_curve`: what a Hydra multirun grid learned per strength
"""
