"""Grad-CAM / Grad-CAM++ (medspark.explain): the maps' arithmetic on known numbers, a model whose answer is known,
the last convolutional block of every model in conf/model/, the phantoms' lesion masks, the gallery's choice of
images, and (slow: one small training shared by the module) the evaluation gallery, the pointing game and
`medspark explain` on a trained synthetic small_cnn."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medspark import explain
from medspark.data import synthetic


# ---------------------------------------------------------------------------------------------------------
# the arithmetic

def test_gradcam_weights_are_the_mean_gradient_and_the_map_is_relu_of_the_weighted_sum():
    a = np.zeros((1, 2, 2, 2))
    a[0, :, :, 0] = [[1, 2], [3, 4]]
    a[0, :, :, 1] = [[4, 0], [0, 0]]
    g = np.zeros_like(a)
    g[0, :, :, 0] = 0.5  # mean 0.5
    g[0, :, :, 1] = -1.0  # mean -1
    cam = explain.cam_from_gradients(a, g, "gradcam")
    np.testing.assert_allclose(cam[0], np.maximum(0.5 * a[0, ..., 0] - a[0, ..., 1], 0))  # [[0, 1], [1.5, 2]]


def test_gradcampp_weights_only_positive_gradients_with_the_closed_form_alpha():
    a = np.ones((1, 2, 2, 2))
    g = np.zeros_like(a)
    g[0, 0, 0, 0] = 1.0  # channel 0: one positive gradient; alpha = 1 / (2 + 4) there
    g[0, :, :, 1] = -1.0  # channel 1: only negative gradients, weight 0
    cam = explain.cam_from_gradients(a, g, "gradcampp")
    np.testing.assert_allclose(cam[0], np.full((2, 2), 1 / 6))
    with pytest.raises(ValueError, match="evaluate.gradcam.method"):
        explain.cam_from_gradients(a, g, "smoothgrad")


def test_upsampled_maps_are_0_to_1_per_image_and_a_zero_map_stays_zero():
    cams = np.stack([np.array([[0.0, 2.0], [0.0, 0.0]]), np.zeros((2, 2))])
    up = explain.upsample(cams, (8, 8))
    assert up.shape == (2, 8, 8) and up[0].max() == pytest.approx(1.0) and up[0].min() >= 0
    assert np.unravel_index(up[0].argmax(), (8, 8))[0] < 4 and np.unravel_index(up[0].argmax(), (8, 8))[1] >= 4
    assert not up[1].any()


def test_pointing_hits_and_dilation():
    maps = np.zeros((2, 10, 10))
    maps[0, 2, 2] = maps[1, 7, 7] = 1
    mask = np.zeros((10, 10), bool)
    mask[2, 3] = True  # one pixel right of the first peak
    masks = np.stack([mask, mask])
    assert explain.pointing_hits(maps, masks).tolist() == [False, False]
    grown = explain.dilate(mask, 1)
    assert grown.sum() == 5 and explain.pointing_hits(maps, np.stack([grown, grown])).tolist() == [True, False]


def test_overlay_is_rgb_and_colours_only_where_the_map_is_hot():
    img = np.full((16, 16, 1), 100, np.uint8)
    heat = np.zeros((16, 16), np.float32)
    heat[4:8, 4:8] = 1.0
    out = explain.overlay(img, heat)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert (out[0, 0] == 100).all() and not (out[5, 5] == 100).all()


# ---------------------------------------------------------------------------------------------------------
# real Keras models

def test_a_model_with_a_known_answer_lights_up_the_bright_patch():
    """1x1 conv (weight 1, ReLU) -> global average -> softmax with class 1 = +feature, class 0 = -feature: class 1's
    evidence is exactly the bright patch; class 0 has none (its map is all zero)."""
    import keras

    inputs = keras.Input((16, 16, 1), name="image")
    conv = keras.layers.Conv2D(1, 1, activation="relu", name="conv")
    x = keras.layers.GlobalAveragePooling2D()(conv(inputs))
    probs = keras.layers.Dense(2, activation="softmax", name="probs")
    model = keras.Model(inputs, probs(x))
    conv.set_weights([np.ones((1, 1, 1, 1), np.float32), np.zeros(1, np.float32)])
    probs.set_weights([np.array([[-1.0, 1.0]], np.float32), np.zeros(2, np.float32)])
    img = np.zeros((1, 16, 16, 1), np.float32)
    img[0, 10:14, 2:6] = 200.0
    for method in explain.METHODS:
        cam = explain.GradCam(model, method)
        maps, p = cam(img, [1])
        peak = np.unravel_index(maps[0].argmax(), maps[0].shape)
        assert 10 <= peak[0] < 14 and 2 <= peak[1] < 6, method
        assert maps[0][:8, 8:].max() == 0  # far from the patch: nothing
        np.testing.assert_allclose(p, model.predict_on_batch(img), atol=1e-6)
        assert not cam(img, [0])[0].any()


@pytest.fixture(scope="module")
def conf_models():
    """Every model of conf/model/, built as the config builds them (resnet50 without downloaded weights)."""
    from hydra.utils import instantiate

    from medspark.config import compose_project_config

    out = {}
    for name in ("small_cnn", "resnet50", "dense"):
        extra = ["model.weights=null"] if name == "resnet50" else []
        cfg = compose_project_config([f"model={name}", *extra])
        out[name] = instantiate(cfg.model, input_shape=(32, 32, 1), num_classes=3)
    return out


def test_every_conf_model_is_explained_at_its_last_conv_block_or_refused_in_one_line(conf_models, tmp_path):
    import keras

    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 1)).astype(np.float32)
    small = conf_models["small_cnn"]
    small.save(tmp_path / "small_cnn.keras")  # what a logged model gives back: the same graph, loaded
    loaded = keras.saving.load_model(tmp_path / "small_cnn.keras", compile=False)
    for m, want in ((small, "relu4"), (loaded, "relu4"), (conf_models["resnet50"], "resnet50_base/conv5_block3_out")):
        cam = explain.GradCam(m, "gradcampp")
        assert cam.layer_name == want
        maps, p = cam(x, [0, 2])
        assert maps.shape == (2, 32, 32) and 0 <= maps.min() and maps.max() <= 1
        np.testing.assert_allclose(p, m.predict_on_batch(x), atol=1e-4)
    with pytest.raises(explain.NoConvolution, match="no convolutional layer"):
        explain.GradCam(conf_models["dense"])


def test_an_ensemble_of_two_cnns_is_refused_in_one_line_and_one_member_is_explained():
    from medspark.backends.ensemble import voting_model
    from medspark.models import small_cnn

    members = [small_cnn.build((16, 16, 1), 3, name=f"member{i}", filters=(4, 8)) for i in range(2)]
    with pytest.raises(explain.Unexplainable, match="does not flow through one last conv block"):
        explain.GradCam(voting_model(members, [0.5, 0.5], (16, 16, 1)))
    cam = explain.GradCam(voting_model(members[:1], [1.0], (16, 16, 1)))
    assert cam.layer_name == "member0/relu2"
    assert cam(np.full((1, 16, 16, 1), 90, np.float32), [1])[0].shape == (1, 16, 16)


# ---------------------------------------------------------------------------------------------------------
# the phantoms' lesions

def test_lesion_mask_is_where_a_generated_file_differs_from_its_scan_without_lesion(tmp_path):
    root = synthetic.generate(tmp_path / "set", per_class=3, size=48, seed=5)
    for ci, cls in enumerate(synthetic.CLASSES):
        for path in sorted((root / cls).glob("*.png")):
            found = synthetic.generated_file(path)
            assert found is not None and found[0] == cls and found[2:] == (48, 5)
            mask = synthetic.lesion_mask(*found)
            pixels = np.asarray(Image.open(path), np.int16)
            clean = synthetic.phantom("notumor", np.random.default_rng([5, ci, found[1]]), 48).astype(np.int16)
            assert np.abs(pixels - clean)[~mask].max(initial=0) <= synthetic.LESION_DELTA
            if cls == "notumor":
                assert not mask.any()
            else:
                assert 0.003 < mask.mean() < 0.15, (cls, mask.mean())  # a lesion, not the whole head
    assert synthetic.generated_file(tmp_path / "x" / "glioma_00001.png") is None  # no marker: not a generated set
    assert synthetic.generated_file(root / "glioma" / "scan.png") is None


# ---------------------------------------------------------------------------------------------------------
# the gallery's choice

def test_gallery_picks_the_most_confident_right_and_wrong_per_class():
    labels = np.array([0, 0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7], [0.05, 0.95]])
    rows = explain.pick(labels, probs, 1, multilabel=False)
    got = {(r["kind"], int(labels[r["row"]])): (r["row"], r["explained"]) for r in rows}
    assert got == {("confident_correct", 0): (0, 0), ("confident_wrong", 0): (2, 1),
                   ("confident_correct", 1): (4, 1)}
    multi = explain.pick(np.array([[1, 0], [0, 1], [1, 1]]), np.array([[0.2, 0.1], [0.9, 0.8], [0.7, 0.3]]), 1,
                         multilabel=True)
    assert [(r["kind"], r["row"], r["explained"]) for r in multi] == [
        ("confident_correct", 2, 0), ("confident_wrong", 1, 0), ("confident_correct", 1, 1),
        ("confident_wrong", 0, 1)]


@pytest.mark.parametrize("given, message", [
    ({"gradcam": {"method": "cam"}}, "evaluate.gradcam.method='cam'"),
    ({"gradcam": {"per_class": -1}}, "evaluate.gradcam.per_class=-1"),
    ({"gradcam": {"enabeld": False}}, "evaluate.gradcam.enabeld: unknown key"),
])
def test_bad_gradcam_options_name_the_key(given, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        explain.options(given)


def test_a_bad_gradcam_setting_stops_the_run_before_it_trains(tmp_path):
    from conftest import make_cfg

    from medspark.config import ConfigError, check

    with pytest.raises(ConfigError, match=r"evaluate\.gradcam\.method='cam'"):
        check(make_cfg(tmp_path, ["evaluate.gradcam.method=cam"]))
    check(make_cfg(tmp_path, ["evaluate.gradcam.method=gradcampp"]))


def test_explain_is_a_listed_subcommand_and_refuses_to_write_into_its_input_by_default(tmp_path, monkeypatch,
                                                                                       capsys):
    from medspark import cli

    assert "explain" in cli.help_text()
    (tmp_path / "scans").mkdir()
    monkeypatch.chdir(tmp_path / "scans")
    assert explain.main([".", "model=models:/x/1"]) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert explain.main(["nowhere", "model=models:/x/1", "out=o"]) == 2
    assert "no such file or folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# a trained synthetic small_cnn (slow: one small in-memory training shared by the module, about a minute on 2 cores)

PER_CLASS, SIZE, HELD_OUT = 200, 64, 150  # files with index >= HELD_OUT are never trained on


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """small_cnn (conf/model/small_cnn.yaml's builder) trained on the phantoms `dataset=synthetic` writes, read back
    as files; the rest of its 64 px set held out. Adam with cosine decay: the last epoch's weights are stable."""
    import keras

    from medspark.models import small_cnn

    tmp = tmp_path_factory.mktemp("explain")
    root = synthetic.generate(tmp / "phantoms", per_class=PER_CLASS, size=SIZE, seed=7)
    paths = [p for c in synthetic.CLASSES for p in sorted((root / c).glob("*.png"))]
    images = np.stack([np.asarray(Image.open(p), np.float32) for p in paths])[..., None]
    labels = np.array([synthetic.CLASSES.index(p.parent.name) for p in paths])
    held = np.array([synthetic.generated_file(p)[1] >= HELD_OUT for p in paths])
    keras.utils.set_random_seed(0)
    model = small_cnn.build((SIZE, SIZE, 1), len(synthetic.CLASSES))
    steps = 7 * -(-int((~held).sum()) // 32)
    model.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(1e-3, steps)),
                  loss="sparse_categorical_crossentropy")
    t0 = time.perf_counter()
    model.fit(images[~held], labels[~held], epochs=7, batch_size=32, shuffle=True, verbose=0)
    print(f"training took {time.perf_counter() - t0:.1f} s")
    return {"model": model, "tmp": tmp, "root": root, "paths": [str(p) for p in np.array(paths)[held]],
            "images": images[held], "labels": labels[held]}


