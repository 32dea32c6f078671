"""From a composed Hydra config to a recipe's typed config."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def parse_recipe_config(cfg, cls: type[T], where: str) -> T:
    """``cls`` (a recipe's config dataclass) from the composed Hydra config, validated: the ``model`` preset
    node becomes a :class:`~nemo_dvpo.models.config.ModelConfig`, every other field is checked by name and
    type (errors name the field, e.g. ``dvpo.ppo.clip: expected a number``)."""
    from omegaconf import OmegaConf

    from nemo_dvpo.models.config import load_model_config
    from nemo_dvpo.utils.config import from_dict

    raw = OmegaConf.to_container(cfg, resolve=True)
    raw.pop("hydra", None)
    model_cfg = load_model_config(raw.pop("model"))
    return from_dict(cls, {"model": model_cfg, **raw}, where)
