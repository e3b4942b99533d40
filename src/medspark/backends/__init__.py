"""Parallel training strategies: one module each, all behind `base.Backend` (TrainJob in, TrainResult out).

conf/backend/<name>.yaml picks the class (`_target_`) and its options; `name` labels runs and is not passed on.
"""
from __future__ import annotations


def build(backend_cfg):
    """The backend object for a `backend` config (Hydra instantiate, minus the `name` label)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from hydra.errors import InstantiationException

    options = {k: v for k, v in OmegaConf.to_container(backend_cfg, resolve=True).items() if k != "name"}
    try:
        return instantiate(options)
    except InstantiationException as e:  # surface our own one-line setting errors, not Hydra's wrapper
        if isinstance(e.__cause__, ValueError):
            raise e.__cause__ from None
        raise