@pytest.mark.slow
def test_gradcam_points_at_the_lesion_on_correct_tumour_images(trained):
    """The pointing game on phantoms the model never saw: the heat map's peak falls inside the lesion mask, dilated
    by POINTING_DILATE (2 px at 64 px), for >= 80% of the correctly classified tumour images, with both methods;
    a map pointing anywhere would score the masks' share of the image (~5%)."""
    accuracy = (trained["model"].predict(trained["images"], verbose=0).argmax(1) == trained["labels"]).mean()
    assert accuracy >= 0.9, accuracy
    for method in explain.METHODS:
        result = explain.pointing_game(explain.GradCam(trained["model"], method), trained["images"],
                                       trained["labels"], trained["paths"], synthetic.CLASSES)
        assert result["images"] >= 120 and result["dilate_px"] == 2, result
        assert result["pointing_game"] >= 0.8, (method, result)
    tumour = [p for p in trained["paths"] if "notumor" not in p]
    share = np.mean([explain.input_mask(*synthetic.generated_file(p), side=SIZE).mean() for p in tumour])
    assert share < 0.1, share


@pytest.mark.slow
def test_the_evaluation_gallery_follows_the_contract_and_names_no_path(trained, spark, tmp_path):
    """explain.gallery as evaluate_split calls it, on a real Petastorm test split of the held-out phantoms."""
    from medspark.data.materialize import materialize
    from medspark.data.preprocess import PreprocessConfig
    from medspark.data.sources.class_folders import ClassFolders
    from medspark.evaluate import predict_split

    src = tmp_path / "Doe_John"  # a folder name that must never reach the gallery
    for path in trained["paths"]:
        (src / Path(path).parent.name).mkdir(parents=True, exist_ok=True)
        os.symlink(path, src / Path(path).parent.name / Path(path).name)
    (src / synthetic.MARKER).symlink_to(trained["root"] / synthetic.MARKER)
    data = materialize(spark, ClassFolders(str(src)).list(), PreprocessConfig(image_size=SIZE, channels=1),
                       {"val": 0.1, "test": 0.5, "seed": 0}, str(tmp_path / "data"), "gallery")
    y, p = predict_split(trained["model"], data, "test")
    t0 = time.perf_counter()
    files, metrics = explain.gallery(trained["model"], data, y, p, tmp_path / "evaluation",
                                     {"gradcam": {"method": "gradcampp", "per_class": 2}})
    assert time.perf_counter() - t0 < 60  # seconds, not minutes (2 slow shared cores)
    folder = tmp_path / "evaluation" / "gradcam"
    gallery = json.loads((folder / "gallery.json").read_text())
    correct = [g for g in gallery if g["kind"] == "confident_correct"]
    assert {g["true"] for g in correct} == set(synthetic.CLASSES) and len(correct) == 2 * len(synthetic.CLASSES)
    for g in gallery:
        assert {"file", "true", "predicted", "probability", "kind"} <= set(g)
        assert (g["true"] == g["predicted"]) == (g["kind"] == "confident_correct")
        assert 0 <= g["probability"] <= 1 and g["method"] == "gradcampp"
        assert Image.open(folder / g["file"]).mode == "RGB" and (folder / g["file"]).stat().st_size < 40_000
    top = [g["probability"] for g in correct if g["true"] == "glioma"]
    assert top == sorted(top, reverse=True)
    assert "Doe" not in "".join(p.read_text() if p.suffix == ".json" else p.name for p in files)
    assert sorted(f.name for f in files) == sorted([g["file"] for g in gallery] + ["gallery.json",
                                                                                   "pointing_game.json"])
    assert metrics["test_pointing_game"] >= 0.8  # the phantoms' masks are found through the files' marker
    assert explain.gallery(trained["model"], data, y, p, tmp_path / "off", {"gradcam": {"enabled": False}}) == ([], {})


