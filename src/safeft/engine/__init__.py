"""The training engine: a run (config, model, data, output), the Trainer, the reference."""
