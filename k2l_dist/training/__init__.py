"""Training stages: pseudo-label tables, extraction, Stage 1, Stage 2, checkpoints, the run driver."""
