"""Command-line entry points: the only code that sees a Hydra ``DictConfig``."""
