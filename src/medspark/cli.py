"""The `medspark` command: training (Hydra overrides) by default."""
from __future__ import annotations


def main() -> None:
    from .train import main as train_main

    train_main()
