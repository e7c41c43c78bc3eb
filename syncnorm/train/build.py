"""The parts of a run, built from its config: datasets (downloaded once), model, optimizer, scheduler."""

import torch
from torch import nn

from syncnorm.train.config import Config
from syncnorm.train.data import Datasets, build_datasets
from syncnorm.train.distributed import DistInfo, all_sum
from syncnorm.train.errors import DataError
from syncnorm.train.models import build_model

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def load_data(cfg: Config, info: DistInfo) -> Datasets:
    """Build the datasets on every rank; with ``data.download`` rank 0 downloads first.

    Failures are agreed on with one all_reduce, so a rank never waits for a rank that gave up.
    """
    d = cfg.data

    def build(download: bool) -> Datasets:
        return build_datasets(d.name, root=d.root, download=download, test_fraction=d.test_fraction,
                              synthetic_samples=d.synthetic_samples, synthetic_shape=d.synthetic_shape,
                              seed=cfg.train.seed)

    if not d.download or info.world_size == 1:
        return build(d.download)
    error = None
    if info.rank == 0:
        try:
            build(True)
        except DataError as caught:
            error = caught
    flag = all_sum(torch.tensor([1.0 if error else 0.0], device=info.device), info)
    if error:
        raise error
    if flag.item() > 0:
        raise DataError(f"data.name={d.name}: rank 0 could not download the dataset (see its message)")
    return build(False)


def make_model(cfg: Config, data: Datasets, info: DistInfo) -> nn.Module:
    """The configured network for ``data``, on this rank's device in ``train.dtype`` (not DDP-wrapped)."""
    model = build_model(cfg.model.name, norm=cfg.model.norm, init=cfg.model.init, act=cfg.model.act,
                        in_shape=data.shape, num_classes=data.num_classes,
                        checkpoint_activations=cfg.model.checkpoint_activations)
    return model.to(device=info.device, dtype=DTYPES[cfg.train.dtype])


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                           nesterov=t.nesterov and t.momentum > 0)


def make_scheduler(cfg: Config, optimizer: torch.optim.Optimizer):
    """The learning-rate schedule of ``train.schedule`` (None for a constant rate)."""
    t = cfg.train
    if t.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.epochs)
    if t.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=t.step_size, gamma=t.gamma)
    return None


def compile_model(model: nn.Module) -> nn.Module:
    """``train.compile``: ``torch.compile`` with its default settings (before DDP wrapping); the first
    step compiles."""
    return torch.compile(model)
