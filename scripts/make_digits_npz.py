"""Regenerate `pfgm_diffusers/data/digits.npz`, the embedded default dataset of the trainer.

The data are scikit-learn's copy of the UCI optical recognition of handwritten digits test set (1797 images, 8x8,
pixel values 0..16, CC BY 4.0). scikit-learn is needed only to run this script once; the trainer reads the `.npz`.

    python scripts/make_digits_npz.py
"""

import argparse
import os

import numpy as np
from sklearn.datasets import load_digits

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "..", "pfgm_diffusers", "data", "digits.npz")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT, help="Where to write the .npz file.")
    out = parser.parse_args().out

    digits = load_digits()
    # 0..16 -> 0..255 once here, so the file holds ordinary 8-bit grayscale images
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    labels = digits.target.astype(np.uint8)  # (1797,)
    np.savez_compressed(out, images=images, labels=labels)
    print(f"wrote {os.path.normpath(out)}: {images.shape[0]} images {images.shape[1:]}, {os.path.getsize(out)} bytes")


if __name__ == "__main__":
    main()
