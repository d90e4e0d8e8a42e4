"""The models of the peft interop check (peft_interop.py; their C++ twins are
in interop_cases.h), also scripted and traced by scripts/make-jit-fixtures.py
for the TorchScript tests, which load the adapters peft wrote for them."""
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.q_proj = nn.Linear(16, 16)
        self.v_proj = nn.Linear(16, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 4)
        self.attn = nn.MultiheadAttention(16, 2)

    def forward(self, x, tokens, image):
        sequence = x.unsqueeze(0)
        attended = self.attn(sequence, sequence, sequence)[0].squeeze(0)
        hidden = self.q_proj(x) + self.v_proj(x) + self.embed(tokens) + attended
        return self.head(self.mlp(hidden)) + self.conv(image).mean(dim=(2, 3))


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 24)
        self.fc2 = nn.Linear(24, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.fc2(torch.relu(self.fc1(x))))


class ConvNet1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 5, 3, padding=1)
        self.head = nn.Linear(5, 2)

    def forward(self, signal):
        return self.head(self.conv(signal).mean(2))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0)

    def forward(self, x):
        return self.layer(x)


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0)

    def forward(self, x, memory):
        return self.layer(x, memory)


class Stack(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(8, 8), nn.ReLU(),
                         nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)))
