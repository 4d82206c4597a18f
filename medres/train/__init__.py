"""Training: pipeline spec, transforms, data loading, the engine, checkpoints and the run."""
