"""Training conditions, PEFT 0.21.2 vs deltatune side by side, on models that tests/test_field.py
does not use: a tiny GPT-2 (Conv1D layers) and a tiny Qwen2 (GQA, biased q/k/v projections).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/field_vs_peft.py

Every method (FourierFT, RandLoRA, AdaLoRA, Bone, BAT; PEFT's ``MissConfig`` for the last two) runs
the same scenario in both libraries, with the same adapter values (deltatune's PEFT-format state
dict loaded into PEFT through ``set_peft_model_state_dict``). Each library is measured against a
reference that does not use the path under test:

* fp32 eager parity: the two libraries against each other (logits, gradients by parameter).
* autocast bf16/fp16, checkpointing (reentrant, non-reentrant), bf16 base: the largest relative
  gradient error over the adapter parameters, ||g - g_ref|| / ||g_ref||, against the same library's
  fp32 eager run without checkpointing. Silently wrong above 0.1 (autocast, bf16) or 1e-4
  (checkpointing).
* bitsandbytes 8-bit, 4-bit nf4 (CPU back end), torchao int8 weight-only: the same adapter on a
  float model holding the dequantized weights (dequantized here with the back ends' own functions).
  Train-mode and eval-mode (with and without grad) logits must stay within the quantization noise of
  the base alone (the quantized base against the float model it came from) and gradients within 5 %.
  The train step runs before any eval: bitsandbytes' CPU Linear4bit repacks its weight at its first
  eval-mode no-grad forward and gives wrong gradients afterwards (an upstream bug).
* merge_and_unload on each quantized base: either refused (and the model left as it was) or the
  merged model's logits within 2x the base's quantization noise of the float reference (re-quantizing
  W + dW moves every weight by up to one quantization step, so a merge is at best about as noisy as
  the base itself).
* meta creation: the adapter created on a ``meta`` base, one shape-only training step there, then
  ``to_empty`` + the state dict of a normally created model (base buffers such as rotary tables
  copied): logits and gradients must equal the normal model's.

Writes benchmarks/results/field_vs_peft.md and .json.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pathlib
import time
import traceback
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnbF  # noqa: E402
import peft  # noqa: E402
import transformers  # noqa: E402
from torchao.quantization import Int8WeightOnlyConfig, quantize_  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

import deltatune as dt  # noqa: E402

transformers.logging.set_verbosity_error()
RESULTS = pathlib.Path(__file__).resolve().parent / "results"

# ------------------------------------------------------------------------------------- models
VOCAB = {"gpt2": 96, "qwen2": 128}
TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # Conv1D (in, out) weights
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def build(kind: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=96, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(cfg)
    else:  # every decoder Linear a multiple of 64 wide: bitsandbytes' 4-bit blocks
        cfg = Qwen2Config(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = Qwen2ForCausalLM(cfg)
    return model.to(dtype)


def batch(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB[kind], (2, 12), generator=g)
    labels = torch.randint(0, VOCAB[kind], (2, 12), generator=g)
    return ids, labels


# ------------------------------------------------------------------------------------ methods
METHODS = {
    "FourierFT": (lambda t: dt.FourierFTConfig(n_frequency=24, scaling=10.0, target_modules=t),
                  lambda t: peft.FourierFTConfig(n_frequency=24, scaling=10.0, target_modules=t)),
    "RandLoRA": (lambda t: dt.RandLoraConfig(r=8, randlora_alpha=16, target_modules=t),
                 lambda t: peft.RandLoraConfig(r=8, randlora_alpha=16, target_modules=t)),
    "AdaLoRA": (lambda t: dt.AdaLoraConfig(total_step=10, init_r=6, target_r=3, target_modules=t),
                lambda t: peft.AdaLoraConfig(total_step=10, init_r=6, target_r=3, target_modules=t)),
    "Bone": (lambda t: dt.BoneConfig(r=8, init_weights=True, target_modules=t),
             lambda t: peft.MissConfig(r=8, init_weights=True, target_modules=t)),
    "BAT": (lambda t: dt.BoneConfig(r=8, init_weights="bat", target_modules=t),
            lambda t: peft.MissConfig(r=8, init_weights="bat", target_modules=t)),
}
LIBS = ("peft", "deltatune")


class Refused(Exception):
    """get_peft_model (or merge_and_unload) declined the layer with an error: not a crash."""


def deliberate(e: BaseException) -> bool:
    """An error a library raises on purpose about the layer or the request (a refusal), as opposed
    to one raised by torch or a back end in the middle of the computation (a crash)."""
    return isinstance(e, (ValueError, TypeError)) and not isinstance(e, NotImplementedError)


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


_VALUES: dict = {}


def adapter_values(method: str, kind: str) -> dict:
    """The adapter values both libraries get: a deltatune fp32 model filled from a seeded generator
    in the order of its parameter names, exported in PEFT's checkpoint format."""
    key = (method, kind)
    if key not in _VALUES:
        model = dt.get_peft_model(build(kind), METHODS[method][0](TARGETS[kind]))
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name in sorted(n for n, p in params.items() if p.requires_grad):
                params[name].copy_(torch.randn(params[name].shape, generator=g) * 0.05)
        _VALUES[key] = {k: v.clone() for k, v in dt.get_peft_model_state_dict(model).items()}
    return _VALUES[key]


