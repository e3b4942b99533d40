"""`medspark explain`: where a classifier looked (Grad-CAM / Grad-CAM++ overlays beside a predictions CSV).

    medspark explain <image or folder> model=<models:/name-classifier@champion | models:/name/1 | runs:/id/classifier>
                     [out=explanations] [method=gradcam|gradcampp] [class=<class to explain>] [tracking_uri=...]

input   an image file, or a folder read recursively (the files `medspark predict` reads)
model   a packaged classifier, as for `medspark predict` (a registered Keras model stands for its run's classifier)
out     the output folder (created; default ./explanations): predictions.csv (medspark predict's columns plus
        `overlay`, `explained`) and one overlay PNG per image, named by its row and sha1 prefix, never by its path;
        a folder inside the input folder is refused unless given explicitly
method  gradcam (default) or gradcampp; class: explain this class (finding) for every image instead of the
        predicted one (multilabel: the most probable finding)

The same module holds the heat maps evaluation draws: Grad-CAM and Grad-CAM++, the evaluation gallery, the
pointing game.

Heat maps come from the model's last convolutional block, found by `conv_target` for every model in conf/model/:
the last convolution in graph order, nested models included (resnet50's base is a model inside the model), followed
forward through the layers that keep its 4D shape (batch norm, ReLU, the residual add), so small_cnn explains
`relu4` and resnet50 `conv5_block3_out`. A model without a convolution (dense) has no spatial feature map, and an
ensemble's output does not flow through one conv block: both are skipped with one line, never given a made-up map.
The score explained is the class's logit (the input of the softmax/sigmoid head), as in Selvaraju et al. (Grad-CAM)
and Chattopadhyay et al. (Grad-CAM++); maps are upsampled to the input size, ReLU-ed and scaled to 0..1 per image.

Gallery (evaluate.evaluate_split, `evaluate.gradcam`): per class, the most confident correct test images and the most
confident mistakes (multilabel: per finding, the most confident positives and the most confident false positives),
as overlays in evaluation/gradcam/ plus gallery.json. File names and the JSON carry the row index and a sha1 prefix,
never a path (paths can carry patient names).

Pointing game: the heat map's peak falls inside the (dilated) lesion mask. The synthetic phantoms know where their
lesions are (data.synthetic.lesion_mask), so on that set Grad-CAM is checked, not just drawn.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger("medspark.explain")
METHODS = ("gradcam", "gradcampp")
DEFAULTS = {"enabled": True, "method": "gradcam", "per_class": 2}  # conf/config.yaml evaluate.gradcam
POINTING_DILATE = 1 / 32  # lesion masks are dilated by this fraction of the image side (2 px at 64, 4 px at 128)
POINTING_MAX_IMAGES = 64  # evaluate_split's pointing game: at most this many correct tumour images (one batch)
OVERLAY_ALPHA = 0.45  # heat map weight in the overlay blend
COLORMAP = "jet"
BATCH = 32  # images per gradient pass


class Unexplainable(ValueError):
    """Grad-CAM cannot explain this model (the message says why, in one line)."""


class NoConvolution(Unexplainable):
    """The model has no convolutional layer, hence no spatial feature map to explain."""


# ---------------------------------------------------------------------------------------------------------
# where to look: the last convolutional block, nested models included

def _conv_types():
    import keras

    return (keras.layers.Conv2D, keras.layers.SeparableConv2D, keras.layers.DepthwiseConv2D)


def _flat_layers(model, path=()):
    """(path of nested models, layer) for every layer in graph order, nested models expanded in place."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _flat_layers(layer, (*path, layer))
        else:
            yield path, layer


def conv_target(model) -> tuple[tuple, object]:
    """(nested models from the outer one down to the layer's own, layer): the output of the model's last
    convolutional block. Raises NoConvolution (one line) for a model without a convolution."""
    import keras

    layers = list(_flat_layers(model))
    last = max((i for i, (_, layer) in enumerate(layers) if isinstance(layer, _conv_types())), default=None)
    if last is None:
        raise NoConvolution(f"model {model.name!r} has no convolutional layer, so Grad-CAM has no feature map to "
                            "explain (the dense model flattens the image); explain a CNN (model=small_cnn, resnet50)")
    path, target = layers[last]
    spatial = tuple(target.output.shape[1:3])
    for p, layer in layers[last + 1:]:  # batch norm, activation, residual add: still the same block
        shape = getattr(layer, "output", None)
        shape = None if shape is None or isinstance(shape, (list, tuple)) else tuple(shape.shape)
        if p != path or shape is None or len(shape) != 4 or shape[1:3] != spatial or \
                isinstance(layer, (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)):
            break
        target = layer
    return path, target


