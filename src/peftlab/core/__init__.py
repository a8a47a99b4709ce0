"""Method-agnostic core: registry, configs, targets, injection, the model wrapper, state files."""
