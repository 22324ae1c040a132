"""The field matrix: every method case trained the way users train.

Columns (README support table): autocast bf16/fp16, gradient checkpointing (reentrant and not), a
bf16 base, quantized bases (bitsandbytes 8-bit and 4-bit, torchao int8 weight-only), and creation
on the ``meta`` device. Cases are the first case of every method variant on the tiny Llama
(``representative``), so a new method joins every column by adding its cases. FourierFT's two
paths (FFT and dense ΔW) are both run: the tiny layers would otherwise always take the dense one.

References are independent of the path under test: the fp32 eager run without checkpointing, and
for quantized bases the same adapter on a float model holding the dequantized weights.
"""

from __future__ import annotations

import copy
import dataclasses

import bitsandbytes as bnb
import pytest
import torch
import torch.nn as nn
from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_

import deltatune as dt
import deltatune.methods.fourierft as fourierft
from cases import CASES
from deltatune.core.layer import DerivedBuffers
from deltatune.core.precision import quant_scheme
from dist_worker import representative
from models import randomize_adapters

FIELD = representative(CASES, kinds=("llama",))
PATHS = [(c, None) for c in FIELD] + [(c, p) for c in FIELD if c.id.startswith("fourierft") for p in ("fft", "dense")]
IDS = [c.id + (f"[{p}]" if p else "") for c, p in PATHS]
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def field_llama(dtype=torch.float32):
    """A tiny Llama whose layers are wide enough for bitsandbytes' 4-bit blocks (64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype)


IDS_IN = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))


def config_of(case):
    config = case.config()
    if "rank_pattern" in {f.name for f in dataclasses.fields(config)}:
        config.rank_pattern = None
    return config


@pytest.fixture
def path(request, monkeypatch):
    """Force FourierFT's FFT or dense path (None: the cost model picks)."""
    chosen = request.param
    if chosen is not None:
        monkeypatch.setattr(fourierft, "choose_dense", lambda *a: chosen == "dense")
    return chosen


def adapted(case, base=None, seed=3):
    model = dt.get_peft_model(field_llama() if base is None else base, config_of(case))
    randomize_adapters(model, seed=seed, std=0.02)  # a trained adapter's size: the base still dominates
    return model


def logits(model, **kw):
    return model(input_ids=IDS_IN, **kw).logits


