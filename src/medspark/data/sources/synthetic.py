"""The built-in generated sets as sources: the phantoms (class folders) and the chest X-ray phantoms (NIH layout)."""
from __future__ import annotations

import inspect

from .class_folders import ClassFolders
from .label_csv import LabelCsv


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


class SyntheticCxr(LabelCsv):
    """`generate` (patients, size, seed) are medspark.data.synthetic_cxr.generate's arguments; root is where the
    set is written in NIH ChestX-ray14's layout, then read through the label CSV like the real set (the other
    keys: LabelCsv's, from conf/dataset/chest_xray14.yaml)."""

    def __init__(self, root, generate: dict, **label_csv):
        super().__init__(root, **label_csv)
        self.generate = generate

    def list(self):
        from .. import synthetic_cxr

        g = self.generate
        synthetic_cxr.generate(self.root, patients=int(g["patients"]), size=int(g["size"]), seed=int(g["seed"]))
        return super().list()


def _settings(cls, base):
    """cls's keys and base's (but root): what `sources.source` checks a dataset option's keys against."""
    own = list(inspect.signature(cls.__init__).parameters.values())[1:-1]
    return inspect.Signature(own + list(inspect.signature(base).parameters.values())[1:])


SyntheticCxr.__signature__ = _settings(SyntheticCxr, LabelCsv)
