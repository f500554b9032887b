"""The framework's spine: running a task (train / eval / predict) from a composed Hydra config."""