def _node_in(model, nested):
    """The node where `model`'s graph calls `nested`."""
    own = {id(n) for nodes in model._nodes_by_depth.values() for n in nodes}
    nodes = [n for n in nested._inbound_nodes if id(n) in own]
    if len(nodes) != 1:
        raise ValueError(f"Grad-CAM needs the nested model {nested.name!r} called once in {model.name!r}, "
                         f"found {len(nodes)} calls")
    return nodes[0]


def _forward(model, path, target, outputs):
    """A function x -> (target's activations, `outputs` (KerasTensors of model's graph)) in one differentiable pass.
    A nested model is run as its own (activations, output) sub-model between the outer layers before and after it:
    the outer graph reaches the nested layers only through the nested model's call."""
    import keras

    if not path:
        sub = keras.Model(model.inputs, [target.output, *outputs])
        return lambda x: (lambda r: (r[0], r[1:]))(sub([x]))
    nested = path[0]
    node = _node_in(model, nested)
    inner = _forward(nested, path[1:], target, list(nested.outputs))
    pre_in = list(node.input_tensors)
    pre = None if [id(t) for t in pre_in] == [id(t) for t in model.inputs] else keras.Model(model.inputs, pre_in)
    post = keras.Model(list(node.output_tensors), list(outputs))

    def run(x):
        conv, mid = inner(x if pre is None else pre([x]))
        out = post(list(mid))
        return conv, out if isinstance(out, (list, tuple)) else [out]
    return run


