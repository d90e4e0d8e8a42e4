#!/usr/bin/env python3
"""Checks torchlora's adapter files against Python peft, both ways.

The model mixes Linear, Embedding, Conv2d and MultiheadAttention layers, all
adapted (the attention needs peft 0.15 or later). peft up to 0.18 adds an
attention's out_proj delta twice (huggingface/peft#3774), so both sides zero
that B before comparing outputs; its keys are still checked.

1. The C++ side (torchlora_interop export) writes base weights, inputs, an
   adapter saved by torchlora::save_adapter and its output. Here the Python
   twin of the model loads the base weights, PeftModel.from_pretrained loads
   the adapter, and the outputs are compared.
2. Here peft adapts a fresh twin (random A and B), saves it with
   save_pretrained and writes its output; torchlora_interop check loads it
   with torchlora::load_adapter and compares.

Skipped (exit code 77) where torch, peft or safetensors cannot be imported.

    python3 tests/interop/peft_interop.py --cpp build/default/tests/torchlora_interop
"""
import argparse
import os
import subprocess
import sys
import tempfile

SKIP = 77


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpp", required=True, help="the torchlora_interop program")
    parser.add_argument("--dir", help="working folder (default: a temporary one)")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    args = parser.parse_args()

    try:
        import torch
        from torch import nn
        import peft
        from peft import LoraConfig, PeftModel, get_peft_model
        from safetensors.torch import load_file, save_file
    except ImportError as error:
        print(f"peft interop check skipped: {error} (needs torch, peft and safetensors)")
        return SKIP

    class TinyNet(nn.Module):
        """The Python twin of TinyNet in interop_main.cpp."""

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

    work = args.dir or tempfile.mkdtemp(prefix="torchlora_interop_")
    os.makedirs(work, exist_ok=True)
    print(f"peft {peft.__version__}, torch {torch.__version__}, folder {work}")

    def base_model():
        model = TinyNet()
        model.load_state_dict(load_file(os.path.join(work, "base.safetensors")), strict=True)
        return model.eval()

    # 1. C++ -> Python
    subprocess.run([args.cpp, "export", work], check=True)
    inputs = load_file(os.path.join(work, "input.safetensors"))
    model_inputs = (inputs["x"], inputs["tokens"], inputs["image"])
    cpp_output = load_file(os.path.join(work, "cpp_output.safetensors"))["y"]
    model = PeftModel.from_pretrained(base_model(), os.path.join(work, "cpp_adapter")).eval()
    with torch.no_grad():
        python_output = model(*model_inputs)
    cpp_to_python = (python_output - cpp_output).abs().max().item()
    print(f"torchlora adapter loaded by peft: largest output difference {cpp_to_python:.3g}")

    # 2. Python -> C++
    torch.manual_seed(1)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "mlp.0", "head", "embed", "conv", "attn"],
        rank_pattern={"head": 2},
        init_lora_weights=False,
    )
    model = get_peft_model(base_model(), config).eval()
    with torch.no_grad():
        model.base_model.model.attn.base_layer.out_proj.lora_B["default"].weight.zero_()
    model.save_pretrained(os.path.join(work, "peft_adapter"))
    with torch.no_grad():
        save_file({"y": model(*model_inputs).contiguous()}, os.path.join(work, "peft_output.safetensors"))
    python_to_cpp = subprocess.run([args.cpp, "check", work, str(args.tolerance)])

    ok = cpp_to_python <= args.tolerance and python_to_cpp.returncode == 0
    print("peft interop check " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
