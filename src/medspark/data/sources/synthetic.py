"""The built-in phantom set as a source: generated into class folders (once per parameters), then read as such."""
from __future__ import annotations

from .class_folders import ClassFolders


class Synthetic(ClassFolders):
    """`generate` (per_class, size, seed) are medspark.data.synthetic.generate's arguments; root is where the set
    is written (conf/dataset/synthetic.yaml keys it by them, so each parameter set has its own folder)."""

    def __init__(self, root, generate: dict, classes: list[str] | None = None, patient_pattern: str | None = None):
        super().__init__(root, classes, patient_pattern)
        self.generate = generate

    def list(self):
        from .. import synthetic

        g = self.generate
        synthetic.generate(self.root, per_class=int(g["per_class"]), size=int(g["size"]), seed=int(g["seed"]))
        return super().list()