class GradCam:
    """Heat maps of a Keras classifier: `cam(images, classes)` -> (maps (N, H, W) in 0..1, probabilities (N, K)).

    images: float32 (N, H, W, C) pixels as the model takes them (0..255); classes: the class (finding) index to
    explain per image. method: gradcam | gradcampp."""

    def __init__(self, model, method: str = "gradcam"):
        import keras

        if method not in METHODS:
            raise ValueError(f"evaluate.gradcam.method={method!r}: must be one of {', '.join(METHODS)}")
        self.method = method
        self.path, self.layer = conv_target(model)
        head = model.layers[-1]
        if isinstance(head, keras.layers.Dense) and head.activation in (keras.activations.softmax,
                                                                       keras.activations.sigmoid):
            self.head = head  # the logit (its input times its kernel) is the score, as in the papers
            outputs = [head.input]
        else:
            self.head = None  # an unknown head: the model's output itself is the score
            outputs = list(model.outputs)
        try:
            self.forward = _forward(model, self.path, self.layer, outputs)
        except ValueError as e:  # the outputs also depend on layers beside the explained one (backend=ensemble)
            raise Unexplainable(f"model {model.name!r}: its output does not flow through one last conv block "
                                f"({self.layer_name}): {str(e).splitlines()[0]}; an ensemble's members are explained "
                                "one at a time (load a member model)") from None
        self.input_hw = tuple(int(v) for v in model.inputs[0].shape[1:3])

    @property
    def layer_name(self) -> str:
        return "/".join([m.name for m in self.path] + [self.layer.name])

    def __call__(self, images: np.ndarray, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        maps, probs = [], []
        for i in range(0, len(images), BATCH):
            m, p = self._batch(np.asarray(images[i:i + BATCH], np.float32), np.asarray(classes[i:i + BATCH]))
            maps.append(m)
            probs.append(p)
        return np.concatenate(maps), np.concatenate(probs)

    def _batch(self, x: np.ndarray, classes: np.ndarray):
        import tensorflow as tf

        with tf.GradientTape() as tape:
            conv, (out,) = self.forward(tf.convert_to_tensor(x))
            if self.head is not None:
                logits = tf.matmul(out, self.head.kernel) + self.head.bias
                probs = self.head.activation(logits)
            else:
                logits = probs = out
            score = tf.gather(logits, classes.astype(np.int32), axis=1, batch_dims=1)
        grads = tape.gradient(score, conv).numpy().astype(np.float64)
        a = conv.numpy().astype(np.float64)
        cam = cam_from_gradients(a, grads, self.method)
        return upsample(cam, self.input_hw), np.asarray(probs, np.float64)


def cam_from_gradients(activations: np.ndarray, grads: np.ndarray, method: str = "gradcam") -> np.ndarray:
    """(N, h, w, k) activations and d score / d activations -> (N, h, w) ReLU-ed class activation maps.
    gradcam: channel weights = spatial mean of the gradients. gradcampp: weights = sum of alpha * ReLU(grads) with
    Grad-CAM++'s closed-form alpha = g^2 / (2 g^2 + sum(A) g^3) (0 where the gradient is 0)."""
    if method == "gradcam":
        weights = grads.mean(axis=(1, 2))
    elif method == "gradcampp":
        g2 = grads ** 2
        denom = 2 * g2 + activations.sum(axis=(1, 2), keepdims=True) * g2 * grads
        alpha = np.where(grads != 0, g2 / np.where(denom != 0, denom, 1.0), 0.0)
        weights = (alpha * np.maximum(grads, 0)).sum(axis=(1, 2))
    else:
        raise ValueError(f"evaluate.gradcam.method={method!r}: must be one of {', '.join(METHODS)}")
    return np.maximum(np.einsum("nhwk,nk->nhw", activations, weights), 0.0)


def upsample(cams: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, h, w) maps -> (N, H, W) bilinear, each scaled to 0..1 by its maximum (an all-zero map stays zero)."""
    import tensorflow as tf

    up = tf.image.resize(cams[..., None].astype(np.float32), size, method="bilinear").numpy()[..., 0]
    up = np.maximum(up, 0.0)
    top = up.max(axis=(1, 2), keepdims=True)
    return np.where(top > 0, up / np.where(top > 0, top, 1.0), 0.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# pictures

def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """uint8 RGB (H, W, 3): the grayscale or RGB image blended with the heat map in COLORMAP (more weight where the
    map is hot, so cold regions show the anatomy)."""
    import matplotlib

    img = np.asarray(image, np.float32)
    img = np.repeat(img, 3, axis=-1) if img.ndim == 3 and img.shape[-1] == 1 else img
    img = np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else img
    colors = matplotlib.colormaps[COLORMAP](np.clip(heat, 0, 1))[..., :3] * 255.0
    w = alpha * np.clip(heat, 0, 1)[..., None] ** 0.5
    return np.clip(img * (1 - w) + colors * w, 0, 255).astype(np.uint8)


def save_png(rgb: np.ndarray, path: Path) -> Path:
    from PIL import Image

    Image.fromarray(rgb).save(path, format="PNG", optimize=True)
    return path


# ---------------------------------------------------------------------------------------------------------
# pointing game

def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """A bool mask grown by `pixels` (a disc of that radius)."""
    if pixels <= 0:
        return mask.astype(bool)
    from scipy.ndimage import binary_dilation

    r = np.arange(-pixels, pixels + 1)
    disc = (r[:, None] ** 2 + r[None, :] ** 2) <= pixels ** 2
    return binary_dilation(mask, structure=disc)


def pointing_hits(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """bool (N,): each map's peak (argmax; the first of ties) lies inside its mask; masks are (N, H, W) as the maps."""
    n = len(maps)
    flat = maps.reshape(n, -1).argmax(axis=1)
    return masks.reshape(n, -1)[np.arange(n), flat].astype(bool)


def input_mask(cls: str, index: int, gen_size: int, seed: int, side: int, dilate_px: int | None = None) -> np.ndarray:
    """A generated phantom's lesion mask (data.synthetic.lesion_mask) at the model's input side (the synthetic scans
    are square, so preprocessing is a plain resize), dilated by POINTING_DILATE of the side unless told."""
    from PIL import Image

    from .data.synthetic import lesion_mask

    mask = lesion_mask(cls, index, gen_size, seed)
    if side != gen_size:
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((side, side), Image.BILINEAR)) >= 64
    return dilate(mask, round(side * POINTING_DILATE) if dilate_px is None else dilate_px)


