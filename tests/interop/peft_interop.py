#!/usr/bin/env python3
"""Checks torchlora's adapter files against Python peft, both ways.

Every case of interop_main.cpp (a model in float64 and its adapters) is
checked in both directions, and every output is also compared with a float64
reference computed here with plain ops from the adapter file alone (the base
weights plus scale * B @ A for each layer, the saved biases and modules).

1. torchlora -> peft: `torchlora_interop export` has written, per case, the
   base weights, inputs, the adapters (after one training step) and their
   outputs. Here PeftModel loads them; peft's missing and unexpected keys
   are checked (peft's own load is not strict), and its outputs are compared
   with torchlora's and with the reference.
2. peft -> torchlora: peft adapts the same base with the same settings, takes
   one training step, saves with save_pretrained and reloads; the reloaded
   outputs and the reference go to files that `torchlora_interop check`
   compares with what torchlora_interop computes after load_adapter.
3. The two adapter_config.json files of each case must agree in every field
   torchlora writes (list fields compared as sets).

peft adds a MultiheadAttention's out_proj delta twice (huggingface/peft#3774,
open through peft 0.20); files keep peft's behaviour (docs/PEFT.md), so the
reference counts that delta twice too.

    --phase all     runs all three steps (needs --cpp; the CTest interop.peft)
    --phase python  the Python steps only, on files export made
                    (scripts/run-peft-interop.sh runs export and check here)

Skipped (exit code 77) where torch, peft or safetensors cannot be imported.
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile

SKIP = 77

# adapter_config.json fields never compared: torchlora does not record how A
# and B started, and peft_version is peft's own;
# auto_mapping names the Python class of the base model.
IGNORED = {"init_lora_weights", "peft_version", "auto_mapping"}
# Cases torchlora_interop saves without their LoRAConfig.
SAVED_WITHOUT_CONFIG = {"paths_and_anchored_patterns"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=["all", "python"], default="all")
    parser.add_argument("--cpp", help="the torchlora_interop program (--phase all)")
    parser.add_argument("--dir", help="working folder (default: a temporary one)")
    parser.add_argument("--tolerance", type=float, default=1e-9)
    args = parser.parse_args()

    try:
        import torch
        from torch import nn
        import peft
        from peft import LoraConfig, PeftModel, get_peft_model
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file, save_file
    except ImportError as error:
        print(f"peft interop check skipped: {error} (needs torch, peft and safetensors)")
        return SKIP
    if args.phase == "all" and not args.cpp:
        parser.error("--phase all needs --cpp")

    # The models (their TorchScript twins, scripts/make-jit-fixtures.py, use
    # the same file).
    from interop_models import ConvNet1d, Decoder, Encoder, Mlp, Stack, TinyNet

    # name: (model, input names, {adapter: LoraConfig arguments}); the same
    # settings as cases() in interop_main.cpp.
    cases = {
        "mixed": (TinyNet, ["x", "tokens", "image"], {"default": dict(
            r=4, lora_alpha=8,
            target_modules=["q_proj", "v_proj", "mlp.0", "head", "embed", "conv", "attn"],
            rank_pattern={"head": 2}, alpha_pattern={"mlp.0": 16.0})}),
        "rslora_bias_all_modules_to_save": (Mlp, ["x"], {"default": dict(
            r=3, lora_alpha=5, use_rslora=True, target_modules=["fc1", "fc2"],
            bias="all", modules_to_save=["head"])}),
        "bias_lora_only": (Mlp, ["x"], {"default": dict(
            r=2, lora_alpha=4, target_modules=["fc1"], bias="lora_only")}),
        "regex_targets": (Mlp, ["x"], {"default": dict(
            r=4, lora_alpha=2, target_modules="fc[12]", rank_pattern={"fc2": 3})}),
        "conv1d": (ConvNet1d, ["signal"], {"default": dict(
            r=2, lora_alpha=3, target_modules=["conv", "head"])}),
        "encoder_layer": (Encoder, ["x"], {"default": dict(
            r=4, lora_alpha=8, target_modules=["self_attn", "linear1", "linear2"])}),
        "decoder_layer": (Decoder, ["x", "memory"], {"default": dict(
            r=2, lora_alpha=6, target_modules=["self_attn", "multihead_attn", "linear1"])}),
        # torchlora saves this one without its config: the adapted paths,
        # and "0" (which peft would match on "2.0" too) anchored.
        "paths_and_anchored_patterns": (Stack, ["x"], {"default": dict(
            r=4, lora_alpha=4, target_modules=["0", "2.2"],
            rank_pattern={"^0": 2}, alpha_pattern={"2.2": 8.0})}),
        "two_adapters": (Mlp, ["x"], {
            "default": dict(r=2, lora_alpha=4, target_modules=["fc1", "fc2"]),
            "fr": dict(r=4, lora_alpha=3, target_modules=["fc1"])}),
        "dora": (TinyNet, ["x", "tokens", "image"], {"default": dict(
            r=4, lora_alpha=8, use_dora=True,
            target_modules=["q_proj", "v_proj", "mlp.0", "head", "embed", "conv"])}),
        "dora_and_plain": (Mlp, ["x"], {
            "default": dict(r=2, lora_alpha=4, use_dora=True, target_modules=["fc1", "fc2"]),
            "fr": dict(r=4, lora_alpha=3, target_modules=["fc1"])}),
    }

    work = args.dir or tempfile.mkdtemp(prefix="torchlora_interop_")
    os.makedirs(work, exist_ok=True)
    print(f"peft {peft.__version__}, torch {torch.__version__}, folder {work}")
    if args.phase == "all":
        subprocess.run([args.cpp, "export", work], check=True)

    def adapter_folder(root, adapter):
        return root if adapter == "default" else os.path.join(root, adapter)

    def pattern_value(patterns, path, default):
        # peft's rule: the first key that matches the path or a dotted suffix.
        for key, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?({key})$", path):
                return value
        return default

    def reference_state(base_state, folder):
        """The base weights with the file's adapter added by plain ops."""
        with open(os.path.join(folder, "adapter_config.json")) as file:
            config = json.load(file)
        tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
        state = {key: value.clone().double() for key, value in base_state.items()}
        prefix = "base_model.model."
        for key, tensor in tensors.items():
            assert key.startswith(prefix), key
            key = key[len(prefix):]
            matrix = re.match(r"(.*)\.lora_(embedding_)?A(\.weight)?$", key)
            if matrix:
                path, embedding, suffix = matrix.groups()
                a = tensor.double()
                b = tensors[prefix + key.replace("lora_embedding_A", "lora_embedding_B")
                            .replace("lora_A", "lora_B")].double()
                owner = path[: -len(".base_layer.out_proj")] \
                    if path.endswith(".base_layer.out_proj") else path
                rank = a.shape[0]
                alpha = pattern_value(config.get("alpha_pattern"), owner, config["lora_alpha"])
                scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
                magnitude = tensors.get(prefix + path + ".lora_magnitude_vector")
                if owner != path:  # an attention's out_proj: peft adds it twice
                    state[owner + ".out_proj.weight"] += 2 * scale * (b @ a)
                elif path + ".in_proj_weight" in state:
                    state[path + ".in_proj_weight"] += scale * (b @ a)
                else:
                    weight = state[path + ".weight"]
                    if embedding:
                        full = weight + scale * (b @ a).T
                    else:
                        delta = b.flatten(1) @ a.flatten(1)
                        full = weight + scale * delta.view(weight.shape)
                    if magnitude is None:
                        state[path + ".weight"] = full
                    else:
                        # DoRA: the magnitude over the norm per output
                        # channel (an Embedding's columns), the norm of the
                        # adapted weight.
                        dims = (0,) if embedding else tuple(range(1, full.dim()))
                        norm = full.pow(2).sum(dim=dims, keepdim=True).sqrt()
                        state[path + ".weight"] = magnitude.double().reshape(norm.shape) / norm * full
            elif re.search(r"\.lora_(embedding_)?B(\.weight)?$", key):
                continue
            elif key.endswith(".lora_magnitude_vector"):
                continue  # applied with its layer's A
            elif ".original_module." in key:
                continue  # the base's own copy of a module to save
            else:
                plain = key.replace(".base_layer.", ".").replace(".modules_to_save.", ".")
                assert plain in state, f"{key} is no parameter of the model"
                state[plain] = tensor.double()
        return state

    def difference(a, b):
        """The largest difference, relative to the larger of 1 and |b|."""
        return ((a - b).abs().max() / max(1.0, b.abs().max().item())).item()

    def run(model, inputs):
        model.eval()
        with torch.no_grad():
            return model(*inputs)

    def train_one_step(model, inputs):
        """One small gradient step (scaled to its largest entry) on everything
        trainable, as torchlora_interop export takes."""
        model.train()
        model(*inputs).square().mean().backward()
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.grad is not None:
                    grad = parameter.grad
                    parameter -= 0.05 * grad / (1 + grad.abs().max())
                    parameter.grad = None

    def adapter_keys_of(model, adapter):
        return {key for key in model.state_dict()
                if f".{adapter}." in key + "." and ("lora_" in key or ".modules_to_save." in key)}

    def load_checked(model, folder, adapter, own_file):
        """Loads the adapter file into `model` with peft's own loader and
        fails on keys that load as nothing."""
        tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, tensors, adapter_name=adapter)
        missing = sorted(set(result.missing_keys) & adapter_keys_of(model, adapter))
        problems = []
        unexpected = sorted(result.unexpected_keys)
        if own_file:
            # peft's own file with bias="all" holds the trained bias of a
            # module to save also as <module>.modules_to_save.bias, which its
            # loader does not place (it loads <module>.bias instead).
            quirks = [key for key in unexpected if ".modules_to_save." in key]
            for key in quirks:
                print(f"  note: peft's loader ignores {key} of its own file")
            unexpected = [key for key in unexpected if key not in quirks]
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
        if missing:
            problems.append(f"missing keys {missing}")
        return problems

    def load_peft(model_class, base_state, root, adapters, own_file=False):
        model = model_class().double()
        model.load_state_dict(base_state, strict=True)
        names = list(adapters)
        model = PeftModel.from_pretrained(model, adapter_folder(root, names[0]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapter_folder(root, name), adapter_name=name)
        problems = []
        for name in names:
            problems += load_checked(model, adapter_folder(root, name), name, own_file)
        return model.double(), problems

    def outputs_with_each(model, adapters, inputs):
        outputs = {}
        for name in adapters:
            model.set_adapter(name)
            outputs["y_" + name] = run(model, inputs).contiguous()
        return outputs

    def reference_outputs(model_class, base_state, root, adapters, inputs):
        outputs = {}
        for name in adapters:
            twin = model_class().double()
            twin.load_state_dict(reference_state(base_state, adapter_folder(root, name)))
            outputs["y_" + name] = run(twin, inputs).contiguous()
        return outputs

    not_written = set()

    def compare_configs(case, name, cpp_folder, peft_folder):
        """Every field torchlora writes must hold peft's value; the fields
        only peft writes are collected for the summary."""
        with open(os.path.join(cpp_folder, "adapter_config.json")) as file:
            cpp = json.load(file)
        with open(os.path.join(peft_folder, "adapter_config.json")) as file:
            python = json.load(file)
        ok = True
        for key in sorted(set(cpp) | set(python)):
            if key in IGNORED:
                continue
            if key not in cpp:
                not_written.add(key)
                continue
            mine, theirs = cpp.get(key), python.get(key, "<absent>")
            if isinstance(mine, list) and isinstance(theirs, list):
                mine, theirs = sorted(mine), sorted(theirs)
            if mine != theirs:
                ok = False
                print(f"  config {case}/{name}: {key}: torchlora {cpp.get(key)!r}, "
                      f"peft {python.get(key, '<absent>')!r}  FAILED")
        return ok

    failures = 0
    outputs_compared = 0
    configs_compared = 0
    largest = {}
    for case, (model_class, input_names, adapters) in cases.items():
        folder = os.path.join(work, case)
        base_state = load_file(os.path.join(folder, "base.safetensors"))
        loaded = load_file(os.path.join(folder, "input.safetensors"))
        inputs = [loaded[name] for name in input_names]

        # 1. torchlora -> peft
        cpp_root = os.path.join(folder, "cpp_adapter")
        model, problems = load_peft(model_class, base_state, cpp_root, adapters)
        got = outputs_with_each(model, adapters, inputs)
        expected = load_file(os.path.join(folder, "cpp_output.safetensors"))
        reference = reference_outputs(model_class, base_state, cpp_root, adapters, inputs)
        for key, value in got.items():
            to_cpp = difference(value, expected[key])
            to_reference = difference(value, reference[key])
            ok = to_cpp <= args.tolerance and to_reference <= args.tolerance and not problems
            largest[case] = max(largest.get(case, 0.0), to_cpp, to_reference)
            failures += 0 if ok else 1
            outputs_compared += 1
            print(f"torchlora -> peft {case} {key}: largest difference to torchlora {to_cpp:.3g}, "
                  f"to the float64 reference {to_reference:.3g}{'' if ok else '  FAILED'}")
        for problem in problems:
            print(f"  peft's load of {case}: {problem}  FAILED")

        # 2. peft -> torchlora
        torch.manual_seed(1)
        model = model_class().double()
        model.load_state_dict(base_state, strict=True)
        names = list(adapters)
        model = get_peft_model(model, LoraConfig(init_lora_weights=False, **adapters[names[0]]),
                               adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, LoraConfig(init_lora_weights=False, **adapters[name]))
        model = model.double()
        for name in names:  # one small step, as export takes
            model.set_adapter(name)
            train_one_step(model, inputs)
        in_memory = outputs_with_each(model, adapters, inputs)
        peft_root = os.path.join(folder, "peft_adapter")
        model.save_pretrained(peft_root)
        reloaded, problems = load_peft(model_class, base_state, peft_root, adapters, own_file=True)
        outputs = outputs_with_each(reloaded, adapters, inputs)
        for problem in problems:
            failures += 1
            print(f"  peft's reload of its own {case}: {problem}  FAILED")
        for key, value in outputs.items():
            gap = difference(value, in_memory[key])
            if gap > args.tolerance:
                print(f"  note: peft's own reload of {case} {key} differs from the model it saved "
                      f"by {gap:.3g} (bias=\"lora_only\": peft's file has no biases)")
        save_file(outputs, os.path.join(folder, "peft_output.safetensors"))
        save_file(reference_outputs(model_class, base_state, peft_root, adapters, inputs),
                  os.path.join(folder, "reference_output.safetensors"))

        # 3. the configs (but where torchlora wrote the paths it adapted)
        for name in names if case not in SAVED_WITHOUT_CONFIG else []:
            configs_compared += 1
            if not compare_configs(case, name, adapter_folder(cpp_root, name),
                                   adapter_folder(peft_root, name)):
                failures += 1

    # PiSSA and OLoRA, which peft runs in float32 only: each side initializes
    # the Mlp's fc1 and fc2 from the base weights, trains one step and saves
    # the adapter as trained; the other loads it into the untouched base,
    # running the init on it first, and must give the same outputs.
    for case, init in (("init_pissa", "pissa"), ("init_olora", "olora")):
        folder = os.path.join(work, case)
        base_state = load_file(os.path.join(folder, "base.safetensors"))
        inputs = [load_file(os.path.join(folder, "input.safetensors"))["x"]]
        model = Mlp()
        model.load_state_dict(base_state, strict=True)
        model = PeftModel.from_pretrained(model, os.path.join(folder, "cpp_adapter"))
        gap = difference(run(model, inputs),
                         load_file(os.path.join(folder, "cpp_output.safetensors"))["y_default"])
        ok = gap <= 1e-5
        failures += 0 if ok else 1
        outputs_compared += 1
        print(f"torchlora -> peft {case} y_default: largest difference to torchlora {gap:.3g} "
              f"(float32){'' if ok else '  FAILED'}")
        torch.manual_seed(1)
        model = Mlp()
        model.load_state_dict(base_state, strict=True)
        model = get_peft_model(model, LoraConfig(
            init_lora_weights=init, r=2, lora_alpha=4, target_modules=["fc1", "fc2"]))
        train_one_step(model, inputs)
        model.save_pretrained(os.path.join(folder, "peft_adapter"))
        save_file({"y_default": run(model, inputs).contiguous()},
                  os.path.join(folder, "peft_output.safetensors"))

    if args.phase == "all":
        if subprocess.run([args.cpp, "check", work, str(args.tolerance)]).returncode != 0:
            failures += 1
    print(f"adapter_config.json fields peft writes and torchlora does not ({len(not_written)}): "
          + ", ".join(sorted(not_written)))
    print("largest torchlora -> peft difference per case: " +
          ", ".join(f"{case} {value:.3g}" for case, value in largest.items()))
    print(f"peft interop check, peft {peft.__version__}: {len(cases)} cases and 2 inits, "
          f"{outputs_compared} outputs each way, {configs_compared} configs: " +
          ("passed" if failures == 0 else f"FAILED ({failures})"))
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