def load_values(lib: str, model: nn.Module, method: str, kind: str) -> None:
    values = adapter_values(method, kind)
    if lib == "peft":
        peft.set_peft_model_state_dict(model, values)
    else:
        dt.set_peft_model_state_dict(model, values)


def adapt(lib: str, method: str, kind: str, base: nn.Module, load: bool = True) -> nn.Module:
    config = METHODS[method][0 if lib == "deltatune" else 1](TARGETS[kind])
    try:
        model = (dt.get_peft_model if lib == "deltatune" else peft.get_peft_model)(base, config)
    except Exception as e:  # refused at creation: clear, nothing silently wrong
        if not deliberate(e):
            raise
        raise Refused(first_line(e)) from e
    if load:
        load_values(lib, model, method, kind)
    return model


def loss_of(model: nn.Module, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids, labels = batch(kind)
    logits = model(input_ids=ids.to(next(model.parameters()).device)).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.to(logits.device).flatten())
    return logits, loss


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def grad_error(got: dict, want: dict, names: set[str], trained: set[str] | None = None) -> tuple[float, str]:
    """Largest relative gradient error over the reference's adapter parameters, and a note naming
    parameters that train here but not in the reference (or lack a gradient here)."""
    note = ""
    if trained is not None and trained != names:
        extra = sorted(trained - names)
        if extra:
            note = f"{len(extra)} extra trainable, e.g. {extra[0].split('.')[-2 if extra[0].endswith('.default') else -1]}"
    missing = sorted(names - set(got))
    if missing:
        return float("inf"), (note + "; " if note else "") + f"{len(missing)} without gradient, e.g. {missing[0]}"
    errs = [((got[n] - want[n]).norm() / want[n].norm().clamp_min(1e-12)).item() for n in names]
    return max(errs), note


def canonical(lib: str, name: str) -> str:
    """One name for the same tensor in both libraries (module path + PEFT attribute name)."""
    if lib == "deltatune":
        name = name.replace(".adapters.default.", ".").replace("bone_block", "miss_block")
    else:
        name = name.removesuffix(".default")
    return name


def result(status: str, **kw) -> dict:
    return {"status": status, **kw}


# ---------------------------------------------------------------------------- fp32 references
_REF: dict = {}


def fp32_reference(lib: str, method: str, kind: str) -> dict:
    key = (lib, method, kind)
    if key not in _REF:
        model = adapt(lib, method, kind, build(kind)).train()
        logits, loss = loss_of(model, kind)
        loss.backward()
        _REF[key] = {"grads": grads(model), "names": trainable(model), "logits": logits.detach()}
    return _REF[key]


def parity(method: str, kind: str) -> dict:
    """fp32 eager: PEFT and deltatune with the same adapter values against each other."""
    refs = {}
    for lib in LIBS:
        try:
            refs[lib] = fp32_reference(lib, method, kind)
        except Refused as e:
            return result("refused", lib=lib, error=str(e))
    logit_err = (refs["peft"]["logits"] - refs["deltatune"]["logits"]).abs().max().item()
    theirs = {canonical("peft", n): g for n, g in refs["peft"]["grads"].items()}
    ours = {canonical("deltatune", n): g for n, g in refs["deltatune"]["grads"].items()}
    common = {n for n in set(theirs) & set(ours) if theirs[n].shape == ours[n].shape}
    gerr = max(((ours[n] - theirs[n]).norm() / theirs[n].norm().clamp_min(1e-12)).item() for n in common)
    ok = logit_err <= 1e-4 and gerr <= 1e-4 and len(common) == len(theirs)
    return result("ok" if ok else "wrong", metric=max(logit_err, gerr), logit_err=logit_err, grad_err=gerr,
                  compared=len(common), peft_params=len(theirs), deltatune_params=len(ours))