def pointing_game(cam: GradCam, images: np.ndarray, labels: np.ndarray, paths: Sequence[str],
                  classes: Sequence[str]) -> dict | None:
    """The pointing game on the generated phantoms among `paths` (data.synthetic.generated_file): of the tumour
    images the model classifies correctly, the share whose heat map (for the true class) peaks inside the dilated
    lesion mask. None when no image qualifies (not the synthetic set, or no correct tumour image)."""
    from .data.synthetic import generated_file

    keep, masks = [], []
    side = images.shape[1] if len(images) else 0
    for i, path in enumerate(paths):
        found = generated_file(path)
        if found is None or found[0] == "notumor" or classes[labels[i]] != found[0]:
            continue
        keep.append(i)
        masks.append(input_mask(*found, side=side))
    if not keep:
        return None
    maps, probs = cam(images[keep], labels[keep])
    correct = probs.argmax(1) == labels[keep]
    if not correct.any():
        return None
    hits = pointing_hits(maps[correct], np.stack(masks)[correct])
    return {"pointing_game": float(hits.mean()), "images": int(correct.sum()), "hits": int(hits.sum()),
            "dilate_px": round(side * POINTING_DILATE), "layer": cam.layer_name, "method": cam.method}


# ---------------------------------------------------------------------------------------------------------
# the evaluation gallery

def options(opts: Mapping | None) -> dict:
    """evaluate.gradcam as a checked dict (defaults for missing keys); errors name the key."""
    raw = dict(DEFAULTS)
    given = dict((opts or {}).get("gradcam") or {})
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"evaluate.gradcam.{unknown[0]}: unknown key; valid keys: {', '.join(DEFAULTS)}")
    raw.update(given)
    if raw["method"] not in METHODS:
        raise ValueError(f"evaluate.gradcam.method={raw['method']!r}: must be one of {', '.join(METHODS)}")
    n = raw["per_class"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"evaluate.gradcam.per_class={n!r} must be an integer >= 0 (0 = no gallery)")
    if not isinstance(raw["enabled"], bool):
        raise ValueError(f"evaluate.gradcam.enabled={raw['enabled']!r} must be true or false")
    return raw


def pick(labels: np.ndarray, probs: np.ndarray, per_class: int, multilabel: bool) -> list[dict]:
    """The gallery's rows: per class, the `per_class` most confident correct images and most confident mistakes
    (by the predicted class's probability); multilabel: per finding, the most confident positives (true) and the
    most confident false positives (by that finding's probability). Each: row, class explained, true, kind."""
    out = []
    for c in range(probs.shape[1]):
        if multilabel:
            groups = {"confident_correct": np.flatnonzero(labels[:, c] == 1),
                      "confident_wrong": np.flatnonzero(labels[:, c] == 0)}
            score = {k: probs[rows, c] for k, rows in groups.items()}
            explained = {k: np.full(len(rows), c) for k, rows in groups.items()}
        else:
            pred = probs.argmax(1)
            groups = {"confident_correct": np.flatnonzero((labels == c) & (pred == c)),
                      "confident_wrong": np.flatnonzero((labels == c) & (pred != c))}
            score = {k: probs[rows, pred[rows]] for k, rows in groups.items()}
            explained = {k: pred[rows] for k, rows in groups.items()}
        for kind, rows in groups.items():
            order = np.argsort(-score[kind], kind="stable")[:per_class]
            out += [{"row": int(rows[j]), "explained": int(explained[kind][j]), "kind": kind,
                     "probability": float(score[kind][j])} for j in order]
    return out


def _rows(url: str, wanted: set[int], columns: Sequence[str]) -> dict[int, tuple]:
    """The wanted rows (file order, as predict_split reads them) of a split, read in one pass, keeping only those."""
    from .data.loader import read_columns

    out = {}
    for i, row in enumerate(read_columns(url, columns)):
        if i in wanted:
            out[i] = row
            if len(out) == len(wanted):
                break
    return out


