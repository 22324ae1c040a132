"""Tiny models shared by the tests (random weights, built from configs; nothing is downloaded)."""

from __future__ import annotations

import torch
import torch.nn as nn


class MLP(nn.Module):
    """lin0 (10→20), relu, drop, lin1 (20→8), with a bias on every layer."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 8, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.drop(self.relu(self.lin0(x))))


class DeepMLP(nn.Module):
    """Numbered blocks (layers.<i>.proj) for layers_to_transform tests; 16→16 everywhere."""

    def __init__(self, n: int = 3, width: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(width, width), "out": nn.Linear(width, width)}) for _ in range(n))
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = torch.relu(block["out"](block["proj"](x)))
        return self.head(x)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(3, 8, 3)
        self.lin0 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin0(self.conv2d(x).mean(dim=(2, 3)))


def mlp_input(batch: int = 6) -> torch.Tensor:
    return torch.arange(batch * 10, dtype=torch.float32).view(batch, 10) / 30.0


def tiny_llama(layers: int = 2, hidden: int = 16, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert_cls(seed: int = 0, num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def token_input(batch: int = 2, length: int = 7, vocab: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Give every trainable adapter tensor a deterministic non-trivial value (so outputs differ from base)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
