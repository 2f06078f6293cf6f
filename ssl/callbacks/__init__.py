"""Lightning callbacks, one per file: online k-NN and linear monitors, reconstruction grids,
attention maps, skipped-image counts, RNG states in checkpoints, a sync-free progress bar."""