# ------------------------------------------------------------------- precision and checkpointing
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def run_autocast(lib: str, method: str, kind: str, half: str) -> dict:
    ref = fp32_reference(lib, method, kind)
    model = adapt(lib, method, kind, build(kind)).train()
    with torch.autocast("cpu", dtype=HALF[half]):
        logits, loss = loss_of(model, kind)
    loss.backward()
    err, note = grad_error(grads(model), ref["grads"], ref["names"], trainable(model))
    if logits.dtype != HALF[half]:
        note = ", ".join(filter(None, [note, f"logits {logits.dtype}"]))
    return result("ok" if err <= 0.1 and not note else "wrong", metric=err, tol=0.1, note=note)


def run_checkpointing(lib: str, method: str, kind: str, reentrant: bool) -> dict:
    ref = fp32_reference(lib, method, kind)
    model = adapt(lib, method, kind, build(kind))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    _, loss = loss_of(model, kind)
    loss.backward()
    err, note = grad_error(grads(model), ref["grads"], ref["names"], trainable(model))
    return result("ok" if err <= 1e-4 and not note else "wrong", metric=err, tol=1e-4, note=note)


def run_bf16_base(lib: str, method: str, kind: str) -> dict:
    ref = fp32_reference(lib, method, kind)
    model = adapt(lib, method, kind, build(kind, torch.bfloat16)).train()
    _, loss = loss_of(model, kind)
    loss.backward()
    err, note = grad_error(grads(model), ref["grads"], ref["names"], trainable(model))
    return result("ok" if err <= 0.1 and not note else "wrong", metric=err, tol=0.1, note=note)


# ------------------------------------------------------------------------------ quantized bases
QUANT = {"bnb-8bit": "bnb 8-bit", "bnb-4bit": "bnb 4-bit nf4", "torchao-int8": "torchao int8"}


def quantize(model: nn.Module, kind: str) -> nn.Module:
    """Every Linear of the decoder layers quantized (embeddings and lm_head stay float)."""
    layers = model.model.layers
    if kind == "torchao-int8":
        quantize_(layers, Int8WeightOnlyConfig())
        return model
    for parent in list(layers.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            if kind == "bnb-8bit":
                q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                        has_fp16_weights=False)
            else:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.float32, quant_type="nf4")
            q.load_state_dict(child.state_dict())
            setattr(parent, name, q.to("cpu"))  # moving the layer quantizes its weight
    return model


def dequantize(layer: nn.Module) -> torch.Tensor | None:
    """The (out, in) float weight a quantized layer stands for; None for a float layer.
    Read before any forward (bitsandbytes' 4-bit eval forward repacks the weight on CPU)."""
    w = layer.weight if isinstance(layer, nn.Linear) else None
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return w.data.float() * w.SCB.float()[:, None] / 127.0
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnbF.dequantize_4bit(w.data, w.quant_state).float()
    if w is not None and type(w) not in (torch.Tensor, nn.Parameter):
        return w.dequantize().float()
    return None


