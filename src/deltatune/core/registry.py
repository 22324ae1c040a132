"""The method table: peft_type -> (config class, model class). The one place that knows which
methods exist; each method file adds its row with :func:`register_method`.

This module imports nothing from deltatune (a leaf): the config layer reads it to turn a file's
``peft_type`` into a config class, the model layer to build a method's model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Method:
    peft_type: str
    config_cls: type
    model_cls: type

    @property
    def prefix(self) -> str:
        """The prefix of the method's parameter names (``lora_``, ``fourierft_``, ...)."""
        return self.model_cls.prefix


METHODS: dict[str, Method] = {}


def register_method(config_cls: type, model_cls: type) -> None:
    """Add a method: its config class (``PEFT_TYPE``) and its model class, which names the config
    class it takes (``config_cls``) and its parameter ``prefix``."""
    peft_type = config_cls.PEFT_TYPE
    if model_cls.config_cls is not config_cls or not model_cls.prefix:
        raise TypeError(f"{model_cls.__name__} must declare config_cls = {config_cls.__name__} and its parameter prefix")
    if peft_type in METHODS and METHODS[peft_type].model_cls is not model_cls:
        raise ValueError(f"peft_type {peft_type!r} is already registered by {METHODS[peft_type].model_cls.__name__}")
    METHODS[peft_type] = Method(peft_type, config_cls, model_cls)


def method_for(peft_type: Any) -> Method:
    key = str(getattr(peft_type, "value", peft_type))
    if key not in METHODS:
        raise ValueError(f"Unknown peft_type {key!r}; deltatune supports {sorted(METHODS)}")
    return METHODS[key]
