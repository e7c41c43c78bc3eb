"""The parts of a run, built from its config: datasets (downloaded once), model, optimizer, scheduler,
mixed precision."""

from functools import partial

import torch
from torch import nn

import syncnorm.distributed
from syncnorm.train.config import Config
from syncnorm.train.data import Datasets, build_datasets
from syncnorm.train.distributed import DistInfo, all_sum
from syncnorm.train.epoch import StepSettings
from syncnorm.train.errors import ConfigError, DataError
from syncnorm.train.models import build_model, load_weights

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def load_data(cfg: Config, info: DistInfo) -> Datasets:
    """Build the datasets on every rank; with ``data.download`` rank 0 downloads first.

    Failures are agreed on with one all_reduce, so a rank never waits for a rank that gave up.
    """
    d = cfg.data

    def build(download: bool) -> Datasets:
        return datasets_of(cfg, download)

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


def datasets_of(cfg: Config, download: bool) -> Datasets:
    """The train and test sets ``cfg.data`` describes (``download``: let torchvision fetch them)."""
    d = cfg.data
    return build_datasets(d.name, root=d.root, download=download, test_fraction=d.test_fraction,
                          synthetic_samples=d.synthetic_samples, synthetic_shape=d.synthetic_shape,
                          seed=cfg.train.seed, image_size=d.image_size, min_crop_scale=d.min_crop_scale,
                          hflip=d.hflip)


def network_of(cfg: Config, data: Datasets, process_group=None) -> nn.Module:
    """The configured network for ``data`` (CPU, float32, no weights file); one-line :class:`ConfigError`
    for a model that cannot be built from ``cfg``."""
    m = cfg.model
    try:
        return build_model(m.name, norm=m.norm, init=m.init, act=m.act, in_shape=data.shape,
                           num_classes=data.num_classes, checkpoint_activations=m.checkpoint_activations,
                           process_group=process_group)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def sync_group(cfg: Config, info: DistInfo):
    """``sync.group_size``: this rank's group of consecutive ranks (all ranks call this; None: all ranks)."""
    size = cfg.sync.group_size
    if size == 0 or (size == 1 and info.world_size == 1):
        return None
    if info.world_size % size:
        divisors = [k for k in range(1, info.world_size + 1) if info.world_size % k == 0]
        raise ConfigError(f"sync.group_size: expected a divisor of the world size {info.world_size} (got {size}); "
                          f"use one of {', '.join(map(str, divisors))}, or 0 for all ranks")
    return syncnorm.distributed.sync_groups(size)


def make_model(cfg: Config, data: Datasets, info: DistInfo, warn=print) -> nn.Module:
    """The configured network for ``data``, on this rank's device in ``train.dtype`` (not DDP-wrapped):
    synced over ``sync.group_size`` ranks, ``model.weights`` loaded, ``train.channels_last`` applied."""
    model = network_of(cfg, data, sync_group(cfg, info))
    if cfg.model.weights:
        try:
            kept = load_weights(model, cfg.model.weights)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if kept:
            warn(f"model.weights: {', '.join(kept)} keep their fresh init (another shape in {cfg.model.weights}: "
                 f"trained for another number of classes than the data's {data.num_classes})")
    model = model.to(device=info.device, dtype=DTYPES[cfg.train.dtype])
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def make_step_settings(cfg: Config, info: DistInfo) -> StepSettings:
    """How each step runs on this rank's device: ``train.amp`` (autocast in bfloat16, or float16 with a
    GradScaler on CUDA), ``channels_last``, ``grad_accum``, ``clip_grad``; one line for a combination that
    cannot work."""
    t, device = cfg.train, info.device.type
    if t.grad_accum > 1 and cfg.data.shard == "uneven":
        raise ConfigError(f"train.grad_accum={t.grad_accum}: expected data.shard=pad (got uneven); an uneven split "
                          f"ends with ranks that ran out of batches, which cannot accumulate micro-batches")
    common = dict(channels_last=t.channels_last, grad_accum=t.grad_accum, clip_grad=t.clip_grad)
    if t.amp == "off":
        return StepSettings(**common)
    if t.dtype != "float32":
        raise ConfigError(f"train.amp={t.amp}: expected train.dtype=float32 (got {t.dtype}); mixed precision runs "
                          f"the forward in a lower precision than the float32 parameters")
    if t.amp == "fp16" and device != "cuda":
        raise ConfigError(f"train.amp=fp16: expected a CUDA device (got {device}); on CPU use train.amp=bf16")
    if t.amp == "fp16":
        scaler = torch.amp.GradScaler("cuda") if hasattr(torch.amp, "GradScaler") else torch.cuda.amp.GradScaler()
        return StepSettings(autocast=partial(torch.autocast, device, dtype=torch.float16), scaler=scaler, **common)
    return StepSettings(autocast=partial(torch.autocast, device, dtype=torch.bfloat16), **common)


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
