"""syncnorm under Ray Train: a TorchTrainer with 2 CPU workers trains exactly what one process trains.

The test runs this file as a script (a local Ray instance, then ``TorchTrainer.fit``) in a new session
with a deadline. In the same two workers it trains the same float64 model twice, each wrapped by
``ray.train.torch.prepare_model`` (DDP): once after ``syncnorm.convert_sync_batchnorm``, once with
plain BatchNorm. Every worker takes its shard of each global batch by its rank. The reference is one
process training plain BatchNorm on the whole global batches with the same optimizer steps: the synced
model matches it, the plain one does not (each worker normalized with, and averaged, its own statistics).

Needs ``pip install -e '.[ray]'``; runs with ``pytest -m engines`` (its own CI step). Ray's session files
go to a temporary directory removed afterwards; nothing is written to /tmp/ray or ~/.ray.
"""

import os
import secrets
import shutil
import sys
import tempfile
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import syncnorm
from trainkit import run_in_session
from test_integrations import bn_classes, make_model  # the same float64 model; Ray's workers import it too

pytestmark = pytest.mark.engines

WORKERS = 2
STEPS = 4
BATCH = 8  # per worker and step
DEADLINE = 240.0  # seconds for the whole Ray run; 57-99 s here (2 cores, load 7-13), mostly Ray starting up


def global_batches():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, WORKERS * BATCH, 2, 6, 6, generator=generator, dtype=torch.float64) * 2 + 1
    y = torch.randn(STEPS, WORKERS * BATCH, 1, generator=generator, dtype=torch.float64)
    return x, y


def train(model: nn.Module, rank: int, world_size: int) -> None:
    """SGD with momentum on shard ``rank`` of each global batch; the mean loss over equal shards, averaged
    over the ranks by DDP, is the global batch's mean loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = global_batches()
    for step in range(STEPS):
        F.mse_loss(model(x[step].chunk(world_size)[rank]), y[step].chunk(world_size)[rank]).backward()
        optimizer.step()
        optimizer.zero_grad()


# ---- the script (run as: python tests/test_ray.py OUT RAY_TEMP_DIR)


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    from ray.train import Checkpoint
    from ray.train.torch import prepare_model

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    record = {"rank": rank, "world_size": world_size}
    for name, convert in (("synced", syncnorm.convert_sync_batchnorm), ("plain", lambda model: model)):
        model = prepare_model(convert(make_model()))
        assert isinstance(model, nn.parallel.DistributedDataParallel), type(model)
        record[f"{name}_classes"] = bn_classes(model)
        train(model, rank, world_size)
        record[name] = {key: value.detach().clone() for key, value in model.module.state_dict().items()}
    torch.save(record, os.path.join(config["out"], f"rank{rank}.pt"))
    # What a user gets back: rank 0's metrics, kept with its checkpoint.
    with tempfile.TemporaryDirectory() as directory:
        torch.save(record["synced"], os.path.join(directory, "model.pt"))
        metrics = {"running_mean": record["synced"]["1.running_mean"].tolist()}
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory) if rank == 0 else None)


def run_trainer(out: str, ray_dir: str) -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))  # else Ray writes ~/.ray/auth_token
    ray.init(num_cpus=WORKERS, _temp_dir=ray_dir)
    try:
        trainer = TorchTrainer(
            train_loop_per_worker, train_loop_config={"out": out},
            scaling_config=ScalingConfig(num_workers=WORKERS, use_gpu=False),
            torch_config=TorchConfig(backend="gloo", timeout_s=60),
            run_config=RunConfig(storage_path=os.path.join(ray_dir, "results"), name="syncnorm"),
        )
        result = trainer.fit()
        with result.checkpoint.as_directory() as directory:
            checkpoint = torch.load(os.path.join(directory, "model.pt"))
        torch.save({"metrics": result.metrics, "checkpoint": checkpoint}, os.path.join(out, "result.pt"))
    finally:
        ray.shutdown()


# ---- the test


def _reference():
    """One process, plain BatchNorm, the whole global batch at every step."""
    model = make_model()
    train(model, rank=0, world_size=1)
    return model.state_dict()


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory):
    pytest.importorskip("ray.train.torch", reason="the Ray Train test needs pip install -e '.[ray]'")
    out = tmp_path_factory.mktemp("ray")
    # Ray's sockets live under its temp dir, and a Unix socket path must stay under 108 bytes.
    ray_dir = tempfile.mkdtemp(prefix="ray_")
    # No usage report sent home; more than Ray's 60 s for starting the workers on a loaded machine.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0",
               RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="180")
    try:
        run_in_session([sys.executable, os.path.abspath(__file__), str(out), ray_dir], out, env, DEADLINE,
                       "the Ray Train run")
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(WORKERS)], torch.load(out / "result.pt")


def test_ray_train_with_syncnorm_equals_one_process_on_the_global_batch(ray_run):
    records, result = ray_run
    assert [record["rank"] for record in records] == [0, 1] and records[0]["world_size"] == WORKERS
    assert records[0]["synced_classes"] == ["SyncBatchNorm"] * 2
    expected = _reference()
    for name, value in expected.items():
        assert torch.equal(records[0]["synced"][name], records[1]["synced"][name]), name  # ranks bitwise equal
        torch.testing.assert_close(records[0]["synced"][name], value, rtol=0, atol=1e-10, msg=name)
        assert torch.equal(result["checkpoint"][name], records[0]["synced"][name]), name
    assert result["metrics"]["running_mean"] == records[0]["synced"]["1.running_mean"].tolist()
    # The statistics moved away from their initial values: the comparison is not vacuous.
    assert records[0]["synced"]["5.num_batches_tracked"] == STEPS
    assert expected["1.running_var"].sub(1).abs().max() > 0.05


def test_ray_train_with_plain_batchnorm_differs_from_the_global_batch(ray_run):
    # The same run without syncnorm: each worker's running statistics are its shard's, and differ.
    records, _ = ray_run
    assert records[0]["plain_classes"] == ["BatchNorm2d", "BatchNorm1d"]
    expected = _reference()
    for name in ("1.running_mean", "1.running_var", "5.running_mean", "5.running_var"):
        for record in records:
            assert (record["plain"][name] - expected[name]).abs().max() > 1e-3, name
    assert (records[0]["plain"]["1.running_mean"] - records[1]["plain"]["1.running_mean"]).abs().max() > 1e-3


if __name__ == "__main__":
    try:
        run_trainer(sys.argv[1], sys.argv[2])
    except BaseException:
        print(f"the Ray Train run failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        raise
