"""Datasets for pruning, fine-tuning and evaluation, all offline.

  digits   scikit-learn's handwritten digits (ships with scikit-learn): 1797 images, 1x8x8, 10 classes,
           pixel values 0..16 scaled to [0, 1]; a fixed stratified 75/25 train/test split (seed 0).
  cifar10  the CIFAR-10 "python version" folder `cifar-10-batches-py` (data_batch_1..5, test_batch,
           batches.meta), which must already be on disk: nothing is downloaded. 3x32x32, normalised
           with the usual per-channel mean/std.
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

DATASETS = ("digits", "cifar10")
NUM_CLASSES = {"digits": 10, "cifar10": 10}
INPUT_SHAPES = {"digits": (1, 8, 8), "cifar10": (3, 32, 32)}

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILES = ("test_batch",)
CIFAR_FILES = CIFAR_TRAIN_FILES + CIFAR_TEST_FILES + ("batches.meta",)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def load_dataset(name: str, train: bool, data_dir=None) -> Dataset:
    """The train or test split of `name`. `data_dir` is needed for cifar10 only."""
    if name == "digits":
        return digits(train)
    if name == "cifar10":
        if data_dir is None:
            raise ValueError(f"cifar10 needs --data-dir: a folder holding {CIFAR_FOLDER}/ "
                             f"({', '.join(CIFAR_FILES)})")
        return cifar10(data_dir, train)
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")


def digits(train: bool, *, test_fraction: float = 0.25, seed: int = 0) -> TensorDataset:
    """scikit-learn digits as float32 [N, 1, 8, 8] in [0, 1] and int64 labels; the split is deterministic."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0
    labels = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=test_fraction, random_state=seed,
                                                        stratify=labels)
    x, y = (x_train, y_train) if train else (x_test, y_test)
    return TensorDataset(torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y))


class CIFAR10Arrays(Dataset):
    """uint8 HWC images kept as loaded; items are normalised float32 CHW tensors and int64 labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2)  # N, 3, 32, 32 uint8
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self._mean = torch.tensor(CIFAR_MEAN).view(3, 1, 1)
        self._std = torch.tensor(CIFAR_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        image = self.images[index].float().div_(255.0)
        return (image - self._mean) / self._std, self.labels[index]


def cifar_folder(data_dir) -> str:
    """The `cifar-10-batches-py` folder: `data_dir` itself or its child; FileNotFoundError saying
    exactly what to put where when files are missing."""
    data_dir = os.fspath(data_dir)
    folder = data_dir if os.path.basename(os.path.normpath(data_dir)) == CIFAR_FOLDER \
        else os.path.join(data_dir, CIFAR_FOLDER)
    missing = [name for name in CIFAR_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 not found: {folder} lacks {', '.join(missing)}. sparsert never downloads data; get "
            f"cifar-10-python.tar.gz (the 'CIFAR-10 python version' from https://www.cs.toronto.edu/~kriz/"
            f"cifar.html) and extract it into {data_dir}, so that {os.path.join(folder, 'data_batch_1')} "
            f"... data_batch_5, test_batch and batches.meta exist")
    return folder


def cifar10(data_dir, train: bool) -> CIFAR10Arrays:
    """Read the python-pickle batches the way torchvision.datasets.CIFAR10 does (latin1 dicts with
    'data' [N, 3072] uint8 and 'labels'), through an unpickler that only admits numpy arrays."""
    folder = cifar_folder(data_dir)
    images, labels = [], []
    for name in CIFAR_TRAIN_FILES if train else CIFAR_TEST_FILES:
        path = os.path.join(folder, name)
        batch = _read_batch(path)
        try:
            data = np.asarray(batch["data"], dtype=np.uint8)
            batch_labels = np.asarray(batch["labels"] if "labels" in batch else batch["fine_labels"])
        except KeyError as exc:
            raise ValueError(f"{path}: not a CIFAR-10 batch (no {exc} entry)") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(batch_labels) != data.shape[0]:
            raise ValueError(f"{path}: expected 'data' of shape [N, 3072] and N labels, got {data.shape} and "
                             f"{len(batch_labels)} labels")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(batch_labels)
    labels = np.concatenate(labels)
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{folder}: CIFAR-10 labels must lie in 0..9, got {labels.min()}..{labels.max()}")
    return CIFAR10Arrays(np.ascontiguousarray(np.concatenate(images)), labels)


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches hold dicts, lists, bytes and numpy arrays; nothing else may be constructed."""

    # _codecs.encode: how Python 3 writes bytes in protocol-2 pickles (harmless: str -> bytes).
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only arrays")
        return super().find_class(module, name)


def _read_batch(path: str) -> dict:
    try:
        with open(path, "rb") as handle:
            batch = _ArraysOnlyUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable CIFAR-10 python batch ({exc})") from exc
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    return batch
