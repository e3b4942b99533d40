"""Built-in dataset: deterministic MRI-like axial brain phantoms in the class-folder layout.

Real brain-tumour sets cannot ship with the project, yet every path (ingestion, Spark preprocessing,
Petastorm, training, benchmarks) must run anywhere. These phantoms mimic what separates the four
classes of the Kaggle brain-tumour MRI set (a lesion's shape, texture and *where* it sits) under the
nuisances of real scans (head pose and size, intensity scaling, tissue texture, noise), so a small CNN
learns them in a few epochs while global statistics such as mean intensity do not give them away.
Written as PNG files, they go through exactly the same ingestion code as real data.

Only numpy and PIL: this runs inside Spark executors and in benchmarks that generate 50,000 images.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")  # same names as the real Kaggle brain-tumour set
MARKER = "_SYNTHETIC_COMPLETE.json"  # written last: its presence means the set in root is whole
GENERATOR_VERSION = 1  # bump when the pixels change, so sets made by older code are regenerated
MIN_SIZE = 32  # below this the pituitary lesion is under two pixels wide
PNG_COMPRESS_LEVEL = 1  # zlib level: ~3x faster than the default 6, files ~10% larger
# Scan appearance, on a 0..1 intensity scale.
TISSUE_LEVEL = (0.30, 0.38)  # gray matter; white matter is 0.05-0.08 brighter
SKULL_LEVEL = (0.85, 1.0)  # the brightest structure, so no lesion can pass for skull
SKULL_PX = (2.5, 4.0)  # skull ring thickness at 128 px (scaled with size)
TEXTURE = (0.03, 0.012)  # amplitude of low- and mid-frequency tissue texture
GAIN = (0.95, 1.05)  # scanner gain left after windowing (exported MRIs are scaled to their full range)
GAMMA = (0.92, 1.08)  # display windowing
NOISE_SD = (0.01, 0.03)  # Rician noise sigma

# Lesion appearance. Sizes are fractions of the brain's semi-major axis; levels are intensities on the
# tissue's 0..1 scale (tissue ~0.3-0.45, skull ~0.85): bright enough to see, never a saturated disc.
GLIOMA_RADIUS = (0.18, 0.26)  # lobulated, intra-axial
GLIOMA_CONTRAST = (0.28, 0.38)  # rim brightness above the tissue
GLIOMA_NECROSIS = (0.5, 1.0)  # how dark the core gets: 1 = below the surrounding tissue
MENINGIOMA_RADIUS = (0.2, 0.28)  # round, dural-based
PITUITARY_RADIUS = (0.11, 0.14)  # small, at the skull base
MASS_LEVEL = (0.78, 0.9)  # meningioma and pituitary: homogeneous, enhancing like the skull, not saturated
_FILE_RE = re.compile(r"^(%s)_\d{5,}\.png$" % "|".join(CLASSES))  # names generate() writes


# ---- cached per-size geometry ---------------------------------------------------------------------

@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in field units: [-1, 1] across the image, y pointing down (inferior)."""
    c = ((np.arange(size) + 0.5) * (2.0 / size) - 1.0).astype(np.float32)
    return c[None, :], c[:, None]


@lru_cache(maxsize=8)
def _basis(size: int, k: int) -> np.ndarray:
    """(size, k) Gaussian RBF basis with unit-norm rows: B @ N @ B.T of iid N(0,1) is smooth, unit-variance noise.

    Two small matmuls instead of filtering a full-size noise image: ~10x faster, no scipy.
    """
    x = (np.arange(size) + 0.5) / size
    centres = (np.arange(k) + 0.5) / k
    b = np.exp(-0.5 * ((x[:, None] - centres[None, :]) * k / 1.2) ** 2)
    return (b / np.linalg.norm(b, axis=1, keepdims=True)).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, k: int) -> np.ndarray:
    b = _basis(size, k)
    return b @ rng.standard_normal((k, k), dtype=np.float32) @ b.T