def dequantized_copy(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            weight = dequantize(child)
            if weight is None:
                continue
            lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(weight)
                if child.bias is not None:
                    lin.bias.copy_(child.bias.float())
            setattr(parent, name, lin)
    return model


_NOISE: dict = {}


def quant_noise(kind: str) -> float:
    """The quantized base alone against the float model it was made from (train and eval mode)."""
    if kind not in _NOISE:
        ids, _ = batch("qwen2")
        with torch.no_grad():
            float_logits = build("qwen2")(input_ids=ids).logits
            _NOISE[kind] = max((quantize(build("qwen2"), kind).train(mode)(input_ids=ids).logits - float_logits)
                               .abs().max().item() for mode in (True, False))
    return _NOISE[kind]


def quantized_pair(lib: str, method: str, qkind: str) -> tuple[nn.Module, nn.Module]:
    base = quantize(build("qwen2"), qkind)
    float_base = dequantized_copy(base)
    return adapt(lib, method, "qwen2", base), adapt(lib, method, "qwen2", float_base)


def run_quantized(lib: str, method: str, qkind: str) -> dict:
    noise = quant_noise(qkind)
    model, ref = quantized_pair(lib, method, qkind)
    stage = "train forward"
    try:
        model.train(), ref.train()
        out, loss = loss_of(model, "qwen2")
        want, ref_loss = loss_of(ref, "qwen2")
        train_err = (out.float() - want).abs().max().item()
        stage = "backward"
        loss.backward()
        ref_loss.backward()
        theirs = {n.replace(".base_layer", ""): g for n, g in grads(ref).items()}
        mine = {n.replace(".base_layer", ""): g for n, g in grads(model).items()}
        gerr, note = grad_error(mine, theirs, {n.replace(".base_layer", "") for n in trainable(ref)},
                                {n.replace(".base_layer", "") for n in trainable(model)})
        model.eval(), ref.eval()
        eval_errs = []
        for grad_on in (True, False):
            stage = f"eval forward ({'grad' if grad_on else 'no grad'})"
            with torch.set_grad_enabled(grad_on):
                ids, _ = batch("qwen2")
                eval_errs.append((model(input_ids=ids).logits.float() - ref(input_ids=ids).logits).abs().max().item())
    except Exception as e:
        raise RuntimeError(f"{stage}: {first_line(e)}") from e
    logit_err = max(train_err, *eval_errs)
    ok = logit_err <= max(noise, 1e-5) and gerr <= 0.05 and not note
    return result("ok" if ok else "wrong", metric=logit_err, noise=noise, grad_err=gerr, train_err=train_err,
                  eval_errs=eval_errs, tol=noise, note=note)


def run_merge(lib: str, method: str, qkind: str, after_eval: bool = False) -> dict:
    """Refused with the model left as it was, or merged as well as re-quantizing allows: the merged
    logits against (a) the float reference and (b) the ideal merge, W_deq + dW merged in float by the
    same library and quantized again by the back end (what dequantize-add-requantize gives).
    ``after_eval``: an eval-mode no-grad forward first (bitsandbytes' CPU 4-bit layer repacks its
    weight there and rounds its scales; a merge must read the repacked layout)."""
    noise = quant_noise(qkind)
    model, ref = quantized_pair(lib, method, qkind)
    ids, _ = batch("qwen2")
    ref.eval()
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        # train mode: no bitsandbytes 4-bit CPU repack; after_eval: the eval forward users run first
        before = model.train(not after_eval)(input_ids=ids).logits
    try:
        merged = model.merge_and_unload()
    except Exception as e:
        with torch.no_grad():
            moved = (model(input_ids=ids).logits - before).abs().max().item()
        status = "refused" if deliberate(e) and moved == 0 else "crash" if moved == 0 else "wrong"
        return result(status, error=first_line(e), moved_after_refusal=moved, noise=noise)
    with torch.no_grad():
        out = merged.eval()(input_ids=ids).logits.float()
        ideal = quantize(ref.merge_and_unload(), qkind).eval()(input_ids=ids).logits
    err, err_ideal = (out - want).abs().max().item(), (out - ideal).abs().max().item()
    ideal_err = (ideal - want).abs().max().item()  # what re-quantizing costs by itself
    ok = err <= max(noise, 1.5 * ideal_err) or err_ideal <= noise / 4
    return result("ok" if ok else "wrong", metric=err, vs_ideal=err_ideal, ideal_err=ideal_err, noise=noise, tol=noise)


# ------------------------------------------------------------------------------- combined recipes
def run_combo(lib: str, method: str, kind: str, quant: str | None = None, base_dtype: torch.dtype = torch.float32,
              half: str | None = None, reentrant: bool | None = None) -> dict:
    """Conditions stacked the way recipes stack them (QLoRA: 4-bit base, bf16 autocast, checkpointing):
    gradients against the same adapter on the float (dequantized) model, fp32 eager, no checkpointing."""
    if quant is None:
        base, float_base = build(kind, base_dtype), build(kind)
    else:
        base = quantize(build(kind), quant)
        float_base = dequantized_copy(base)
    model, ref = adapt(lib, method, kind, base), adapt(lib, method, kind, float_base)
    ref.train()
    loss_of(ref, kind)[1].backward()
    if reentrant is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    with torch.autocast("cpu", dtype=HALF.get(half, torch.bfloat16), enabled=half is not None):
        _, loss = loss_of(model, kind)
    loss.backward()
    strip = lambda names: {n.replace(".base_layer", "") for n in names}  # noqa: E731
    got = {n.replace(".base_layer", ""): g for n, g in grads(model).items()}
    want = {n.replace(".base_layer", ""): g for n, g in grads(ref).items()}
    err, note = grad_error(got, want, strip(trainable(ref)), strip(trainable(model)))
    tol = 0.1 if half is not None or base_dtype != torch.float32 else 0.05
    return result("ok" if err <= tol and not note else "wrong", metric=err, tol=tol, note=note)


# ------------------------------------------------------------------ changes between eval forwards
def run_change_after_eval(lib: str, method: str, kind: str, change: str) -> dict:
    """An eval (no-grad) forward, then a change users make between evaluations, then another eval
    forward; it must equal a model built directly in the changed state.
    ``cast``: ``model.to(torch.bfloat16)`` (evaluate, then cast for inference or export).
    ``data``: every adapter parameter updated through ``.data`` (EMA updates, hand-written SGD,
    weight averaging), which does not bump the tensor's version counter."""
    ids, _ = batch(kind)
    model = adapt(lib, method, kind, build(kind)).eval()
    fresh = adapt(lib, method, kind, build(kind)).eval()
    with torch.no_grad():
        model(input_ids=ids)
        if change == "cast":
            model.to(torch.bfloat16)
            fresh.to(torch.bfloat16)
        else:
            for m in (model, fresh):
                for p in m.parameters():
                    if p.requires_grad:
                        p.data.add_(0.05)
        out = model(input_ids=ids).logits.float()
        want = fresh(input_ids=ids).logits.float()
    err = (out - want).abs().max().item() / want.abs().max().item()
    return result("ok" if err <= 1e-5 else "wrong", metric=err, tol=1e-5)


# ------------------------------------------------------------------------------------ meta device
def run_meta(lib: str, method: str, kind: str) -> dict:
    ref = adapt(lib, method, kind, build(kind)).train()
    with torch.device("meta"):
        base = build(kind)
    model = adapt(lib, method, kind, base, load=False)
    stage = "meta training step"
    try:
        model.train()
        _, loss = loss_of(model, kind)
        loss.backward()
        model.zero_grad(set_to_none=True)
        stage = "to_empty + load_state_dict"
        model.to_empty(device="cpu")  # unties tied weights (a new tensor per module)
        note = ""
        try:
            model.load_state_dict(ref.state_dict(), strict=True)
        except RuntimeError as e:  # transformers' recipe re-ties before loading
            note = "strict load before tie_weights(): " + " ".join(str(e).split())[:200]
            model.get_base_model().tie_weights()
            model.load_state_dict(ref.state_dict(), strict=True)
        # the base model's non-persistent buffers (rotary tables) are not in any state dict
        own = {n for n, _ in build(kind).named_buffers()}
        ref_buffers = dict(ref.named_buffers())
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name.removeprefix("base_model.model.").replace(".base_layer", "") in own:
                    buf.copy_(ref_buffers[name])
        stage = "materialised forward/backward"
        out, loss = loss_of(model, kind)
        want, ref_loss = loss_of(ref, kind)
        loss.backward()
        ref_loss.backward()
    except Exception as e:
        raise RuntimeError(f"{stage}: {first_line(e)}") from e
    logit_err = (out - want).abs().max().item()
    gerr, gnote = grad_error(grads(model), grads(ref), trainable(ref), trainable(model))
    ok = logit_err <= 1e-6 and gerr <= 1e-5 and not gnote
    return result("ok" if ok else "wrong", metric=max(logit_err, gerr), logit_err=logit_err, grad_err=gerr, tol=1e-6,
                  note=", ".join(filter(None, [gnote, note])))


# --------------------------------------------------------------------------------------- driver
CONDITIONS: list[tuple[str, callable]] = []
for _kind in ("gpt2", "qwen2"):
    CONDITIONS += [
        (f"autocast bf16 ({_kind})", lambda l, m, k=_kind: run_autocast(l, m, k, "bf16")),
        (f"autocast fp16 ({_kind})", lambda l, m, k=_kind: run_autocast(l, m, k, "fp16")),
        (f"checkpointing reentrant ({_kind})", lambda l, m, k=_kind: run_checkpointing(l, m, k, True)),
        (f"checkpointing non-reentrant ({_kind})", lambda l, m, k=_kind: run_checkpointing(l, m, k, False)),
        (f"bf16 base ({_kind})", lambda l, m, k=_kind: run_bf16_base(l, m, k)),
    ]
for _q, _label in QUANT.items():
    CONDITIONS.append((f"{_label} (qwen2)", lambda l, m, q=_q: run_quantized(l, m, q)))
for _q, _label in QUANT.items():
    CONDITIONS.append((f"merge_and_unload, {_label}", lambda l, m, q=_q: run_merge(l, m, q)))
CONDITIONS.append(("merge_and_unload, bnb 4-bit nf4, after an eval forward",
                   lambda l, m: run_merge(l, m, "bnb-4bit", after_eval=True)))
CONDITIONS += [
    ("bf16 base + autocast bf16 (gpt2)", lambda l, m: run_combo(l, m, "gpt2", base_dtype=torch.bfloat16, half="bf16")),
    ("bf16 base + autocast bf16 + reentrant (qwen2)",
     lambda l, m: run_combo(l, m, "qwen2", base_dtype=torch.bfloat16, half="bf16", reentrant=True)),
    ("bnb 4-bit + autocast bf16 + non-reentrant (qwen2)",
     lambda l, m: run_combo(l, m, "qwen2", quant="bnb-4bit", half="bf16", reentrant=False)),
    ("bnb 8-bit + reentrant (qwen2)", lambda l, m: run_combo(l, m, "qwen2", quant="bnb-8bit", reentrant=True)),
    ("torchao int8 + autocast bf16 (qwen2)", lambda l, m: run_combo(l, m, "qwen2", quant="torchao-int8", half="bf16")),
]
CONDITIONS += [
    ("eval, .to(bfloat16), eval (qwen2)", lambda l, m: run_change_after_eval(l, m, "qwen2", "cast")),
    ("eval, params updated via .data, eval (qwen2)", lambda l, m: run_change_after_eval(l, m, "qwen2", "data")),
]
for _kind in ("gpt2", "qwen2"):
    CONDITIONS.append((f"meta creation + materialise ({_kind})", lambda l, m, k=_kind: run_meta(l, m, k)))


def run_cell(fn, lib: str, method: str) -> dict:
    torch.manual_seed(0)
    try:
        return fn(lib, method)
    except Refused as e:
        return result("refused", error=str(e))
    except Exception as e:
        msg = str(e) if isinstance(e, RuntimeError) and ": " in str(e) and e.__cause__ else first_line(e)
        return result("crash", error=msg.splitlines()[0][:240], trace=traceback.format_exc(limit=-3))


def fmt(x: float) -> str:
    return "inf" if x == float("inf") else f"{x:.1e}"


class Notes:
    """Footnotes, one per distinct text (the same refusal in many cells gets one number)."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def ref(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        return f"[{self.texts.index(text) + 1}]"


def cell(r: dict, notes: Notes) -> str:
    s = r["status"]
    if s == "crash":
        return "crash " + notes.ref(r["error"])
    if s == "refused":
        extra = "" if r.get("moved_after_refusal", 0) == 0 else f"; the model changed by {fmt(r['moved_after_refusal'])}"
        return "refused " + notes.ref(r["error"] + extra)
    mark = "✓" if s == "ok" else "WRONG"
    if "train_err" in r:  # quantized training/eval: logit error / noise
        text = f"{mark} {fmt(r['metric'])} / {fmt(r['noise'])}"
        if r["grad_err"] > 0.05:
            text += f", grad {fmt(r['grad_err'])}"
    elif "vs_ideal" in r:  # merge
        text = f"{mark} {fmt(r['metric'])} / {fmt(r['noise'])}, ideal {fmt(r['ideal_err'])} (Δ {fmt(r['vs_ideal'])})"
    else:
        text = f"{mark} {fmt(r['metric'])}"
    if r.get("note"):
        text += " " + notes.ref(r["note"])
    return text


def fp32_cell(r: dict, notes: Notes) -> str:
    if r["status"] == "refused":
        return f"{r['lib']} refused " + notes.ref(r["error"])
    return ("✓" if r["status"] == "ok" else "DIFFER") + f" logits {fmt(r['logit_err'])}, grads {fmt(r['grad_err'])}"


def source_state() -> str:
    """The commit measured, and whether src/ had uncommitted changes (a shared checkout)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=RESULTS.parents[1]).stdout.strip()

    dirty = git("status", "--porcelain", "--", "src")
    return (git("rev-parse", "--short", "HEAD") or "?") + (" + uncommitted changes in src/" if dirty else "")


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="run only conditions whose name contains this (no files written)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny tensors: a second thread costs more than it gives on a shared machine
    start, cpu_start = time.perf_counter(), time.process_time()
    records = []
    rows: list[tuple[str, dict]] = []
    for kind in ("gpt2", "qwen2"):
        row = {}
        for method in METHODS:
            r = parity(method, kind)
            records.append({"condition": f"fp32 parity ({kind})", "method": method, "library": "both", **r})
            row[method] = {"both": r}
        rows.append((f"fp32 eager, PEFT vs deltatune ({kind})", row))
    for name, fn in CONDITIONS:
        if args.only not in name:
            continue
        row = {}
        for method in METHODS:
            row[method] = {}
            for lib in LIBS:
                r = run_cell(fn, lib, method)
                row[method][lib] = r
                records.append({"condition": name, "method": method, "library": lib,
                                **{k: v for k, v in r.items() if k != "trace"}})
                if r["status"] == "crash" and os.environ.get("FIELD_TRACE"):
                    print(f"--- {name} / {method} / {lib}\n{r['trace']}")
        rows.append((name, row))
        print(f"{name}: done ({time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu_start:.0f} s CPU)",
              flush=True)

    notes = Notes()
    header = "| condition | " + " | ".join(f"{m} PEFT | {m} deltatune" for m in METHODS) + " |"
    lines = [header, "|---" * (1 + 2 * len(METHODS)) + "|"]
    for name, row in rows:
        cells = []
        for method in METHODS:
            if "both" in row[method]:
                cells += [fp32_cell(row[method]["both"], notes), "(same)"]
            else:
                cells += [cell(row[method][lib], notes) for lib in LIBS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    legend = (
        "Cells: ✓ / WRONG then the measured error. Autocast, checkpointing, bf16 base: largest relative gradient "
        "error over adapter parameters vs the same library's fp32 eager run (limits 0.1, 1e-4, 0.1). Quantized: "
        "largest logit error (train, eval, eval no-grad) vs the same adapter on the dequantized float model / the "
        "base's own quantization noise (limit: the noise; gradients within 5 %). Merge: merged logits vs that float "
        "reference / noise, ideal = the float merge re-quantized by the back end vs the float reference (what "
        "re-quantizing costs by itself), Δ = merged vs ideal; correct if within max(noise, 1.5 x ideal) or Δ within "
        "noise/4; or refused, the model unchanged. Combined recipes: gradients vs the same adapter on the float "
        "(dequantized) fp32 model, eager (limit 0.1 with bf16, else 0.05). Changes between evals: largest logit "
        "difference relative to the logit scale vs a model built in the changed state (limit 1e-5). Meta: largest "
        "logit/gradient difference to a normally created model (limit 1e-6). fp32 rows: the two libraries against "
        "each other with the same adapter values."
    )
    versions = (f"deltatune at {source_state()}, torch {torch.__version__}, transformers {transformers.__version__}, "
                f"peft {peft.__version__}, bitsandbytes {bnb.__version__}")
    md = "\n".join([
        "# Training conditions: PEFT vs deltatune (benchmarks/field_vs_peft.py)", "",
        f"Models: tiny GPT-2 (Conv1D, 64 wide) and tiny Qwen2 (128 wide, GQA, biased q/k/v); all projections "
        f"adapted. {versions}. {elapsed:.0f} s wall, {cpu:.0f} s CPU.", "",
        *lines, "", legend, "",
        *[f"[{i}] {n}" for i, n in enumerate(notes.texts, 1)], "",
    ])
    print(md)
    if args.only:
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "field_vs_peft.md").write_text(md, encoding="utf-8")
    summary = {"versions": versions, "seconds": elapsed, "cpu_seconds": cpu, "records": records}
    (RESULTS / "field_vs_peft.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
