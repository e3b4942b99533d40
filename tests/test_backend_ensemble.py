"""The `ensemble` backend (bagging): members trained as parallel Spark tasks on bootstrap samples, joined into one
soft-voting Keras model that MLflow logs, registers and loads back like any other."""
import json
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest

from conftest import make_cfg

from medspark.backends.api import BackendError, TrainJob
from medspark.backends.ensemble import Ensemble, vote_weights, voting_model
from medspark.models import dense, small_cnn

SMALL = ["dataset.generate.per_class=100", "dataset.generate.size=64", "preprocess.image_size=64",
         "train.epochs=8", "train.batch_size=16", "backend=ensemble", "backend.members=2",
         "backend.member_dropout=[0.2,0.4]"]


def _members(n, shape=(16, 16, 1), classes=3):
    import keras

    keras.utils.set_random_seed(0)
    return [small_cnn.build(shape, classes, name=f"member{i}", filters=(4, 8), dropout=0.2) for i in range(n)]


def test_voting_model_is_the_weighted_average_of_its_members(tmp_path):
    import keras

    members, weights = _members(3), [0.2, 0.3, 0.5]
    model = voting_model(members, weights, (16, 16, 1))
    x = np.random.default_rng(1).uniform(0, 255, (5, 16, 16, 1)).astype("float32")
    probs = model.predict(x, verbose=0)
    expected = sum(w * m.predict(x, verbose=0) for m, w in zip(members, weights))
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    model.save(tmp_path / "vote.keras")  # built-in layers only: loads back with no custom objects
    np.testing.assert_allclose(keras.models.load_model(tmp_path / "vote.keras").predict(x, verbose=0), probs,
                               rtol=1e-5, atol=1e-6)


def test_vote_weights_and_member_overrides():
    assert vote_weights([0.6, 0.9, 0.9]) == pytest.approx([0.25, 0.375, 0.375])
    assert vote_weights([0.6, 0.9], "equal") == [0.5, 0.5]
    assert vote_weights([float("nan"), 0.0]) == [0.5, 0.5]  # no usable accuracy: plain average
    specs = Ensemble(members=3, member_dropout=[0.2, None], member_l2=1e-4).member_specs(seed=7)
    assert [s.seed for s in specs] == [7, 8, 9]
    assert [s.overrides for s in specs] == [{"name": "member0", "dropout": 0.2, "l2": 1e-4},
                                            {"name": "member1", "l2": 1e-4},
                                            {"name": "member2", "dropout": 0.2, "l2": 1e-4}]


def test_impossible_settings_fail_before_any_task(tmp_path):
    data = SimpleNamespace(sizes={"train": 10, "val": 2, "test": 2}, shape=(16, 16, 1))
    job = TrainJob(data=data, train=make_cfg(tmp_path).train, seed=0,
                   build_model=lambda **kw: dense.build((16, 16, 1), 3, units=(4,), **kw))
    with pytest.raises(BackendError, match="backend.members"):
        Ensemble(members=0).fit(job)
    with pytest.raises(BackendError, match="backend.weighting"):
        Ensemble(weighting="max").fit(job)
    with pytest.raises(BackendError, match="backend.member_l2"):  # dense has no l2 option
        Ensemble(members=2, member_l2=[1e-4]).fit(job)
    with pytest.raises(BackendError, match="SparkSession"):
        Ensemble(members=2, member_dropout=[0.1, 0.2]).fit(job)


@pytest.mark.slow
def test_ensemble_end_to_end(spark, cfg_factory):
    from medspark.data.loader import read_arrays
    from medspark.train import train

    cfg = cfg_factory(*SMALL)
    objective = train(cfg, spark=spark)
    run = mlflow.search_runs(experiment_names=["medspark-synthetic"], output_format="list")[0]
    p, m = run.data.params, run.data.metrics
    assert run.info.status == "FINISHED" and run.data.tags["medspark.backend"] == "ensemble"
    assert m["test_accuracy"] == pytest.approx(objective) and m["test_accuracy"] >= 0.85, \
        f"4 classes (chance 0.25): got {m['test_accuracy']}"
    assert p["backend_members"] == "2" and p["workers"] == "2" and p["backend_member_dropouts"] == "[0.2, 0.4]"
    weights = [m["member_0_weight"], m["member_1_weight"]]
    assert sum(weights) == pytest.approx(1) and min(weights) > 0
    for i in range(2):
        assert 0.25 < m[f"member_{i}_val_accuracy"] <= 1 and 0.5 < m[f"member_{i}_unique_fraction"] < 0.8
    assert {"ensemble_val_accuracy", "train_seconds", "epochs_run"} <= set(m)

    summary = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/summary.json"))
    assert summary["model_uri"] == "models:/medspark-synthetic/1"
    model = mlflow.tensorflow.load_model(summary["model_uri"])
    images, labels = read_arrays(f"{p['data_url']}/test")
    x = images.astype("float32")
    probs = model.predict(x, verbose=0)
    assert float((probs.argmax(1) == labels).mean()) == pytest.approx(m["test_accuracy"], abs=1e-9)
    members = [model.get_layer(f"member{i}").predict(x, verbose=0) for i in range(2)]
    np.testing.assert_allclose(probs, sum(w * q for w, q in zip(weights, members)), rtol=1e-4, atol=1e-5)