def _soft(d, edge: float):
    """Anti-aliased indicator of d < 0 (d a signed distance in pixels); the edge width stands in for blur."""
    return np.clip(0.5 - d * (1.0 / edge), 0.0, 1.0)


# ---- one image ------------------------------------------------------------------------------------

def phantom(cls: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One (size, size) uint8 grayscale axial-slice phantom of class `cls`.

    All randomness comes from `rng`, so a per-image generator makes each image reproducible on its own.
    The lesion is drawn last: the same rng state gives the same scan for every class, differing only
    where the lesion is (counterfactual pairs, for tests and saliency checks).
    Geometry is in field units ([-1, 1] across the image); distances are converted to pixels for edges.
    """
    if cls not in CLASSES:
        raise ValueError(f"unknown class {cls!r}; valid classes: {', '.join(CLASSES)}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise ValueError(f"size={size!r} must be an integer >= {MIN_SIZE}")
    size = int(size)
    half = size / 2.0  # pixels per field unit
    k = size / 128  # widths below are given in pixels at 128 px
    uni = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731  (python floats keep arrays float32)
    gx, gy = _grid(size)

    # Head pose: offset, size, aspect (axial heads are longer front-to-back), small tilt.
    cx, cy = uni(-0.06, 0.06), uni(-0.06, 0.06)
    b_out = uni(0.75, 0.95)
    a_out = b_out * uni(0.76, 0.86)
    th = uni(-0.15, 0.15)
    cos, sin = float(np.cos(th)), float(np.sin(th))
    dx, dy = gx - cx, gy - cy
    u, v = cos * dx + sin * dy, cos * dy - sin * dx  # head frame: u left-right, v anterior(-) to posterior(+)
    mean_px = 0.5 * (a_out + b_out) * half
    d = (np.hypot(u * (1 / a_out), v * (1 / b_out)) - 1.0) * mean_px  # ~ signed px distance to the head edge
    edge = uni(1.0, 1.8) * k  # edge width in px: the scanner's point-spread
    skull, csf = uni(*SKULL_PX) * k, uni(1.0, 2.0) * k  # skull ring and the dark CSF gap inside it, px
    shrink = 1.0 - (skull + csf) / mean_px
    a_b, b_b = a_out * shrink, b_out * shrink  # brain ellipse
    brain = _soft(d + (skull + csf), edge)
    ring = _soft(d, edge) - _soft(d + skull, edge)
    scalp = _soft(d - uni(1.0, 3.0) * k, edge)  # thin dim soft tissue outside the skull

    # Tissue: darker cortical ribbon with a wavy (gyral) inner border around brighter white matter
    # (T1-like), low- and mid-frequency texture, a faint interhemispheric fissure.
    low, mid = _smooth_noise(rng, size, 6), _smooth_noise(rng, size, 20)
    cortex = uni(0.10, 0.16) * mean_px * (1.0 + 0.5 * mid)  # ribbon width, px
    wm = _soft(d + (skull + csf) + cortex, 2.0 * edge)
    img = 0.12 * scalp + brain * (uni(*TISSUE_LEVEL) + uni(0.05, 0.08) * wm + TEXTURE[0] * low + TEXTURE[1] * mid)
    img += ring * (uni(*SKULL_LEVEL) - img)
    bu, bv = u * (1 / a_b), v * (1 / b_b)  # brain-normalised coordinates: the brain is the unit disc
    fissure = _soft(np.abs(u) * half - 0.5 * k, edge) * _soft((0.5 - np.abs(bv)) * b_b * half, 3.0 * k) * brain
    img -= fissure * uni(0.3, 0.6) * (img - 0.12)

    # Lateral ventricles: two dark tilted ellipses, frontal horns diverging anteriorly (a butterfly).
    vx, vy, va, vb, vt = uni(0.09, 0.15), uni(-0.12, 0.0), uni(0.05, 0.09), uni(0.18, 0.27), uni(0.2, 0.4)
    vent = None
    for side in (-1.0, 1.0):
        c, s = float(np.cos(side * vt)), float(np.sin(side * vt))
        pu, pv = bu - side * vx, bv - vy
        rr = np.hypot((c * pu + s * pv) * (1 / va), (c * pv - s * pu) * (1 / vb))
        one = _soft((rr - 1.0) * (va * a_b * half), edge)
        vent = one if vent is None else np.maximum(vent, one)
    img += vent * (uni(0.10, 0.16) - img)

    # Acquisition draws come before the lesion's, so phantom(c, default_rng(k)) and
    # phantom("notumor", default_rng(k)) are the same scan with and without the lesion.
    gain, gamma = uni(*GAIN), uni(*GAMMA)  # scanner gain and display windowing
    n = rng.standard_normal((2, size, size), dtype=np.float32) * uni(*NOISE_SD)
    if cls != "notumor":
        _lesion(cls, rng, uni, img, u, v, (cx, cy, cos, sin), a_b, b_b, brain, edge, size)
    img = gain * np.clip(img, 0.0, None) ** gamma
    img = np.sqrt((img + n[0]) ** 2 + n[1] ** 2)  # Rician: magnitude of complex Gaussian noise
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _window(pose, lu, lv, ext_px, size):
    """Slices of the image around head-frame point (lu, lv), ext_px pixels each side: lesions are local."""
    cx, cy, cos, sin = pose
    half = size / 2.0
    col = (cx + cos * lu - sin * lv + 1.0) * half
    row = (cy + sin * lu + cos * lv + 1.0) * half
    r = int(np.ceil(ext_px)) + 2
    return slice(max(int(row) - r, 0), max(int(row) + r + 1, 0)), slice(max(int(col) - r, 0), max(int(col) + r + 1, 0))


def _lesion(cls, rng, uni, img, u, v, pose, a_b, b_b, brain, edge, size):
    """Add the class's lesion in place: its shape, texture and location are what tell the classes apart."""
    half = size / 2.0
    if cls == "glioma":
        # Intra-axial, infiltrative: lobulated blob well inside the parenchyma with an irregular bright
        # rim around a darker necrotic core (heterogeneous), surrounded by slightly dark oedema.
        rho, phi = uni(0.2, 0.5), uni(0, 2 * np.pi)
        lu, lv = rho * np.cos(phi) * a_b, rho * np.sin(phi) * b_b
        rad = uni(*GLIOMA_RADIUS) * b_b
        w = _window(pose, lu, lv, 3.0 * rad * half, size)  # oedema reaches ~2.4 rad
        uw, vw = u[w] - lu, v[w] - lv
        field = 0
        for _ in range(int(rng.integers(3, 6))):
            ou, ov = rng.normal(0, 0.45 * rad, 2)
            sg = rad * uni(0.45, 0.7)
            field = field + np.exp(((uw - ou) ** 2 + (vw - ov) ** 2) * (-0.5 / (sg * sg)))
        field = field * (1 + 0.25 * _smooth_noise(rng, size, 24)[w])  # ragged margin
        body = np.clip((field - 0.5) * 10, 0.0, 1.0)
        oedema = np.clip((field - 0.12) * 5, 0.0, 1.0) - body
        core = np.clip((field * (1 / field.max()) - 0.7) * 6, 0.0, 1.0) * uni(*GLIOMA_NECROSIS)
        delta = uni(*GLIOMA_CONTRAST)
        img[w] += brain[w] * (delta * body - (delta + 0.1) * core - uni(0.05, 0.09) * oedema)
        return
    if cls == "meningioma":
        # Extra-axial, dural-based: round, sharp, homogeneous mass pressed against the inner skull.
        phi = uni(0, 2 * np.pi)
        rad = uni(*MENINGIOMA_RADIUS) * b_b
        eu, ev = a_b * np.cos(phi), b_b * np.sin(phi)  # point on the brain edge
        nu, nv = eu / a_b ** 2, ev / b_b ** 2  # outward normal there
        inset = rad * uni(0.35, 0.65) / np.hypot(nu, nv)
        lu, lv = eu - inset * nu, ev - inset * nv
        level = uni(*MASS_LEVEL)
    else:
        # Pituitary: small bright round lesion at the skull base, midline, always about the same place.
        lu, lv = uni(-0.04, 0.04) * a_b, uni(0.62, 0.72) * b_b
        rad = uni(*PITUITARY_RADIUS) * b_b
        level = uni(*MASS_LEVEL)
    cleft = uni(1.0, 2.0) * size / 128  # dark rim of CSF / capsule where the mass meets the brain, px
    w = _window(pose, lu, lv, rad * half + cleft, size)
    dist = (np.hypot(u[w] - lu, v[w] - lv) - rad) * half  # px outside the mass's edge
    mass = _soft(dist, edge) * brain[w]
    rim = (_soft(dist - cleft, edge) * brain[w] - mass) * uni(0.3, 0.6)
    img[w] += rim * (0.12 - img[w]) + mass * (level - img[w])



LESION_DELTA = 6  # gray levels (of 255): a pixel belongs to the lesion where the pair differs by more (noise-free)


def lesion_mask(cls: str, index: int, size: int, seed: int = 0) -> np.ndarray:
    """bool (size, size): where image `index` of class `cls` that generate(..., size, seed) writes shows its lesion
    (all False for notumor). The image and the same scan without the lesion come from the same per-image rng
    (generate seeds image i of class c with [seed, c, i]; the lesion is drawn last), so the lesion is where the two
    differ: mass, rim, glioma oedema and necrosis included."""
    if cls not in CLASSES:
        raise ValueError(f"unknown class {cls!r}; valid classes: {', '.join(CLASSES)}")
    rng_seed = [_check_int("seed", seed, 0), CLASSES.index(cls), _check_int("index", index, 0)]
    with_lesion = phantom(cls, np.random.default_rng(rng_seed), size).astype(np.int16)
    without = phantom("notumor", np.random.default_rng(rng_seed), size).astype(np.int16)
    return np.abs(with_lesion - without) > LESION_DELTA


def generated_file(path: str | os.PathLike) -> tuple[str, int, int, int] | None:
    """(class, index, size, seed) of a file generate() wrote (its name, and the set's marker file beside its class
    folder), or None for any other file: what lesion_mask needs to know where that file's lesion is."""
    path = Path(path)
    if not _FILE_RE.match(path.name) or path.parent.name != path.name.rsplit("_", 1)[0]:
        return None
    try:
        params = json.loads((path.parent.parent / MARKER).read_text())
        size, seed = int(params["size"]), int(params["seed"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return path.parent.name, int(path.stem.rsplit("_", 1)[1]), size, seed

# ---- the dataset on disk --------------------------------------------------------------------------

def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")
    return int(value)


def _params(per_class: int, size: int, seed: int) -> dict:
    return {"generator_version": GENERATOR_VERSION, "classes": list(CLASSES), "per_class": per_class,
            "size": size, "seed": seed, "files": per_class * len(CLASSES)}


def _is_complete(root: Path, params: dict) -> bool:
    """The marker matches these parameters and every class folder holds the expected file count."""
    try:
        if json.loads((root / MARKER).read_text()) != params:
            return False
        return all(sum(1 for _ in os.scandir(root / c)) == params["per_class"] for c in CLASSES)
    except (OSError, ValueError):
        return False


def _check_replaceable(root: Path) -> None:
    """Refuse to delete anything generate() did not write: root may be a user's real dataset by mistake."""
    if not root.is_dir():
        raise ValueError(f"{root} exists and is not a directory; pass a folder for the synthetic dataset")
    for entry in root.iterdir():
        if entry.name == MARKER:
            continue
        if entry.name not in CLASSES or not entry.is_dir() or entry.is_symlink():
            raise ValueError(f"{root} holds {entry.name!r}, which is not part of a synthetic dataset; refusing to "
                             f"overwrite it. Pass an empty or new folder")
        stray = next((f.name for f in entry.iterdir() if not _FILE_RE.match(f.name)), None)
        if stray is not None:
            raise ValueError(f"{entry} holds {stray!r}, which generate() did not write; refusing to overwrite "
                             f"{root}. Pass an empty or new folder")


def _write_range(folder: Path, ci: int, start: int, stop: int, size: int, seed: int) -> None:
    cls = CLASSES[ci]
    for i in range(start, stop):
        arr = phantom(cls, np.random.default_rng([seed, ci, i]), size)
        Image.fromarray(arr).save(folder / cls / f"{cls}_{i:05d}.png", format="PNG", optimize=False,
                                  compress_level=PNG_COMPRESS_LEVEL)


def _write(folder: Path, per_class: int, size: int, seed: int, workers: int = 1) -> None:
    for cls in CLASSES:
        (folder / cls).mkdir()
    step = 500
    jobs = [(folder, ci, a, min(a + step, per_class), size, seed)
            for ci in range(len(CLASSES)) for a in range(0, per_class, step)]
    run_jobs(_write_range, jobs, workers)


def run_jobs(fn: Callable, jobs: list[tuple], workers: int) -> None:
    """fn(*job) for every job, in `workers` spawned processes when there are several. Generators give every image
    its own RNG, so the bytes written do not depend on `workers`."""
    if workers > 1 and len(jobs) > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.starmap(fn, jobs)
    else:
        for job in jobs:
            fn(*job)


def generate(root: str | os.PathLike, per_class: int, size: int = 128, seed: int = 0, workers: int = 1) -> Path:
    """Write per_class PNG images per class to root/<class>/<class>_<i:05d>.png; return Path(root).

    Image i of class c is drawn from default_rng([seed, c, i]) alone: the same arguments give
    byte-identical files, and a larger per_class only appends images. A complete set for the same
    parameters (marker file written last) is reused as is. Otherwise the set is built in a temporary
    folder beside root and renamed into place, so an interrupted run never leaves a set that looks
    complete; an existing root is replaced only if it holds nothing but an older synthetic set.
    workers > 1 generates in that many processes (benchmarks' 50,000-image sets), with identical bytes.
    """
    per_class = _check_int("per_class", per_class, 1)
    size = _check_int("size", size, MIN_SIZE)
    seed = _check_int("seed", seed, 0)
    root = Path(os.path.expanduser(os.fspath(root)))
    target = Path(os.path.abspath(root))  # "." has no name to build a sibling from
    params = _params(per_class, size, seed)
    if _is_complete(target, params):
        return root
    if target.exists():
        _check_replaceable(target)
    publish(target, params, partial(_write, per_class=per_class, size=size, seed=seed, workers=workers), _is_complete)
    return root


def publish(target: Path, params: dict, write: Callable[[Path], None], is_complete: Callable[[Path, dict], bool]):
    """Build a generated set in a temporary folder beside target (`write(folder)`), write MARKER (params) last and
    rename it into place, replacing what target held (the caller has checked it holds only an older generated set):
    an interrupted run never leaves a set that looks complete; two processes generating the same set both succeed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700): executors running as another user read it
    old = None
    try:
        write(tmp)
        (tmp / MARKER).write_text(json.dumps(params, indent=1) + "\n")
        if target.exists() and any(target.iterdir()):
            old = tmp.with_suffix(".old")
            os.rename(target, old)
        try:
            os.replace(tmp, target)  # atomic; replaces an empty directory
        except OSError:
            if not is_complete(target, params):  # not a concurrent generate() that finished first
                raise
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
