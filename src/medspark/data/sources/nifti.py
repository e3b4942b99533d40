"""NIfTI volumes (dataset=nifti): `.nii` / `.nii.gz` under class folders, or named by a CSV `volume,label[,patient]`.

One label per volume. The layouts are class_folders.ClassFolders' (root/<class>/**/<volume>, patients from
`patient_pattern` over file names) and label_csv.LabelCsv's (the CSV names each volume relative to root; its
patient column becomes a pseudonym at once): this source only keeps the NIfTI files of their listings; any other
file under root is `ignored` with the reason. The executors cut each volume into 2D slices
(data/preprocess.decode_frames: axis, which slices, intensity window from `preprocess`), one row per slice with the
slice index in `frame`; the volume's content hash decides its split, so all its slices (and all volumes of a
patient) are in one split.
"""
from __future__ import annotations

from . import Listing
from .class_folders import ClassFolders
from .label_csv import LabelCsv

EXTENSIONS = (".nii", ".nii.gz")


def is_nifti(path: str) -> bool:
    return path.lower().endswith(EXTENSIONS)


class Nifti:
    """NIfTI volumes under `root` (conf/dataset/nifti.yaml documents every key)."""
    has_test_split = False

    def __init__(self, root, classes: list[str] | None = None, csv: str | None = None, volume_column: str = "volume",
                 label_column: str = "label", patient_column: str | None = None, patient_pattern: str | None = None):
        self.root, self.classes, self.csv = root, classes, csv or None
        self.volume_column, self.label_column, self.patient_column = volume_column, label_column, patient_column
        self.patient_pattern = patient_pattern

    def list(self) -> Listing:
        if self.csv:
            base = LabelCsv(self.root, self.csv, self.volume_column, self.label_column,
                            findings=self.classes, patient_column=self.patient_column).list()
        else:
            base = ClassFolders(self.root, self.classes, self.patient_pattern).list()
        keep = [r for r in base.records if is_nifti(r.path)]
        other = [(r.path, "not a NIfTI volume (.nii, .nii.gz)") for r in base.records if not is_nifti(r.path)]
        return Listing(keep, base.classes, base.has_test_split, base.ignored + other, base.task, base.rejected)
