"""Which deltatune object answers which public PEFT name, per PEFT module path.

Only PEFT's public names are mapped: those in ``peft.__all__``, the method packages'
``__all__`` (config and model classes), ``peft.utils``' documented helpers, and the documented
base classes ``BaseTuner``/``BaseTunerLayer`` (PEFT's "Tuners" reference page), which deltatune's
``AdapterModel``/``AdapterLayer`` stand for. Anything else inside the five methods' modules is a
PEFT internal and is refused by the shim.
"""

import functools

import deltatune as dt

METHOD_PACKAGES = ("peft.tuners.fourierft", "peft.tuners.randlora", "peft.tuners.adalora", "peft.tuners.bone",
                   "peft.tuners.miss")

_METHODS = {
    "fourierft": ("FourierFTConfig", "FourierFTModel"),
    "randlora": ("RandLoraConfig", "RandLoraModel"),
    "adalora": ("AdaLoraConfig", "AdaLoraModel"),
    "bone": ("BoneConfig", "BoneModel"),
    "miss": ("MissConfig", "MissModel"),
}
_TYPES = {"fourierft": "FOURIERFT", "randlora": "RANDLORA", "adalora": "ADALORA", "bone": "BONE", "miss": "MISS"}


def is_method_module(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in METHOD_PACKAGES)


def provides_module(name: str) -> bool:
    return bool(overrides(name)) or name in ("peft.tuners.bone", "peft.tuners.bone.config", "peft.tuners.bone.model")


def _public(*names):
    from deltatune import peft_model  # PeftMixedModel lives there (not yet exported by deltatune/__init__)

    return {n: getattr(dt, n, None) or getattr(peft_model, n) for n in names if hasattr(dt, n) or hasattr(peft_model, n)}


def _mapping_tables():
    import _peft_real.mapping as real_mapping  # noqa: PLC0415  (loaded by the shim)
    from deltatune.core.registry import method_for

    config = dict(real_mapping.PEFT_TYPE_TO_CONFIG_MAPPING)
    tuner = dict(real_mapping.PEFT_TYPE_TO_TUNER_MAPPING)
    prefix = dict(real_mapping.PEFT_TYPE_TO_PREFIX_MAPPING)
    for key in list(config):
        value = str(getattr(key, "value", key))
        if value in _TYPES.values():
            del config[key], tuner[key]
            prefix.pop(key, None)
    for method, (cfg, model) in _METHODS.items():
        if hasattr(dt, cfg):
            peft_type = dt.PeftType(_TYPES[method])
            config[peft_type] = getattr(dt, cfg)
            tuner[peft_type] = getattr(dt, model)
            prefix[peft_type] = method_for(peft_type).prefix
    return {"PEFT_TYPE_TO_CONFIG_MAPPING": config, "PEFT_TYPE_TO_TUNER_MAPPING": tuner,
            "PEFT_TYPE_TO_PREFIX_MAPPING": prefix, "PEFT_TYPE_TO_MODEL_MAPPING": tuner}


@functools.lru_cache(maxsize=None)
def overrides(module: str) -> dict:
    top = {n: getattr(dt, n) for n in dt.__all__}
    top.update(_public("PeftMixedModel"))
    models = _public("PeftModel", "PeftModelForCausalLM", "PeftModelForFeatureExtraction", "PeftModelForQuestionAnswering",
                     "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification", "PeftModelForTokenClassification",
                     "get_layer_status", "get_model_status")
    state = _public("get_peft_model_state_dict", "set_peft_model_state_dict", "load_peft_weights")
    tuners_utils = {"BaseTuner": dt.AdapterModel, "BaseTunerLayer": dt.AdapterLayer}
    tuners = {}
    for cfg, model in _METHODS.values():
        tuners.update(_public(cfg, model))
    table = {
        "peft": top,
        "peft.peft_model": models,
        "peft.mixed_model": _public("PeftMixedModel"),
        "peft.config": _public("PeftConfig"),
        "peft.auto": _public("AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction",
                             "AutoPeftModelForQuestionAnswering", "AutoPeftModelForSeq2SeqLM",
                             "AutoPeftModelForSequenceClassification", "AutoPeftModelForTokenClassification"),
        "peft.mapping": {**_public("inject_adapter_in_model", "get_peft_config"), **_mapping_tables()},
        "peft.mapping_func": _public("get_peft_model"),
        "peft.functional": _public("inject_adapter_in_model", "set_requires_grad", "get_peft_model_state_dict",
                                   "set_peft_model_state_dict"),
        "peft.tuners": tuners,
        "peft.tuners.tuners_utils": tuners_utils,
        "peft.utils": {**state, **_public("PeftType", "TaskType", "ModulesToSaveWrapper",
                                          "prepare_model_for_kbit_training")},
        "peft.utils.peft_types": _public("PeftType", "TaskType"),
        "peft.utils.other": _public("ModulesToSaveWrapper", "prepare_model_for_kbit_training"),
        "peft.utils.save_and_load": state,
    }
    for method, (cfg, model) in _METHODS.items():
        names = _public(cfg, model)
        table[f"peft.tuners.{method}"] = names
        table[f"peft.tuners.{method}.config"] = _public(cfg)
        table[f"peft.tuners.{method}.model"] = _public(model)
    return table.get(module, {})
