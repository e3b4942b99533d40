"""The backend contract: a TrainJob in, a TrainResult out, and the `Backend` protocol every strategy implements.

A backend never knows which dataset it trains on (the job carries the Petastorm splits and a model builder), and
the entrypoint never knows how the backend parallelizes. Backends that train with Keras `fit` (single, mirrored,
each spark_barrier worker, each ensemble member) do it through `keras_fit.fit`; the Elephas backends compile with
`keras_fit.compile_model` and follow `schedule`'s rules in their own epoch loops.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

from ..config import ConfigError, TrainConfig
from ..data import loader
from ..data.materialize import Materialized

if TYPE_CHECKING:
    from ..resume import Checkpoint


class BackendError(ConfigError):
    """A backend setting that cannot work on this cluster or machine; the message says which key to change."""


@dataclass
class TrainJob:
    data: Materialized
    build_model: Callable[..., Any]  # (**model overrides, e.g. name=, dropout=) -> an uncompiled keras.Model
    train: TrainConfig
    spark: Any = None  # the SparkSession, for backends that train on executors
    seed: int = 0
    checkpoint: "Checkpoint | None" = None  # per-epoch backup for resuming (backends with supports_resume only)

    def __post_init__(self):
        if not isinstance(self.train, TrainConfig):
            self.train = TrainConfig.from_cfg(self.train)

    @classmethod
    def from_config(cls, cfg, data: Materialized, spark=None, checkpoint=None) -> "TrainJob":
        """The job of a composed project config: its `train` group typed, its `model` option as the builder."""
        from hydra.utils import instantiate

        def build_model(**overrides):
            task = {"multilabel": True} if data.multilabel else {}  # single-label builders need not know the word
            try:
                return instantiate(cfg.model, input_shape=data.shape, num_classes=len(data.classes), **task,
                                   **overrides)
            except Exception as e:
                if task and "multilabel" in str(e):
                    raise ConfigError(f"model={cfg.model.name} cannot build a multilabel head (its build() takes no "
                                      f"`multilabel`); end it in models._common.head, or pick a model that does "
                                      f"(small_cnn, dense, resnet50)") from e
                raise

        return cls(data=data, build_model=build_model, train=TrainConfig.from_cfg(cfg.train), spark=spark,
                   seed=int(cfg.seed), checkpoint=checkpoint)

    def dataset(self, split: str, training: bool, batch_size: int, shard: int | None = None,
                num_shards: int | None = None, seed: int | None = None, pool: str = "dummy", workers: int = 4):
        """The tf.data pipeline of one split (or of one worker's shard of its row groups), from config."""
        d = self.data
        return loader.dataset(d.split_url(split), d.shape, batch_size, training=training,
                              seed=self.seed if seed is None else seed, augment=self.train.augment,
                              shuffle_buffer=self.train.shuffle_buffer, shard=shard, num_shards=num_shards,
                              pool=pool, workers=workers, rows=None if num_shards else d.sizes[split],
                              num_classes=len(d.classes) if d.multilabel else None,
                              one_hot=len(d.classes) if self.train.mixup and not d.multilabel else None,
                              mixup=self.train.mixup)

    def arrays(self, split: str, limit: int | None = None):
        """A whole (small) split in memory: (images, class labels or multi-hot targets), as the model trains on."""
        return loader.read_arrays(self.data.split_url(split), limit, multilabel=self.data.multilabel)

    def class_weight(self) -> dict[int, float] | None:
        """'balanced' weights classes by inverse frequency (chest X-ray is 1:2.9); null leaves them equal.
        Multilabel targets cannot be weighted per class by Keras: see `positive_weights` (in the loss)."""
        if self.train.class_weight != "balanced" or self.data.multilabel:
            return None
        counts = [self.data.per_class["train"][c] for c in self.data.classes]
        total = sum(counts)
        return {i: total / (len(counts) * n) for i, n in enumerate(counts) if n}

    def positive_weights(self) -> list[float] | None:
        """Multilabel with 'balanced': each finding's positives weigh negatives/positives in the loss (capped at
        100: a finding with 3 positives in 10,000 must not swamp the others), so rare findings are not ignored."""
        if self.train.class_weight != "balanced" or not self.data.multilabel:
            return None
        n = self.data.sizes["train"]
        return [min(100.0, (n - p) / p) if p else 1.0 for p in (self.data.per_class["train"][c]
                                                                   for c in self.data.classes)]


@dataclass
class TrainResult:
    model: Any  # keras.Model with the weights to evaluate and ship
    history: dict[str, list[float]]  # Keras-style, per epoch (combined across workers where there are several)
    epoch_seconds: list[float]
    train_seconds: float
    images_seen: int
    workers: int = 1
    global_batch_size: int = 0
    params: dict[str, Any] = field(default_factory=dict)  # backend-specific, logged as MLflow params
    metrics: dict[str, float] = field(default_factory=dict)  # backend-specific, logged as MLflow metrics
    resumed_epochs: int = 0  # epochs restored from a checkpoint; `history` covers them, `epoch_seconds` does not

    @property
    def images_per_second(self) -> float:
        return self.images_seen / self.train_seconds if self.train_seconds else 0.0


class Backend(Protocol):
    """conf/backend/<name>.yaml: `name` (set on the object by backends.build), `_target_` (the class) and its
    options (the constructor's keyword arguments, checked there: a bad one is a BackendError before Spark)."""
    name: str
    supports_resume: ClassVar[bool]  # fit honours job.checkpoint (train.resume=true continues a killed run)

    def fit(self, job: TrainJob) -> TrainResult: ...


def dump_result(out: dict) -> bytes:
    """Weights and facts that travel between processes or through storage (a spark_barrier worker's result, a
    snapshot in the resume checkpoint) as an .npz: the weights as arrays w0..wN, everything else (history, times,
    addresses: plain numbers and strings) as JSON. Read back with allow_pickle=False (`load_result`), so the bytes
    can carry data but never code."""
    import io
    import json

    import numpy as np

    out = dict(out)
    arrays = {f"w{i}": np.asarray(w) for i, w in enumerate(out.pop("weights", None) or [])}
    buf = io.BytesIO()
    np.savez(buf, meta=np.array(json.dumps(out)), **arrays)
    return buf.getvalue()


def load_result(blob: bytes) -> dict:
    import io
    import json

    import numpy as np

    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        out = json.loads(str(npz["meta"]))
        n = sum(1 for k in npz.files if k.startswith("w") and k[1:].isdigit())
        if n:
            out["weights"] = [npz[f"w{i}"] for i in range(n)]
    return out
