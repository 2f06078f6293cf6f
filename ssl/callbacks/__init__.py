"""Lightning callbacks, one per file: online k-NN and linear monitors, reconstruction grids,
attention maps, skipped-image counts, RNG states in checkpoints, a sync-free progress bar, the run's
plan and measured ETA, Ctrl-C that stops at a step boundary with a checkpoint."""