def gallery(model, data, labels: np.ndarray, probs: np.ndarray, out_dir, opts: Mapping | None = None
            ) -> tuple[list[Path], dict[str, float]]:
    """evaluate_split's Grad-CAM step on the test split (labels, probs: predict_split's): overlays and gallery.json
    in out_dir/gradcam, plus, when the test files are generated phantoms, the pointing game on up to
    POINTING_MAX_IMAGES correctly classified tumour images (`test_pointing_game`). Returns (files, metrics)."""
    from .data import targets
    from .evaluate import metric_key_names

    opts = options(opts)
    if not opts["enabled"] or opts["per_class"] == 0:
        return [], {}
    t0 = time.perf_counter()
    try:
        cam = GradCam(model, opts["method"])
    except Unexplainable as e:
        log.warning("Grad-CAM gallery skipped: %s", e)
        return [], {}
    labels, probs = np.asarray(labels), np.asarray(probs)
    chosen = pick(labels, probs, opts["per_class"], data.multilabel)
    want_paths = not data.multilabel and all(c in _synthetic_classes() for c in data.classes)
    candidates = []
    if want_paths:  # pointing-game candidates: correct tumour images, most confident first, one batch
        pred = probs.argmax(1)
        ok = np.flatnonzero((pred == labels) & np.isin(labels, [i for i, c in enumerate(data.classes)
                                                                if c != "notumor"]))
        candidates = ok[np.argsort(-probs[ok, pred[ok]], kind="stable")][:POINTING_MAX_IMAGES].tolist()
    columns = ("image", "sha1", "path") if want_paths else ("image", "sha1")
    rows = _rows(data.split_url("test"), {r["row"] for r in chosen} | set(candidates), columns)
    folder = Path(out_dir) / "gradcam"
    folder.mkdir(parents=True, exist_ok=True)
    files, entries, metrics = [], [], {}
    if chosen:
        images = np.stack([rows[r["row"]][0] for r in chosen]).astype(np.float32)
        maps, _ = cam(images, [r["explained"] for r in chosen])
        safe = metric_key_names(data.classes)
        for r, image, heat in zip(chosen, images, maps):
            sha1 = str(rows[r["row"]][1])[:10]
            name = f"{r['kind']}_{safe[r['explained']]}_{r['row']:05d}_{sha1}.png".replace("/", "_").replace(" ", "_")
            files.append(save_png(overlay(image, heat), folder / name))
            y = labels[r["row"]]
            true = (targets.names(targets.bits(np.flatnonzero(y)), "multilabel", data.classes) if data.multilabel
                    else data.classes[int(y)])
            entries.append({"file": name, "true": true, "predicted": data.classes[r["explained"]],
                            "probability": round(r["probability"], 6), "kind": r["kind"], "row": r["row"],
                            "sha1": sha1, "method": cam.method, "layer": cam.layer_name})
    summary = None
    if candidates:
        summary = pointing_game(cam, np.stack([rows[i][0] for i in candidates]).astype(np.float32),
                                labels[candidates], [rows[i][2] for i in candidates], data.classes)
        if summary is not None:
            metrics["test_pointing_game"] = summary["pointing_game"]
    js = folder / "gallery.json"
    js.write_text(json.dumps(entries, indent=1, ensure_ascii=False), encoding="utf-8")
    files.append(js)
    if summary is not None:
        pg = folder / "pointing_game.json"
        pg.write_text(json.dumps(summary, indent=1), encoding="utf-8")
        files.append(pg)
    log.info("Grad-CAM gallery: %d overlays (%s, layer %s) in %.1f s", len(entries), cam.method, cam.layer_name,
             time.perf_counter() - t0)
    return files, metrics


def _synthetic_classes() -> tuple[str, ...]:
    from .data.synthetic import CLASSES

    return CLASSES


# ---------------------------------------------------------------------------------------------------------
# the command

KEYS = {"model": None, "out": None, "method": "gradcam", "class": None, "batch_size": "32", "tracking_uri": None}
DEFAULT_OUT = "explanations"
USAGE = ("usage: medspark explain <image or folder> model=<models:/name-classifier@champion | runs:/id/classifier | "
         "folder> [out=explanations] [method=gradcam|gradcampp] [class=...] [tracking_uri=...]")


def parse_args(argv: list[str]) -> dict:
    from .predict import ArgError

    opts, inputs = dict(KEYS), []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            inputs.append(arg)
            continue
        key = key.lstrip("+").strip()
        if key == "input":
            inputs.append(value)
        elif key not in KEYS:
            raise ArgError(f"unknown key {key!r}; valid keys: {', '.join(KEYS)} (and the input, first)")
        else:
            opts[key] = value
    if len(inputs) != 1:
        raise ArgError(f"give one image file or folder to explain, got {len(inputs)}")
    opts["input"] = inputs[0]
    if not opts["model"]:
        raise ArgError("required setting not given: model=... (a packaged classifier's MLflow URI)")
    if opts["method"] not in METHODS:
        raise ArgError(f"method={opts['method']}: must be one of {', '.join(METHODS)}")
    if not os.path.exists(opts["input"]):
        raise ArgError(f"{opts['input']}: no such file or folder")
    try:
        assert int(opts["batch_size"]) >= 1
        opts["batch_size"] = int(opts["batch_size"])
    except (ValueError, AssertionError):
        raise ArgError(f"batch_size={opts['batch_size']} must be an integer >= 1") from None
    explicit = opts["out"] is not None
    out = Path(opts["out"] or DEFAULT_OUT).resolve()
    root = Path(opts["input"]).resolve()
    root = root if root.is_dir() else root.parent
    if not explicit and (out == root or root in out.parents):
        raise ArgError(f"the default output folder {out} is inside the input folder {root}; pass out=<folder> "
                       "(out= inside the input folder writes there)")
    opts["out"] = out
    return opts


