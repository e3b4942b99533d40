"""Built-in multi-label dataset: deterministic chest radiograph phantoms in NIH ChestX-ray14's published layout.

NIH ChestX-ray14 cannot ship with the project (45 GB), yet the multi-label path (a label CSV, findings that
co-occur, a "No Finding" majority, rare findings, several images per patient, official patient-level split lists)
must run anywhere. This writes the same layout: `images_001/images/<patient:08d>_<follow-up:03d>.png` (a new
images_NNN folder every `per_folder` images), `Data_Entry_2017.csv` with the published columns, and
`train_val_list.txt` / `test_list.txt` split by patient; conf/dataset/synthetic_cxr14.yaml reads it exactly as
chest_xray14.yaml reads the real set.

A frontal radiograph phantom: torso, two dark lungs with vessel markings, mediastinum and heart, diaphragm domes
with sharp costophrenic angles, ribs, clavicles, scanner gain, gamma and noise. A patient's anatomy (sizes,
shape, vessel pattern) and chronic findings are kept across follow-ups; pose, exposure and acute findings change.
Six findings (NIH names), each with the sign a radiologist looks for, visible at 64 px, free to co-occur:
Atelectasis (a dense plate and a raised hemidiaphragm), Cardiomegaly (heart wider than half the thorax), Effusion
(fluid filling a lung base with a meniscus, blunting the costophrenic angle), Mass (a round opacity), Nodule
(a few small dots), Pneumothorax (a dark rim without markings around a collapsed lung, a pleural line). About 57%
of images have no finding; Mass is rare (~4%).

Only numpy and PIL, like data/synthetic.py, whose conventions this follows (per-image RNG, marker written last,
reuse of a complete set, atomic replacement via synthetic.publish, identical bytes for any `workers`).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .synthetic import MARKER, PNG_COMPRESS_LEVEL, _check_int, _grid, _soft, publish, run_jobs

FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Mass", "Nodule", "Pneumothorax")  # NIH's names and order
NEGATIVE = "No Finding"
GENERATOR_VERSION = 2  # bump when the pixels, the CSV or the splits change: older sets are regenerated
MIN_SIZE = 48  # below this a nodule is under a pixel
CSV_NAME = "Data_Entry_2017.csv"
LISTS = {"train": "train_val_list.txt", "test": "test_list.txt"}
# NIH's header as published: two of its columns hold a comma in their name, unquoted, so it reads as 11 fields
HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
TEST_PATIENTS = 0.2  # fraction of patients in test_list.txt (NIH: 2,797 of 30,805 patients, 23% of the images)
MAX_FOLLOW_UPS = 10
# How often findings occur. Chronic ones are a patient's (kept in most of their images), acute ones an image's.
CHRONIC = {"Cardiomegaly": 0.11, "Nodule": 0.1, "Mass": 0.042}  # P(patient has it)
KEEP_CHRONIC = 0.9  # P(a patient's chronic finding is seen on one of their images)
ACUTE = {"Effusion": 0.14, "Atelectasis": 0.11, "Pneumothorax": 0.055}  # P(image shows it), before co-occurrence
EFFUSION_IF_CARDIOMEGALY = 0.35  # heart failure: effusions come with large hearts
ATELECTASIS_IF_EFFUSION = 0.3  # fluid compresses the lung next to it
_DIR_RE, _FILE_RE = re.compile(r"^images_\d{3}$"), re.compile(r"^\d{8}_\d{3}\.png$")


@dataclass(frozen=True)
class Exam:
    """One image of the set: who, which follow-up, what it shows, and the CSV's other columns."""
    patient: int  # NIH's Patient ID: 1, 2, ...
    follow_up: int
    findings: tuple[str, ...]  # in FINDINGS order; () = No Finding
    age: int
    gender: str
    view: str
    test: bool  # the patient is in test_list.txt

    @property
    def name(self) -> str:
        return f"{self.patient:08d}_{self.follow_up:03d}.png"


