#!/usr/bin/python3
"""Makes the TorchScript fixtures of tests/jit_test.cpp with Debian's
python3-torch: four small models, each scripted and traced, and for each a
reference file with an input, the model's output, adapter matrices for some
of its layers and the output of the model whose weights are W + s B A
(computed here, in Python, by changing the weights).

  scripts/make-jit-fixtures.py [OUT_DIR]     (default: tests/data/jit)

The committed files were written by PyTorch 1.13 (Debian 12), which both
LibTorch 1.13 and 2.x load. Seeds are fixed; outputs are float32.
"""
import os
import sys

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

RANK = 2
ALPHA = 4.0  # scaling alpha / rank = 2


class Typed(nn.Module):
    """Typed members, one of them also read directly (gate.weight), and a
    method other than forward."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.gate = nn.Linear(6, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        g = torch.sigmoid(F.linear(x, self.gate.weight, self.gate.bias))
        return self.out(self.proj(x) * g)

    @torch.jit.export
    def features(self, x):
        return self.proj(x)


class CNN(nn.Module):
    """An Embedding, a Conv1d and a Conv2d, then a Linear head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.conv1 = nn.Conv1d(8, 12, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens):
        h = torch.relu(self.conv1(self.emb(tokens).transpose(1, 2)))
        h = torch.relu(self.conv2(h.unsqueeze(1)))
        return self.head(h.mean(dim=(2, 3)))


class Odd(nn.Module):
    """Layers torchlora refuses or reads specially: an Embedding with
    max_norm, a grouped Conv1d, a Conv3d, a Linear without a bias (which a
    traced module keeps no attribute for), a second name of it that the code
    never calls, and a Linear whose weight is a buffer."""

    def __init__(self):
        super().__init__()
        self.renorm = nn.Embedding(10, 4, max_norm=1.0)
        self.grouped = nn.Conv1d(4, 6, 3, groups=2)
        self.volume = nn.Conv3d(2, 3, 2)
        self.nobias = nn.Linear(4, 4, bias=False)
        # A second name for nobias, which the code never uses (saving makes
        # it a module of its own, with the same weight).
        self.alias = self.nobias
        # A Linear whose weight is a buffer, not a parameter.
        self.buffered = nn.Linear(4, 4)
        weight = self.buffered.weight.detach().clone()
        del self.buffered.weight
        self.buffered.register_buffer("weight", weight)

    def forward(self, tokens, memory, volume):
        h = self.buffered(self.nobias(self.renorm(tokens)))
        return self.grouped(h.transpose(1, 2)).sum() + self.volume(volume).sum()


class OddAttention(Odd):
    """Odd with a MultiheadAttention whose keys and values have another
    size (separate q/k/v weights); PyTorch 1.13 cannot script it, so it is
    traced only."""

    def __init__(self):
        super().__init__()
        self.cross = nn.MultiheadAttention(4, 2, kdim=6, vdim=6, batch_first=True)

    def forward(self, tokens, memory, volume):
        h = self.buffered(self.nobias(self.renorm(tokens)))
        h = h + self.cross(h, memory, memory)[0]
        return self.grouped(h.transpose(1, 2)).sum() + self.volume(volume).sum()


@torch.jit.interface
class LayerInterface(nn.Module):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        pass


class Hooked(nn.Module):
    """Runs `inner` only from a forward pre-hook."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.register_forward_pre_hook(hooked_pre)

    def forward(self, x):
        return x


def hooked_pre(self: Hooked, inputs: Tuple[torch.Tensor]) -> Tuple[torch.Tensor]:
    return (self.inner(inputs[0]),)


class Dynamic(nn.Module):
    """Layers reached in ways a GetAttr chain does not show: a ModuleList
    element chosen by an argument, a layer run by a hook (scripted only)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.hooked = Hooked()

    def forward(self, x, i: int):
        layer: LayerInterface = self.layers[i]
        return self.hooked(layer.forward(x))