def adapter_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_grads_close(got: dict, want: dict, rel: float) -> None:
    assert want and set(got) == set(want), sorted(set(got) ^ set(want))
    for name, ref in want.items():
        err = ((got[name] - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        assert err <= rel, f"{name}: relative gradient error {err:.3g} > {rel}"


def reference_grads(model) -> dict[str, torch.Tensor]:
    model.train()
    logits(model).float().pow(2).mean().backward()
    grads = adapter_grads(model)
    model.zero_grad(set_to_none=True)
    return grads


# ================================================================ autocast, checkpointing, bf16 base
@pytest.mark.parametrize("case,path", PATHS, ids=IDS, indirect=["path"])
@pytest.mark.parametrize("half", list(HALF))
def test_autocast_matches_fp32(case, path, half):
    """Trainer's bf16=True / fp16=True: outputs in the autocast dtype as a plain layer's, adapter
    parameters and their gradients fp32, gradients within half-precision tolerance of fp32 (also
    when backward itself runs inside the autocast region)."""
    model = adapted(case)
    want = reference_grads(model)
    for backward_inside in (False, True):
        with torch.autocast("cpu", dtype=HALF[half]):
            out = logits(model)
            assert out.dtype == HALF[half]
            if backward_inside:
                out.float().pow(2).mean().backward()
        if not backward_inside:
            out.float().pow(2).mean().backward()
        assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".adapters." in n)
        assert_grads_close(adapter_grads(model), want, rel=0.1)
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("case,path", PATHS, ids=IDS, indirect=["path"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing_matches_plain_backward(case, path, reentrant):
    model = adapted(case)
    want = reference_grads(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    logits(model).float().pow(2).mean().backward()
    assert_grads_close(adapter_grads(model), want, rel=1e-4)


@pytest.mark.parametrize("case,path", PATHS, ids=IDS, indirect=["path"])
def test_bf16_base_trains_like_fp32(case, path):
    want = reference_grads(adapted(case))
    model = adapted(case, base=field_llama(torch.bfloat16))
    model.train()
    out = logits(model)
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    assert_grads_close(adapter_grads(model), want, rel=0.1)


# ================================================================ quantized bases
def quantize(model: nn.Module, kind: str) -> nn.Module:
    """Replace the decoder's Linear layers by the back end's quantized layers (the lm_head stays)."""
    layers = model.model.layers
    if kind.startswith("torchao"):
        # int4: torchao's CPU int4 weight-only layout (Int4WeightOnlyConfig needs a CUDA kernel library)
        quantize_(layers, Int8WeightOnlyConfig() if kind == "torchao-int8" else IntxWeightOnlyConfig(weight_dtype=torch.int4))
        return model
    for parent in list(layers.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, bnb_layer(child, kind))
    return model


def bnb_layer(linear: nn.Linear, kind: str) -> nn.Module:
    """``linear`` quantized the way bitsandbytes quantizes a checkpoint it loads."""
    shape = (linear.in_features, linear.out_features)
    if kind == "bnb-8bit":
        q = bnb.nn.Linear8bitLt(*shape, bias=linear.bias is not None, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(*shape, bias=linear.bias is not None, compute_dtype=torch.float32, quant_type="nf4")
    q.load_state_dict(linear.state_dict())
    return q.to("cpu")  # .to(device) quantizes


def dequantized(model: nn.Module) -> nn.Module:
    """A float copy holding exactly the weights the quantized layers represent."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            scheme = quant_scheme(child)
            if scheme is None:
                continue
            lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(scheme.dequantize(child).float())
                if child.bias is not None:
                    lin.bias.copy_(child.bias.float())
            setattr(parent, name, lin)
    return model


QUANT = ["bnb-8bit", "bnb-4bit", "torchao-int8", "torchao-int4"]


@pytest.mark.parametrize("case,path", PATHS, ids=IDS, indirect=["path"])
@pytest.mark.parametrize("kind", QUANT)
def test_quantized_base(case, path, kind, tmp_path):
    """Train and eval forward equal the dequantized float model with the same adapter within the
    base's own quantization noise; gradients agree; save/load round-trips; merging re-quantizes
    (bitsandbytes) within the noise, or is refused clearly and leaves the model as it was (torchao)."""
    base = quantize(field_llama(), kind)
    float_base = dequantized(base)
    with torch.no_grad():  # the base alone against the float model it was made from (eval: int8 activations too)
        noise = max((quantize(field_llama(), kind).train(t)(input_ids=IDS_IN).logits
                     - field_llama()(input_ids=IDS_IN).logits).abs().max().item() for t in (True, False))
    model, ref = adapted(case, base), adapted(case, float_base)
    assert any(layer.spec.quantized for layer in model.base_model.adapter_layers())

    # training first: bitsandbytes' CPU 4-bit inference forward repacks the weight for itself
    model.train(), ref.train()
    out, want = logits(model), logits(ref)
    assert (out - want).abs().max().item() <= max(noise, 1e-5)
    out.pow(2).mean().backward()
    want.pow(2).mean().backward()
    assert_grads_close(adapter_grads(model), adapter_grads(ref), rel=0.05)

    model.eval(), ref.eval()
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            err = (logits(model) - logits(ref)).abs().max().item()
        # eval-mode 8-bit also quantizes the activations, which the adapter has changed: the same
        # noise source acting on other inputs (seen up to 1.5x the base's own noise, MiSS mini)
        assert err <= 2 * noise, f"eval (grad={grad}): {err:.3g} > 2 x the base's quantization noise {noise:.3g}"

    with torch.no_grad():
        before, want = logits(model), logits(ref)
    model.save_pretrained(tmp_path)
    again = dt.PeftModel.from_pretrained(quantize(field_llama(), kind), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(again), before, rtol=0, atol=1e-6)

    layer = next(model.base_model.adapter_layers())
    if quant_scheme(layer.base_layer).requantize is None:  # torchao: its configs cannot be re-applied here
        with pytest.raises(ValueError, match=r"Module '.*proj'.*quantized.*cannot re-quantize"):
            model.merge_and_unload()
        assert not any(layer.merged for layer in model.base_model.adapter_layers())
        with torch.no_grad():
            torch.testing.assert_close(logits(model), before, rtol=0, atol=0)
        return
    # bitsandbytes: dequantize, compose, re-quantize. Each merged layer stays quantized and holds the
    # float merge (dequantized W + ΔW) quantized the way the back end quantizes a checkpoint it loads;
    # the other layers are untouched. (Fresh models: the CPU 4-bit eval forward above repacked the
    # weights with rounded scales.)
    model, ref = adapted(case, quantize(field_llama(), kind)), adapted(case, dequantized(quantize(field_llama(), kind)))
    targets = set(model.base_model.targeted_module_names)
    before = {n.removesuffix(".base_layer"): quant_scheme(m).dequantize(m)
              for n, m in model.get_base_model().named_modules() if quant_scheme(m)}
    with pytest.warns(UserWarning, match="re-quantizes"):
        merged = model.merge_and_unload()
    float_merged = ref.merge_and_unload()
    assert not any(isinstance(m, dt.AdapterLayer) for m in merged.modules())
    for name, weight in before.items():
        layer = merged.get_submodule(name)
        want = bnb_layer(float_merged.get_submodule(name), kind) if name in targets else None
        got = quant_scheme(layer).dequantize(layer)
        torch.testing.assert_close(got, weight if want is None else quant_scheme(want).dequantize(want), rtol=0, atol=0, msg=name)


class OwnForwardLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_unknown_layer_types_are_refused_at_creation():
    """A Linear subclass with its own forward, or a weight that is not plain float, is refused by
    name before anything is changed: reading its W or skipping its forward would be silently wrong."""
    for method_case in FIELD:
        model = field_llama()
        layer = model.model.layers[0].self_attn.q_proj
        model.model.layers[0].self_attn.q_proj = OwnForwardLinear(layer.in_features, layer.out_features, bias=False)
        config = config_of(method_case)
        config.target_modules = ["q_proj"]
        with pytest.raises(dt.UnsupportedModuleError, match=r"'model.layers.0.self_attn.q_proj' \(OwnForwardLinear\).*own forward"):
            dt.get_peft_model(model, config)
        assert not any(isinstance(m, dt.AdapterLayer) for m in model.modules())

    model = field_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight = nn.Parameter(torch.zeros(128, 64, dtype=torch.int8), requires_grad=False)
    with pytest.raises(dt.UnsupportedModuleError, match=r"'model.layers.0.mlp.up_proj'.*dtype torch.int8"):
        dt.get_peft_model(model, dt.BoneConfig(r=8, target_modules=["up_proj"]))


def test_prepare_model_for_kbit_training():
    """PEFT's pre-k-bit-training step: base frozen, half-precision non-quantized tensors in fp32,
    gradient checkpointing on with inputs that require grad, so reentrant checkpointing trains."""
    model = quantize(field_llama(torch.bfloat16), "bnb-8bit")
    model.is_loaded_in_8bit = True  # as transformers marks a model loaded with BitsAndBytesConfig
    prepared = dt.prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": True})
    assert prepared is model
    assert model.is_gradient_checkpointing
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.dtype in (torch.float32, torch.int8) for p in model.parameters())
    peft_model = dt.get_peft_model(model, dt.BoneConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    peft_model.train()
    logits(peft_model).float().pow(2).mean().backward()
    grads = adapter_grads(peft_model)
    assert len(grads) == 4 and all(g.abs().sum() > 0 for g in grads.values())


# ================================================================ meta device
def _copy_foreign_buffers(model: nn.Module, ref: nn.Module) -> None:
    """Non-persistent buffers of the base model (rotary tables) from ``ref``; the adapters' own
    derived buffers are left to be derived again."""
    derived = {n for n, m in model.named_modules() if isinstance(m, DerivedBuffers)}
    ref_buffers = dict(ref.named_buffers())
    for name, buf in model.named_buffers():
        if name.rpartition(".")[0] not in derived:
            buf.copy_(ref_buffers[name])


@pytest.mark.parametrize("case,path", PATHS, ids=IDS, indirect=["path"])
def test_meta_creation_trains_on_meta_and_materialises_identically(case, path):
    """Created on meta: the training step runs shape-only (how kernel and memory budgets are
    counted at 7B shapes); ``to_empty`` + the state dict gives the model a normal creation gives,
    seed-derived buffers (FourierFT positions, RandLoRA bases, AdaLoRA's ranknum) included."""
    with torch.device("meta"):
        base = field_llama()
    model = dt.get_peft_model(base, config_of(case))
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    model.train()
    out = model(input_ids=IDS_IN.to("meta")).logits
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for n, p in model.named_parameters() if p.requires_grad)

    ref = adapted(case)
    model.to_empty(device="cpu")
    model.load_state_dict(ref.state_dict(), strict=True)
    _copy_foreign_buffers(model, ref)
    for (name, buf), (_, want) in zip(model.named_buffers(), ref.named_buffers()):
        assert torch.equal(buf, want), name
    model.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(model), logits(ref), rtol=0, atol=0)


# ================================================================ the README table
README = __import__("pathlib").Path(__file__).resolve().parents[1] / "README.md"
TABLE_NAMES = {"BONE": "Bone / BAT", "MISS": "MiSS", "ADALORA": "AdaLoRA", "FOURIERFT": "FourierFT", "RANDLORA": "RandLoRA"}
COLUMN_TESTS = {
    "autocast bf16": test_autocast_matches_fp32, "autocast fp16": test_autocast_matches_fp32,
    "checkpointing": test_gradient_checkpointing_matches_plain_backward, "bf16 base": test_bf16_base_trains_like_fp32,
    "bnb 8-bit": test_quantized_base, "bnb 4-bit": test_quantized_base, "torchao int8": test_quantized_base,
    "torchao int4": test_quantized_base,
    "meta init": test_meta_creation_trains_on_meta_and_materialises_identically,
}


def test_training_conditions_table_matches_the_tests():
    """Each row of README's 'Training conditions' table is a method with cases in FIELD; each
    column is a test here parametrized over FIELD; quantized cells say what merging does, as the
    back end's ``QuantScheme.requantize`` decides (test_quantized_base checks it)."""
    body = README.read_text(encoding="utf-8").split("## Training conditions", 1)[1].split("\n## ", 1)[0]
    lines = [ln.strip() for ln in body.splitlines() if ln.strip().startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")][1:]
    assert header == list(COLUMN_TESTS), header
    rows = {cells[0]: dict(zip(header, cells[1:])) for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:])}
    peft_types = {str(getattr(c.config().peft_type, "value", c.config().peft_type)) for c in FIELD}
    methods = {TABLE_NAMES.get(t, t) for t in peft_types}
    assert set(rows) == methods, (set(rows), methods)
    for name, row in rows.items():
        for column, cell in row.items():
            assert cell.startswith("✓"), f"{name} / {column}: {cell!r}"
            merge = {"bnb 8-bit": "merge re-quantizes", "bnb 4-bit": "merge re-quantizes",
                     "torchao int8": "merge refused", "torchao int4": "merge refused"}.get(column)
            assert cell == (f"✓ ({merge})" if merge else "✓"), (name, column, cell)


def test_inference_cache_is_automatic_off_accelerators():
    """The inference cache (one extra weight copy per layer) is on for host memory only; on an
    accelerator (meta stands in for one) the adapter path runs unless it is asked for."""
    case = next(c for c in FIELD if c.id.startswith("fourierft"))
    with torch.device("meta"):
        base = field_llama()
    model = dt.get_peft_model(base, config_of(case)).eval()
    layers = list(model.base_model.adapter_layers())
    with torch.no_grad():
        model(input_ids=IDS_IN.to("meta"))
    assert all(layer._cache is None for layer in layers)
    for layer in layers:
        layer.inference_cache = True
    with torch.no_grad():
        model(input_ids=IDS_IN.to("meta"))
    assert all(layer._cache is not None for layer in layers)

    cpu_model = adapted(case).eval()
    with torch.no_grad():
        cpu_model(input_ids=IDS_IN)
    assert all(layer._cache is not None for layer in cpu_model.base_model.adapter_layers())


@pytest.mark.parametrize("case", FIELD, ids=[c.id for c in FIELD])
def test_inference_cache_follows_casts_and_writes_through_data(case):
    """The eval-mode output never comes from a stale cached weight: after ``model.to(bf16)``, and
    after adapter tensors are rewritten through ``.data`` (EMA, weight averaging, hand-written SGD),
    which version counters do not see."""
    model = adapted(case).eval()
    with torch.no_grad():
        model(input_ids=IDS_IN)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.data.add_(0.05)
        got = logits(model)
        with torch.enable_grad():
            want = logits(model)  # the adapter path: no cache while gradients are wanted
        torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=1e-5)
        model.to(torch.bfloat16)
        got = logits(model)
        assert got.dtype == torch.bfloat16
        with torch.enable_grad():
            want = logits(model)
        torch.testing.assert_close(got.float(), want.detach().float(), rtol=0.05, atol=0.05)
