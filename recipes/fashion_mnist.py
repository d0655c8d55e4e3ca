"""Fashion-MNIST from the Debian package `dataset-fashion-mnist`, offline."""

import gzip
import os

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
INSTALL_HINT = (
    "Install it with `apt-get install dataset-fashion-mnist` (Debian), or "
    "pass the folder holding the four gzipped IDX files."
)


def _read_idx(path, expected_dims):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08 or (magic & 0xFF) != expected_dims:
        raise ValueError(f"{path} is not a uint8 IDX file of rank {expected_dims}.")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(expected_dims)]
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * expected_dims)
    return array.reshape(dims)


def load_fashion_mnist(split="train", data_dir=FASHION_MNIST_DIR):
    """Returns `(images, labels)`: uint8 arrays of shape (n, 28, 28) and (n,)."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test'; received split={split!r}.")
    image_file, label_file = (os.path.join(data_dir, f) for f in _FILES[split])
    for path in (image_file, label_file):
        if not os.path.exists(path):
            raise FileNotFoundError(f"Fashion-MNIST file {path} is missing. {INSTALL_HINT}")
    images = _read_idx(image_file, 3)
    labels = _read_idx(label_file, 1)
    if len(images) != len(labels):
        raise ValueError(f"{image_file} and {label_file} differ in length.")
    return images, labels
