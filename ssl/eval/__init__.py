"""Evaluation: feature extraction, k-NN and (later) linear probes."""