class SamePadding(nn.Module):
    """A convolution with padding "same", which a trace records as
    aten::_convolution_mode."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3, padding="same")

    def forward(self, x):
        return self.conv(x)


def odd_inputs():
    torch.manual_seed(2)
    return (torch.randint(0, 10, (2, 5)), torch.randn(2, 3, 6),
            torch.randn(1, 2, 4, 4, 4))


# TorchScript twins of the models of the peft interop check
# (tests/interop/interop_models.py), whose files real peft wrote are in
# tests/data/peft-<version>/: the C++ test loads those adapters into these.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "tests", "interop"))
from interop_models import ConvNet1d, Decoder, Encoder, Mlp, Stack, TinyNet  # noqa: E402


def peft_twins():
    """name: (model, example inputs for tracing)."""
    torch.manual_seed(4)
    return {
        "tinynet": (TinyNet(), (torch.randn(5, 16), torch.randint(0, 10, (5,)),
                                torch.randn(5, 3, 6, 6))),
        "mlp12": (Mlp(), (torch.randn(6, 12),)),
        "convnet1d": (ConvNet1d(), (torch.randn(4, 3, 9),)),
        "encoder16": (Encoder(), (torch.randn(4, 3, 16),)),
        "decoder16": (Decoder(), (torch.randn(4, 3, 16), torch.randn(5, 3, 16))),
        "stack": (Stack(), (torch.randn(5, 8),)),
    }


def models():
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(),
        nn.Linear(16, 4))
    layer = nn.TransformerEncoderLayer(
        16, 2, 32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    return {
        # name: (model, input, adapted attributes (path, attribute))
        "mlp": (mlp, torch.randn(5, 6),
                [("0", "weight"), ("2", "weight"), ("4", "weight")]),
        "typed": (Typed(), torch.randn(5, 6),
                  [("proj", "weight"), ("gate", "weight")]),
        "encoder": (encoder, torch.randn(2, 5, 16),
                    [("layers.0.self_attn", "in_proj_weight"),
                     ("layers.1.linear1", "weight")]),
        "cnn": (CNN(), torch.randint(0, 20, (2, 7)),
                [("emb", "weight"), ("conv1", "weight"), ("conv2", "weight")]),
    }


def module_at(model, path):
    for part in path.split("."):
        model = getattr(model, part)
    return model


def delta_shapes(weight, attribute, kind):
    """A and B of peft's layout for a weight (Embedding: A [r, num],
    B [dim, r], the delta transposed)."""
    if kind == "emb":
        return (RANK, weight.shape[0]), (weight.shape[1], RANK)
    inner = weight[0].numel()
    return (RANK, inner), (weight.shape[0], RANK)


def adapted_weight(weight, A, B, kind):
    scaling = ALPHA / RANK
    if kind == "emb":
        return weight + scaling * (B @ A).T
    return weight + scaling * (B @ A).reshape(weight.shape)


class Holder(nn.Module):
    def __init__(self, tensors):
        super().__init__()
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)

    def forward(self):
        return 0


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(__file__), "..", "tests", "data", "jit")
    os.makedirs(out, exist_ok=True)
    for name, (model, x, targets) in models().items():
        model.eval()
        torch.manual_seed(1)
        scripted = torch.jit.script(model)
        traced = torch.jit.trace(model, (x,), check_trace=False)
        scripted.save(os.path.join(out, name + "_scripted.pt"))
        traced.save(os.path.join(out, name + "_traced.pt"))
        tensors = {"input": x, "output": model(x).detach()}
        with torch.no_grad():
            for i, (path, attribute) in enumerate(targets):
                layer = module_at(model, path)
                weight = getattr(layer, attribute)
                kind = "emb" if isinstance(layer, nn.Embedding) else "other"
                a_shape, b_shape = delta_shapes(weight, attribute, kind)
                A = torch.randn(a_shape) * 0.3
                B = torch.randn(b_shape) * 0.3
                tensors["A%d" % i] = A
                tensors["B%d" % i] = B
                weight.copy_(adapted_weight(weight, A, B, kind))
            tensors["adapted_output"] = model(x).detach()
        torch.jit.script(Holder(tensors)).save(
            os.path.join(out, name + "_reference.pt"))
    inputs = odd_inputs()
    torch.manual_seed(3)
    torch.jit.script(Odd().eval()).save(os.path.join(out, "odd_scripted.pt"))
    torch.jit.trace(OddAttention().eval(), inputs, check_trace=False).save(
        os.path.join(out, "odd_traced.pt"))
    torch.manual_seed(5)
    torch.jit.script(Dynamic().eval()).save(os.path.join(out, "dynamic_scripted.pt"))
    torch.jit.trace(SamePadding().eval(), (torch.randn(2, 4, 7),)).save(
        os.path.join(out, "same_traced.pt"))
    torch.jit.script(Holder({"tokens": inputs[0], "memory": inputs[1],
                             "volume": inputs[2]})).save(
        os.path.join(out, "odd_reference.pt"))
    for name, (model, example) in peft_twins().items():
        model.eval()
        torch.jit.script(model).save(os.path.join(out, "peft_" + name + "_scripted.pt"))
        torch.jit.trace(model, example, check_trace=False).save(
            os.path.join(out, "peft_" + name + "_traced.pt"))
    print("wrote the fixtures to", os.path.abspath(out))


if __name__ == "__main__":
    main()
