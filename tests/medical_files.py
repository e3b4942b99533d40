"""Hospital-format test sets the tests (and benchmarks/preprocess.py) write themselves: DICOM files and NIfTI volumes
made from real brain MRI JPEGs (../shared/datasets/brain-tumor-mri) or, where absent or asked, from the project's
MRI-like phantoms (data/synthetic.phantom: learnable in a few epochs), as hospitals store them: 16-bit stored values
with a rescale (Modality LUT), some MONOCHROME1 (inverted), some RLE-compressed, patient tags set.

`FAKE_PHI` are the identifying strings a leak test looks for; nothing here is a real person.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"
FAKE_PHI = {"PatientName": "Doe^Jane-PHI-x7q", "PatientID": "PHI-ID-93817", "PatientBirthDate": "19470203",
            "AccessionNumber": "ACC-PHI-55219", "StudyDate": "20190417", "InstitutionName": "PHI-General-Hosp-4471"}


def phantoms(classes: tuple[str, ...], per_class: int, size: int, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """class -> `per_class` uint8 (size, size) phantom slices (data/synthetic.py's classes: glioma, notumor, ...)."""
    from medspark.data.synthetic import phantom

    rng = np.random.default_rng(seed)
    return {c: [np.asarray(phantom(c, rng, size), dtype=np.uint8).reshape(size, size) for _ in range(per_class)]
            for c in classes}


def brain_mri(classes: tuple[str, ...], per_class: int, size: int) -> dict[str, list[np.ndarray]] | None:
    """class -> the first `per_class` real brain MRIs of the shared set as uint8 (size, size) grey; None if absent."""
    from PIL import Image, ImageOps

    root = SHARED / "brain-tumor-mri" / "Training"
    if not root.is_dir():
        return None
    out = {}
    for c in classes:
        names = sorted(os.listdir(root / c))[:per_class]
        out[c] = [np.asarray(ImageOps.pad(Image.open(root / c / n).convert("L"), (size, size)), dtype=np.uint8)
                  for n in names]
    return out


def write_dicom(path, pixels: np.ndarray, *, patient_id: str = "", patient_name: str = "", monochrome1: bool = False,
                rle: bool = False, slope: float = 0.25, intercept: float = -1024.0, tags: dict | None = None) -> Path:
    """A CT/MR-like DICOM file of one uint8 (H, W) image (or (F, H, W): multi-frame): stored as 16-bit values v with
    v * slope + intercept = the image's grey level mapped to -1024..-960+, a VOI window over that range, MONOCHROME1
    stored inverted, RLE Lossless when `rle`. Other `tags` (keyword: value) are set as given."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

    img = np.asarray(pixels)
    frames = img.shape[0] if img.ndim == 3 else 1
    hu = img.astype(np.float64) * 4 - 1024  # grey 0..255 -> -1024..-4 (a modality value range)
    stored = np.round((hu - intercept) / slope).astype(np.uint16)  # 0..4080: 12 bits used in 16
    if monochrome1:
        stored = (4095 - stored).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage if frames == 1 else "1.2.840.10008.5.1.4.1.1.2.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CT"
    ds.PatientID, ds.PatientName = patient_id, patient_name
    ds.Rows, ds.Columns = img.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "HU"
    ds.WindowCenter, ds.WindowWidth = -514, 1020  # the stored range's full window (-1024..-4)
    if frames > 1:
        ds.NumberOfFrames = frames
    for k, v in (tags or {}).items():
        setattr(ds, k, v)
    ds.PixelData = stored.tobytes()
    if rle:
        ds.compress(RLELossless)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_nifti(path, volume: np.ndarray) -> Path:
    """A NIfTI-1 volume (.nii or .nii.gz) of uint8 (H, W, D) slices stacked on the last axis, stored as int16 with
    an identity affine (canonical orientation)."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(volume).astype(np.int16) * 8 + 100, np.eye(4)), str(path))
    return path


def images(classes: tuple[str, ...], per_class: int, size: int, real: bool = False) -> dict[str, list[np.ndarray]]:
    """Real brain MRIs when `real` and the shared set is present, else phantoms."""
    return (real and brain_mri(classes, per_class, size)) or phantoms(classes, per_class, size)


def dicom_set(root, classes=("glioma", "notumor"), per_class: int = 30, size: int = 48, per_patient: int = 3,
              real: bool = False, phi: bool = False, labels_csv: str | None = None, folder: str = "pt{:03d}") -> Path:
    """root/<class>/pt<nnn>/im<nnnnn>.dcm, `per_patient` images a patient (one study: one AccessionNumber); every
    3rd file MONOCHROME1, every 4th RLE Lossless. phi: every file carries FAKE_PHI (PatientID and AccessionNumber
    made unique per patient by a suffix) instead of neutral values. labels_csv: also write root/<labels_csv> with
    `AccessionNumber,label` per study, plus one row whose study has no file (a rejected row). folder: the patient
    folder's name, formatted with the patient's number (a PACS export names it after the patient)."""
    root = Path(root)
    rows, n = [], 0
    for c, imgs in images(classes, per_class, size, real).items():
        for i, img in enumerate(imgs):
            patient = f"{c}{i // per_patient:03d}"
            tags = dict(FAKE_PHI) if phi else {"PatientName": f"Anon^{patient}", "PatientID": "P",
                                                 "AccessionNumber": "A"}
            pid, name = f"{tags.pop('PatientID')}-{patient}", tags.pop("PatientName")
            tags["AccessionNumber"] = f"{tags['AccessionNumber']}-{c[0]}{i // per_patient}"  # VR SH: 16 characters
            if i % per_patient == 0:
                rows.append((tags["AccessionNumber"], c))
            write_dicom(root / c / folder.format(i // per_patient) / f"im{n:05d}.dcm", img, patient_id=pid,
                        patient_name=name, monochrome1=n % 3 == 1, rle=n % 4 == 2, tags=tags)
            n += 1
    if labels_csv:
        rows.append((f"{FAKE_PHI['AccessionNumber'] if phi else 'A'}-nofile", classes[0]))
        (root / labels_csv).write_text("AccessionNumber,label\n" + "".join(f"{a},{c}\n" for a, c in rows))
    return root


def nifti_set(root, classes=("glioma", "notumor"), volumes: int = 8, slices: int = 6, size: int = 48) -> Path:
    """root/<class>/vol<nnn>.nii.gz: `volumes` volumes a class, each a stack of `slices` images of that class."""
    root = Path(root)
    for c, imgs in phantoms(classes, volumes * slices, size).items():
        for v in range(volumes):
            write_nifti(root / c / f"vol{v:03d}.nii.gz", np.stack(imgs[v * slices:(v + 1) * slices], axis=-1))
    return root