# ---- patients and exams ---------------------------------------------------------------------------

def _patient_rng(seed: int, p: int) -> np.random.Generator:
    return np.random.default_rng([seed, p])


def _exam_rng(seed: int, p: int, follow_up: int) -> np.random.Generator:
    return np.random.default_rng([seed, p, follow_up, 1])


def anatomy(rng: np.random.Generator) -> dict:
    """A patient's body, kept across follow-ups (field units: [-1, 1] across the image, y down)."""
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    waves = rng.normal(0, 1, (14, 2)) * u(9, 12)  # vessel pattern: plane waves of ~1.5-2 cycles per lung width
    return {"cx": u(-0.04, 0.04), "w": u(0.76, 0.88), "top": u(-0.74, -0.62), "dia": u(0.42, 0.56),
            "medial": u(0.08, 0.12), "dome": u(0.07, 0.12), "ctr": u(0.38, 0.45), "heart_h": u(0.22, 0.28),
            "med_w": u(0.1, 0.13), "body": u(0.44, 0.52), "lung": u(0.13, 0.19), "rib_gap": u(0.12, 0.15),
            "rib_phase": u(0, 1), "waves": waves, "phases": rng.uniform(0, 2 * np.pi, 14),
            "enlarged": u(0.2, 0.26)}


