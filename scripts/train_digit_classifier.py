#!/usr/bin/env python
"""Train the digits classifier behind the offline metrics of `pfgm_diffusers.evaluation` and save it (safetensors).

    python scripts/train_digit_classifier.py  # rewrites pfgm_diffusers/data/digit_classifier.safetensors

Data: the 1797 embedded digits as a 16x16 trainer sees them (8x8 upscaled bilinearly to 16x16, in [0, 1]),
split by `evaluation.digits_split()`: a permutation by `np.random.default_rng(0)`, its first 359 digits (20 %) held
out, the other 1438 trained on. Training: Adam with a one-cycle learning rate, cross-entropy, random shifts of up to
1 pixel; nothing else (no noise images: the metrics must not be tuned to the noise they are tested against).
Deterministic: seeded torch and numpy generators, one thread, deterministic algorithms. Prints the held-out
accuracy (the test suite requires >= 0.95) and the file size.
"""

import argparse
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pfgm_diffusers.evaluation import (
    DIGIT_CLASSIFIER_PATH,
    DIGITS_SPLIT_SEED,
    DigitClassifier,
    digits_split,
    load_digits_images,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=DIGIT_CLASSIFIER_PATH, help="Where to write the safetensors file.")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--width", type=int, default=8, help="Channels of the first conv layer (the second has 2x).")
    parser.add_argument("--num_features", type=int, default=32, help="Size of the penultimate (feature) layer.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of initialisation, batches and augmentation.")
    return parser.parse_args(argv)


def random_shift(images, generator, max_shift=1):
    """Each image moved by up to `max_shift` pixels in x and y, filled with background (0)."""
    size = images.shape[-1]
    padded = F.pad(images, (max_shift,) * 4)
    offsets = torch.randint(2 * max_shift + 1, (images.shape[0], 2), generator=generator)
    return torch.stack([padded[i, :, y : y + size, x : x + size] for i, (y, x) in enumerate(offsets.tolist())])


def train(model, images, labels, args):
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    steps = args.epochs * -(-len(images) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.learning_rate, total_steps=steps)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        for start in range(0, len(images), args.batch_size):
            batch = order[start : start + args.batch_size]
            x = random_shift(images[batch], generator)
            loss = F.cross_entropy(model(x), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1}: loss {total / len(images):.4f}")


@torch.no_grad()
def accuracy(model, images, labels):
    model.eval()
    return (model(images).argmax(1) == labels).double().mean().item()


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    train_indices, heldout_indices = digits_split()
    train_images, train_labels = load_digits_images(train_indices)
    heldout_images, heldout_labels = load_digits_images(heldout_indices)
    model = DigitClassifier(width=args.width, num_features=args.num_features)
    num_parameters = sum(p.numel() for p in model.parameters())
    print(f"{num_parameters} parameters; {len(train_indices)} training digits, {len(heldout_indices)} held out")
    train(model, train_images, train_labels, args)
    train_accuracy = accuracy(model, train_images, train_labels)
    heldout_accuracy = accuracy(model, heldout_images, heldout_labels)
    metadata = {
        "split_seed": str(DIGITS_SPLIT_SEED),
        "heldout_accuracy": f"{heldout_accuracy:.4f}",
        "settings": " ".join(f"--{key} {value}" for key, value in vars(args).items() if key != "output"),
    }
    state_dict = {key: value.contiguous() for key, value in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    save_file(state_dict, args.output, metadata=metadata)
    print(f"train accuracy {train_accuracy:.4f}, held-out accuracy {heldout_accuracy:.4f}", end=" ")
    print(f"({len(heldout_indices)} digits)")
    print(f"wrote {args.output}: {os.path.getsize(args.output) / 1024:.1f} KB")
    return heldout_accuracy


if __name__ == "__main__":
    main()
