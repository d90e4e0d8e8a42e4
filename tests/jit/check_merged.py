#!/usr/bin/env python3
"""Runs in Python the TorchScript modules that C++ adapted and merged
(tests/jit_test.cpp, JitFixtures.WritesMergedModulesForPython_Optional) and compares
their outputs with the ones Python computed for the same adapters
(scripts/make-jit-fixtures.py, "adapted_output").

  check_merged.py FIXTURES_DIR MERGED_DIR
"""
import os
import sys

import torch


def main():
    fixtures, merged = sys.argv[1], sys.argv[2]
    names = sorted(f for f in os.listdir(merged) if f.endswith(".pt"))
    if not names:
        print("check_merged: no merged modules in", merged)
        return 1
    failures = 0
    for name in names:
        model = name.rsplit("_", 1)[0]
        reference = torch.jit.load(os.path.join(fixtures, model + "_reference.pt"))
        module = torch.jit.load(os.path.join(merged, name))
        module.eval()
        with torch.no_grad():
            output = module(reference.input)
        expected = reference.adapted_output
        error = float((output - expected).abs().max() / expected.abs().max())
        good = error <= 1e-5
        failures += not good
        print("check_merged: %-22s relative error %.2e %s"
              % (name, error, "ok" if good else "MISMATCH"))
    print("check_merged: torch %s, %d modules, %d mismatches"
          % (torch.__version__, len(names), failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
