#!/usr/bin/env python3
"""The Python side of the TorchScript example (examples/torchscript_finetune.cpp).

  train.py --out DIR [--quick]       trains a Fashion-MNIST classifier in
                                     PyTorch, scripts it and saves DIR/base.pt
  train.py --evaluate DIR/merged.pt  the accuracy of a TorchScript classifier
                                     (the one C++ fine-tuned and merged) on the
                                     inverted test images, in Python

The C++ program adapts the model to inverted images (255 - pixel), which the
model never saw: its accuracy there is what LoRA recovers. Uses Debian's
python3-torch and the dataset-fashion-mnist package (gzipped idx files).
"""
import argparse
import gzip
import os
import time

import torch
import torch.nn as nn

DATA_DIR = "/usr/share/datasets/fashion-mnist"
MEAN, STD = 0.2860, 0.3530


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 256)
        self.fc2 = nn.Linear(256, 128)
        self.head = nn.Linear(128, 10)

    def forward(self, images):
        h = torch.relu(self.fc1(images.flatten(1)))
        h = torch.relu(self.fc2(h))
        return self.head(h)


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return torch.frombuffer(bytearray(data[4 + 4 * dims:]), dtype=torch.uint8).reshape(shape)


def split(data_dir, prefix, inverted):
    raw = read_idx(os.path.join(data_dir, prefix + "-images-idx3-ubyte.gz"))
    if inverted:
        raw = 255 - raw
    images = ((raw.to(torch.float32) / 255.0 - MEAN) / STD).unsqueeze(1)
    labels = read_idx(os.path.join(data_dir, prefix + "-labels-idx1-ubyte.gz")).to(torch.int64)
    return images, labels


def correct(model, images, labels, batch=1000):
    count = 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            logits = model(images[i:i + batch])
            count += int((logits.argmax(1) == labels[i:i + batch]).sum())
    return count


def train(args):
    torch.manual_seed(0)
    images, labels = split(args.data_dir, "train", inverted=False)
    if args.quick:
        images, labels = images[:6000], labels[:6000]
    model = Classifier()
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    epochs = 1 if args.quick else 3
    start = time.time()
    for _ in range(epochs):
        order = torch.randperm(len(images))
        for i in range(0, len(images), 128):
            batch = order[i:i + 128]
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    upright = split(args.data_dir, "t10k", inverted=False)
    inverted = split(args.data_dir, "t10k", inverted=True)
    print("python: trained %d epochs on %d images in %.1f s" % (epochs, len(images), time.time() - start))
    print("python: test accuracy, upright images: %.4f" % (correct(model, *upright) / len(upright[1])))
    print("python: test accuracy, inverted images: %.4f" % (correct(model, *inverted) / len(inverted[1])))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "base.pt")
    torch.jit.script(model).save(path)
    print("python: wrote", path)


def evaluate(args):
    model = torch.jit.load(args.evaluate)
    model.eval()
    images, labels = split(args.data_dir, "t10k", inverted=True)
    count = correct(model, images, labels)
    print("python: accuracy of %s on the inverted test images: %.4f (%d of %d)"
          % (args.evaluate, count / len(labels), count, len(labels)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="torchscript_finetune")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--evaluate", metavar="MODEL")
    parser.add_argument("--data-dir", default=DATA_DIR)
    args = parser.parse_args()
    if args.evaluate:
        evaluate(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
