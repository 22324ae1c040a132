"""peft_type -> (config class, model class, parameter prefix). Adding a method is one call here."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import register_config


@dataclass(frozen=True)
class Method:
    peft_type: str
    config_cls: type
    model_cls: type
    prefix: str


METHODS: dict[str, Method] = {}


def register_method(config_cls: type, model_cls: type, prefix: str) -> None:
    register_config(config_cls)
    model_cls.prefix = prefix
    model_cls.config_cls = config_cls
    METHODS[config_cls.PEFT_TYPE] = Method(config_cls.PEFT_TYPE, config_cls, model_cls, prefix)


def method_for(peft_type: object) -> Method:
    key = str(getattr(peft_type, "value", peft_type))
    if key not in METHODS:
        raise ValueError(f"Unknown peft_type {key!r}; deltatune supports {sorted(METHODS)}")
    return METHODS[key]
