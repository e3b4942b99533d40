"""Parallel training strategies: one module each, all behind `api.Backend` (TrainJob in, TrainResult out).

    api.py        the contract: TrainJob, TrainResult, Backend, BackendError
    keras_fit.py  THE Keras fit path (compile, callbacks, timer, result) every model.fit backend calls
    schedule.py   learning-rate schedule and early stopping, defined once
    placement.py  Spark task slots, ports, the address rule, thread limits
    single mirrored spark_barrier ensemble elephas_sync elephas_async: where training runs, how data is sharded

conf/backend/<name>.yaml picks the class (`_target_`) and its options; `build` is the one way to make a backend.
"""
from __future__ import annotations


def build(backend_cfg):
    """The backend of a `backend` config: Hydra instantiates `_target_` with the options, then `name` is set."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    options = OmegaConf.to_container(backend_cfg, resolve=True)
    name = options.pop("name", None)
    try:
        backend = instantiate(options)
    except InstantiationException as e:  # surface our own one-line setting errors, not Hydra's wrapper
        if isinstance(e.__cause__, ValueError):
            raise e.__cause__ from None
        raise
    backend.name = name or type(backend).__name__.lower()
    return backend