def plan(patients: int, seed: int) -> list[Exam]:
    """Every image of a set of `patients` patients, in file order; patient p's exams depend on (seed, p) alone."""
    exams = []
    for p in range(1, patients + 1):
        rng = _patient_rng(seed, p)
        n = min(int(rng.geometric(0.42)), MAX_FOLLOW_UPS)
        age, gender = int(rng.integers(18, 90)), ("M", "F")[int(rng.random() < 0.45)]
        test = rng.random() < TEST_PATIENTS
        chronic = {f for f, prob in CHRONIC.items() if rng.random() < prob}
        for fu in range(n):
            erng = _exam_rng(seed, p, fu)
            keep = erng.random(len(CHRONIC))  # one draw per kind, in a fixed order (never a set's: hash-seeded)
            found = {f for f, k in zip(CHRONIC, keep) if f in chronic and k < KEEP_CHRONIC}
            draws = erng.random(4)
            if draws[0] < (EFFUSION_IF_CARDIOMEGALY if "Cardiomegaly" in found else ACUTE["Effusion"]):
                found.add("Effusion")
            if draws[1] < ACUTE["Atelectasis"] + (ATELECTASIS_IF_EFFUSION if "Effusion" in found else 0):
                found.add("Atelectasis")
            if draws[2] < ACUTE["Pneumothorax"]:
                found.add("Pneumothorax")
            view = "AP" if draws[3] < (0.6 if found else 0.25) else "PA"  # sicker patients are imaged in bed
            exams.append(Exam(p, fu, tuple(f for f in FINDINGS if f in found), age + fu // 3, gender, view, test))
    return exams


# ---- one image ------------------------------------------------------------------------------------

def radiograph(body: dict, findings, rng: np.random.Generator, size: int) -> np.ndarray:
    """One (size, size) uint8 frontal chest radiograph of `body` (see `anatomy`) showing `findings`.

    Every draw is made whatever the findings, so the same rng gives the same image with and without any
    finding, differing only where the finding is (counterfactual pairs, for tests).
    """
    unknown = set(findings) - set(FINDINGS)
    if unknown:
        raise ValueError(f"unknown finding(s) {sorted(unknown)}; valid: {', '.join(FINDINGS)}")
    size = _check_int("size", size, MIN_SIZE)
    half = size / 2.0  # pixels per field unit
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    b = body
    # Acquisition: pose, exposure, noise.
    sx, sy, scale = u(-0.04, 0.04), u(-0.04, 0.04), u(0.96, 1.04)
    gain, gamma, offset = u(0.9, 1.1), u(0.85, 1.15), u(-0.03, 0.03)
    noise = rng.standard_normal((size, size), dtype=np.float32) * u(0.012, 0.025)
    # Findings' parameters, drawn whether or not they are shown.
    side = {f: (-1.0, 1.0)[int(rng.integers(2))] for f in FINDINGS}  # -1: the image's left (patient's right)
    both_effusions = rng.random() < 0.35
    eff_height, eff_meniscus = u(0.1, 0.22), u(0.15, 0.25)
    atel_rise, atel_x, atel_y, atel_tilt, atel_len, atel_th = (u(0.07, 0.12), u(-0.25, 0.25), u(0.1, 0.3),
                                                               u(-0.3, 0.3), u(0.5, 0.75), u(0.045, 0.06))
    mass_at, mass_r, mass_level = (u(-0.4, 0.4), u(0.3, 0.65)), u(0.14, 0.19), u(0.35, 0.45)
    n_nodules = int(rng.integers(2, 6))
    nodules = [(u(-0.6, 0.6), u(0.15, 0.8), u(0.045, 0.06), u(0.3, 0.4), (-1.0, 1.0)[int(rng.integers(2))])
               for _ in range(5)][:n_nodules]
    collapse = u(0.3, 0.45)
    show = set(findings)

    gx, gy = _grid(size)
    x, y = (gx - sx) * (1 / scale), (gy - sy) * (1 / scale)  # patient frame
    cx, w = b["cx"], b["w"]
    dx = x - cx
    torso = _soft((np.abs(dx) - w * 1.1) * half, 3.0) * _soft((b["top"] - 0.35 - y) * half, 3.0)
    img = b["body"] * torso + 0.04
    # Vessel markings: bright ridges of a patient's own wave pattern, fading from the hila outwards.
    f = np.zeros((size, size), np.float32)
    for (kx, ky), ph in zip(b["waves"], b["phases"]):
        f += np.cos(kx * x + ky * y + ph).astype(np.float32)
    ridges = np.exp(-(f * (1 / (0.35 * np.sqrt(len(b["phases"]) / 2)))) ** 2)

    hh = b["heart_h"]
    ctr = b["ctr"] + (b["enlarged"] if "Cardiomegaly" in show else 0.0)
    heart = _soft((np.hypot((dx - 0.22 * ctr * w) / (ctr * w), (y - (b["dia"] - 0.8 * hh)) / hh) - 1) * hh * half, 1.5)
    heart = heart * _soft((y - b["dia"] - 0.03) * half, 2.0)  # it sits on the diaphragm
    mediastinum = _soft((np.abs(dx) - b["med_w"]) * half, 1.5) * _soft((b["top"] - 0.2 - y) * half, 2.0)
    top, ribs_y = b["top"], (y - 0.35 * np.abs(dx) ** 1.5) * (1 / b["rib_gap"]) + b["rib_phase"]
    ribs = (0.5 + 0.5 * np.cos(2 * np.pi * ribs_y)) ** 4

    for s in (-1.0, 1.0):
        lateral, medial = w * 0.93, b["medial"]
        lx, la = cx + s * 0.5 * (lateral + medial), 0.5 * (lateral - medial)
        dia = b["dia"] - (atel_rise if "Atelectasis" in show and side["Atelectasis"] == s else 0.0)
        ly = dia + 0.12
        lb = ly - top
        ex, ey = (x - lx) * (1 / la), (y - ly) * (1 / lb)
        r = np.hypot(ex, ey)
        dome = dia - b["dome"] * np.clip(1 - ex ** 2, 0, 1)
        lung = _soft((r - 1) * min(la, lb) * half, 1.2) * _soft((y - dome) * half, 1.0)
        hilum = np.hypot(x - (cx + s * (medial + 0.15)), y - (dia - 0.35))
        marks = 0.09 * np.exp(-hilum * (1 / 0.5)) + 0.02
        dense = np.zeros_like(lung)  # opacities inside this lung
        air = lung
        if "Effusion" in show and (side["Effusion"] == s or both_effusions):
            level = dia - b["dome"] - eff_height - eff_meniscus * np.clip(s * ex, 0, 1)  # rises laterally
            fluid = _soft((level - y) * half, 2.0) * _soft((r - 1.04) * min(la, lb) * half, 1.2)
            air = air * (1 - fluid)
            dense = dense + 0.06 * fluid
        if "Pneumothorax" in show and side["Pneumothorax"] == s:
            c = collapse  # the lung shrinks towards its hilum; air without vessels around it
            rc = np.hypot((x - (lx - s * c * la * 0.5)) * (1 / (la * (1 - c))),
                          (y - (ly + c * lb * 0.3)) * (1 / (lb * (1 - c * 0.6))))
            inner = _soft((rc - 1) * min(la, lb) * half, 1.0)
            rim = air * (1 - inner)
            pleura = air * np.exp(-(((rc - 1) * min(la, lb) * half) ** 2))
            marks = marks * inner * 1.3
            dense = dense - 0.09 * rim + 0.12 * pleura
        if "Atelectasis" in show and side["Atelectasis"] == s:
            ax, ay = lx + atel_x * la, dia - b["dome"] - atel_y
            t = np.cos(atel_tilt) * (x - ax) + np.sin(atel_tilt) * (y - ay)
            n = -np.sin(atel_tilt) * (x - ax) + np.cos(atel_tilt) * (y - ay)
            plate = _soft((np.abs(n) - atel_th) * half, 1.0) * _soft((np.abs(t) - atel_len * la) * half, 1.5)
            dense = dense + 0.32 * plate * lung
        if "Mass" in show and side["Mass"] == s:
            mx, my = lx + mass_at[0] * la, top + mass_at[1] * (dia - top)
            dense = dense + mass_level * _soft((np.hypot(x - mx, y - my) - mass_r) * half, 1.2) * lung
        if "Nodule" in show:
            for nx, ny, nr, level, ns in nodules:
                if ns == s:
                    mx, my = lx + nx * la, top + ny * (dia - top)
                    dense = dense + level * _soft((np.hypot(x - mx, y - my) - nr) * half, 0.8) * lung
        img = img - (b["body"] - b["lung"]) * air + air * marks * ridges + 0.06 * lung * ribs + dense

    clavicle = np.exp(-(((y - (top - 0.02 + 0.25 * np.abs(dx) ** 2)) * half / 1.2) ** 2))
    img = img + 0.1 * clavicle * _soft((np.abs(dx) - 0.7 * w) * half, 2.0) * (np.abs(dx) > 0.08)
    img = img + (0.62 - img) * mediastinum
    img = img + (0.64 - img) * heart
    img = gain * np.clip(img + offset, 0.0, None) ** gamma + noise
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ---- the dataset on disk --------------------------------------------------------------------------

def _params(patients: int, size: int, seed: int, per_folder: int, exams: list[Exam]) -> dict:
    return {"generator_version": GENERATOR_VERSION, "findings": list(FINDINGS), "patients": patients, "size": size,
            "seed": seed, "per_folder": per_folder, "files": len(exams)}


def _folder(i: int, per_folder: int) -> str:
    return f"images_{i // per_folder + 1:03d}/images"


def _is_complete(root: Path, params: dict) -> bool:
    """The marker matches these parameters and the image folders hold the expected file count."""
    try:
        if json.loads((root / MARKER).read_text()) != params:
            return False
        n = sum(1 for d in root.iterdir() if _DIR_RE.match(d.name) for _ in os.scandir(d / "images"))
        return n == params["files"] and all((root / f).is_file() for f in (CSV_NAME, *LISTS.values()))
    except (OSError, ValueError):
        return False


def _check_replaceable(root: Path) -> None:
    """Refuse to delete anything generate() did not write: root may be a user's real dataset by mistake."""
    if not root.is_dir():
        raise ValueError(f"{root} exists and is not a directory; pass a folder for the synthetic dataset")
    ours = {MARKER, CSV_NAME, *LISTS.values()}
    for entry in root.iterdir():
        if entry.name in ours and not entry.is_dir():
            continue
        inside = list(entry.iterdir()) if _DIR_RE.match(entry.name) and entry.is_dir() and not entry.is_symlink() \
            else None
        if inside is None or [p.name for p in inside] != ["images"] or \
                any(not _FILE_RE.match(f.name) for f in (entry / "images").iterdir()):
            raise ValueError(f"{root} holds {entry.name!r}, which is not part of a synthetic chest X-ray set; refusing "
                             f"to overwrite it. Pass an empty or new folder")


def _write_range(folder: Path, start: int, stop: int, patients: int, size: int, seed: int, per_folder: int) -> None:
    exams = plan(patients, seed)
    bodies = {}
    for i in range(start, stop):
        e = exams[i]
        if e.patient not in bodies:
            bodies = {e.patient: anatomy(_patient_rng(seed, e.patient))}
        arr = radiograph(bodies[e.patient], e.findings, np.random.default_rng([seed, e.patient, e.follow_up, 2]), size)
        Image.fromarray(arr).save(folder / _folder(i, per_folder) / e.name, format="PNG", optimize=False,
                                  compress_level=PNG_COMPRESS_LEVEL)


def _write(folder: Path, patients: int, size: int, seed: int, per_folder: int, workers: int, exams: list[Exam]) -> None:
    for i in range(0, len(exams), per_folder):
        (folder / _folder(i, per_folder)).mkdir(parents=True)
    step = min(250, -(-len(exams) // workers))  # each worker gets some
    jobs = [(folder, a, min(a + step, len(exams)), patients, size, seed, per_folder)
            for a in range(0, len(exams), step)]
    run_jobs(_write_range, jobs, workers)
    spacing = round(0.143 * 1024 / size, 4)  # NIH: 0.143 mm at 1024 px
    rows = [f"{e.name},{'|'.join(e.findings) or NEGATIVE},{e.follow_up},{e.patient},{e.age},{e.gender},{e.view},"
            f"{size},{size},{spacing},{spacing}" for e in exams]
    (folder / CSV_NAME).write_text("\n".join([HEADER, *rows]) + "\n")
    for split, name in LISTS.items():
        (folder / name).write_text("".join(f"{e.name}\n" for e in exams if e.test == (split == "test")))


def generate(root: str | os.PathLike, patients: int = 700, size: int = 64, seed: int = 0, per_folder: int = 1000,
             workers: int = 1) -> Path:
    """Write the set of `patients` patients to root in NIH's layout (see the module's docstring); return Path(root).

    Patient p's images are drawn from RNGs seeded by (seed, p) alone: the same arguments give byte-identical
    files, and more patients only append images. A complete set for the same parameters (marker file written
    last) is reused as is; otherwise the set is built beside root and renamed into place, replacing root only
    if it holds nothing but an older synthetic chest X-ray set. workers > 1 draws in that many processes.
    """
    patients = _check_int("patients", patients, 1)
    size = _check_int("size", size, MIN_SIZE)
    seed = _check_int("seed", seed, 0)
    per_folder = _check_int("per_folder", per_folder, 1)
    root = Path(os.path.expanduser(os.fspath(root)))
    target = Path(os.path.abspath(root))
    exams = plan(patients, seed)
    params = _params(patients, size, seed, per_folder, exams)
    if _is_complete(target, params):
        return root
    if target.exists():
        _check_replaceable(target)

    def write(folder: Path) -> None:
        _write(folder, patients, size, seed, per_folder, workers, exams)

    publish(target, params, write, _is_complete)
    return root
