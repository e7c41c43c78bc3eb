"""SyncBatchNorm under Ray Train: 2 CPU workers train what one process trains on the global batch.

    .venv/bin/python examples/ray_train.py           # convert_sync_batchnorm, then prepare_model
    .venv/bin/python examples/ray_train.py --plain   # plain BatchNorm: each worker's own statistics

Needs: pip install -e '.[ray]'. Ray's session files and the run's checkpoint go to a temporary
directory, removed at the end.
"""

import os
import secrets
import shutil
import sys
import tempfile

import ray
import ray.train
import torch
import torch.nn.functional as F
from ray.train import Checkpoint, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, prepare_model
from torch import nn

import syncnorm

STEPS = 5
GLOBAL_BATCH = 32  # split evenly over the workers


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights in every process
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 2))


def global_batches():
    """The same STEPS global batches in every process."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, GLOBAL_BATCH, 3, 8, 8, generator=generator) * 2 + 1
    y = (x.mean(dim=(2, 3, 4)) > 1).long()
    return x, y


def train(model: nn.Module, rank: int, world_size: int) -> None:
    """SGD on this rank's shard of every global batch (DDP averages the gradients over the ranks)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = global_batches()
    for step in range(STEPS):
        loss = F.cross_entropy(model(x[step].chunk(world_size)[rank]), y[step].chunk(world_size)[rank])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def train_loop_per_worker(config: dict) -> None:
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    model = make_model()
    if config["sync"]:
        model = syncnorm.convert_sync_batchnorm(model)  # convert first,
    model = prepare_model(model)  # then let Ray move it to the device and wrap it in DDP
    train(model, rank, world_size)
    state = model.module.state_dict()
    # Ray Train keeps the metrics only when they come with a checkpoint; rank 0's are the ones kept.
    metrics = {"running_mean": state["1.running_mean"][:4].tolist()}
    with tempfile.TemporaryDirectory() as directory:
        torch.save(state, os.path.join(directory, "model.pt"))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory) if rank == 0 else None)


def main() -> None:
    sync = "--plain" not in sys.argv[1:]
    workdir = tempfile.mkdtemp(prefix="ray_train_")
    # A token for this local cluster in the environment: Ray's token authentication stays on, and Ray
    # does not write one to ~/.ray/auth_token.
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    try:
        ray.init(num_cpus=2, _temp_dir=os.path.join(workdir, "ray"))
        trainer = TorchTrainer(
            train_loop_per_worker, train_loop_config={"sync": sync},
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
            run_config=RunConfig(storage_path=os.path.join(workdir, "results"), name="syncnorm"),
        )
        result = trainer.fit()
        with result.checkpoint.as_directory() as directory:
            state = torch.load(os.path.join(directory, "model.pt"))
    finally:
        ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)

    reference = make_model()  # one process, plain BatchNorm, the whole global batch
    train(reference, rank=0, world_size=1)
    expected = reference.state_dict()
    difference = max((state[name].double() - expected[name].double()).abs().max().item() for name in expected)
    print(f"{'syncnorm' if sync else 'plain BatchNorm'} on 2 Ray workers, running_mean[:4] = "
          f"{[round(value, 4) for value in result.metrics['running_mean']]}")
    print(f"one process on the global batch,   running_mean[:4] = "
          f"{[round(value, 4) for value in expected['1.running_mean'][:4].tolist()]}")
    print(f"largest difference over the model's {len(expected)} tensors: {difference:.1e}")


if __name__ == "__main__":
    main()