def explain_files(model, files: list[str], out: Path, method: str = "gradcam", class_name: str | None = None,
                  batch_size: int = 32):
    """Predictions (medspark predict's columns) plus an overlay PNG per image in `out`; returns the table with
    `overlay` (file name) and `explained` (class) columns. A file that is not an image keeps its reason in `error`
    and gets no overlay."""
    import hashlib

    import pandas as pd

    from .data.preprocess import Rejected, decode
    from .predict import ArgError, predict_contents, read_file
    from .serving import check_image, prob_column

    py = model.unwrap_python_model()
    if class_name is not None and class_name not in py.classes:
        raise ArgError(f"class={class_name}: not a class of this model ({', '.join(py.classes)})")
    try:
        cam = GradCam(py.model, method)
    except Unexplainable as e:
        raise ArgError(str(e)) from None
    out.mkdir(parents=True, exist_ok=True)
    tables = []
    for start in range(0, len(files), batch_size):
        batch = files[start:start + batch_size]
        contents = [read_file(p) for p in batch]
        table = predict_contents(model, batch, contents)
        table["overlay"], table["explained"] = None, None
        arrays, rows = [], []
        for i, c in enumerate(contents):
            if isinstance(c, Rejected) or table.at[i, "error"] is not None and not pd.isna(table.at[i, "error"]):
                continue
            try:
                check_image(c, py.limits)
                arrays.append(decode(c, py.preprocess))
                rows.append(i)
            except Rejected as e:
                table.at[i, "error"] = str(e)
        if arrays:
            probs = np.asarray(table.loc[rows, [prob_column(k) for k in py.classes]], np.float64)
            chosen = (np.full(len(rows), py.classes.index(class_name)) if class_name is not None
                      else probs.argmax(1))
            images = np.stack(arrays)
            maps, _ = cam(images.astype(np.float32), chosen)
            for i, image, heat, c in zip(rows, images, maps, chosen):
                name = f"{start + i:05d}_{hashlib.sha1(contents[i]).hexdigest()[:10]}.png"
                save_png(overlay(image, heat), out / name)
                table.at[i, "overlay"], table.at[i, "explained"] = name, py.classes[int(c)]
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def run(opts):
    import mlflow

    from .cli import import_tensorflow
    from .predict import ArgError, check_classifier, classifier_uri, list_files, tracking_uris

    import_tensorflow()  # its start-up noise filtered, before the model loads it
    uri, registry = tracking_uris(opts)
    if uri:
        mlflow.set_tracking_uri(uri)
    if registry:
        mlflow.set_registry_uri(registry)
    files = list_files(opts["input"])
    if not files:
        raise ArgError(f"{opts['input']}: no files to explain (names starting with . or _ are skipped)")
    opts["model"] = classifier_uri(opts["model"])
    model = mlflow.pyfunc.load_model(opts["model"])
    check_classifier(model.metadata, opts["model"])
    return explain_files(model, files, opts["out"], opts["method"], opts["class"], opts["batch_size"])


def main(argv: list[str]) -> int:
    from .predict import run_command, write_csv

    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.split("\n\nThe same module")[0])
        return 0 if argv else 2
    done = run_command("medspark explain", argv, USAGE, parse_args, run)
    if isinstance(done, int):
        return done
    opts, table, seconds = done
    csv = opts["out"] / "predictions.csv"
    write_csv(table, str(csv))
    drawn = int(table["overlay"].notna().sum())
    print(f"medspark explain: {len(table)} file(s), {drawn} overlays ({opts['method']}), "
          f"{len(table) - drawn} not images, {seconds:.1f} s -> {opts['out']}")
    return 0