@pytest.mark.slow
def test_explain_command_writes_overlays_beside_a_predictions_csv(trained, tmp_path, capsys):
    import mlflow
    import pandas as pd

    from medspark.data.preprocess import PreprocessConfig
    from medspark.serving import log_model

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("explain", artifact_location=str(tmp_path / "artifacts"))
    with mlflow.start_run(experiment_id=experiment) as run:
        log_model(trained["model"], PreprocessConfig(image_size=SIZE, channels=1), synthetic.CLASSES,
                  trained["images"][:1].astype(np.uint8))
    inputs = tmp_path / "scans"
    (inputs / "sub").mkdir(parents=True)
    for cls in synthetic.CLASSES:
        src = next(p for p in trained["paths"] if f"/{cls}/" in p)
        (inputs / "sub" / f"Doe_John_{cls}.png").write_bytes(Path(src).read_bytes())  # a name that must not leak
    (inputs / "notes.txt").write_text("not an image\n")
    before = sorted(str(p) for p in inputs.rglob("*"))
    out = tmp_path / "expl"
    code = explain.main([str(inputs), f"model=runs:/{run.info.run_id}/classifier", f"out={out}", "method=gradcampp",
                         f"tracking_uri={uri}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "5 file(s), 4 overlays" in captured.out
    assert sorted(str(p) for p in inputs.rglob("*")) == before  # the input folder is untouched
    table = pd.read_csv(out / "predictions.csv")
    assert len(table) == 5 and table["error"].notna().sum() == 1
    drawn = table[table["overlay"].notna()]
    assert (drawn["explained"] == drawn["predicted_class"]).all()
    for name in drawn["overlay"]:
        assert "Doe" not in name and Image.open(out / name).size == (SIZE, SIZE)
    assert sorted(p.name for p in out.iterdir()) == sorted([*drawn["overlay"], "predictions.csv"])


@pytest.mark.slow
def test_multilabel_gallery_shows_each_findings_most_confident_positives(spark, tmp_path):
    """A multilabel model (sigmoid head, untrained: this is about what is drawn, not how well): per finding, its most
    confident true positives and false positives, `true` in the NIH text form; no pointing game (no masks)."""
    from medspark.config import compose_project_config
    from medspark.data.materialize import materialize
    from medspark.data.preprocess import PreprocessConfig
    from medspark.data.sources import list_dataset
    from medspark.evaluate import predict_split
    from medspark.models import small_cnn

    cfg = compose_project_config(["dataset=synthetic_cxr14", f"paths.work_dir={tmp_path}",
                                  "dataset.generate.patients=40", "dataset.generate.size=48"])
    listing = list_dataset(cfg.dataset)
    data = materialize(spark, listing, PreprocessConfig(image_size=32, channels=1),
                       {"val": 0.1, "test": 0.5, "seed": 0}, str(tmp_path / "data"), "cxr")
    model = small_cnn.build((32, 32, 1), len(data.classes), multilabel=True, filters=(8, 16))
    y, p = predict_split(model, data, "test")
    files, metrics = explain.gallery(model, data, y, p, tmp_path / "evaluation", {"gradcam": {"per_class": 1}})
    gallery = json.loads((tmp_path / "evaluation" / "gradcam" / "gallery.json").read_text())
    assert metrics == {} and gallery
    for g in gallery:
        finding = data.classes.index(g["predicted"])
        row = y[g["row"]]
        assert row[finding] == (g["kind"] == "confident_correct")
        assert g["true"] == ("|".join(c for c, v in zip(data.classes, row) if v) or "No Finding")
        assert g["probability"] == pytest.approx(p[g["row"], finding], abs=1e-6)
    for finding in range(len(data.classes)):  # the most confident positive of each finding present in the split
        positives = np.flatnonzero(y[:, finding] == 1)
        if len(positives):
            best = positives[np.argmax(p[positives, finding])]
            assert any(g["row"] == best and g["predicted"] == data.classes[finding] for g in gallery)
