"""syncnorm inside Lightning (Trainer plugin), Lightning Fabric and HF accelerate, on 2 CPU processes.

Each test runs this file as a script the way a user runs a training script (``python script.py``,
Lightning's own launcher starting rank 1, for Fabric and then the Trainer in the same two processes;
torchrun for accelerate), in a new session with a deadline, and compares what every rank wrote with
one process training plain BatchNorm on the concatenated batches in float64.
The frameworks pick and shard the data (Lightning's shuffling DistributedSampler, accelerate's
batch sharding), so each rank records the sample indices it trained on and the reference replays them.
"""

import os
import socket
import sys
import traceback
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset

import syncnorm
from trainkit import free_port, run_in_session

STEPS = 3
BATCH = 4  # per rank and step
LR = 0.1
DEADLINE = 120.0  # seconds for one 2-process run; each takes ~10 s here


def make_model() -> nn.Module:
    """Plain BatchNorm model in float64, the same on every rank and in the reference."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
        nn.Linear(3 * 4 * 4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 1),
    ).double()


class IndexedData(Dataset):
    """32 samples ``(index, x, y)``; the index tells the reference which samples a rank trained on."""

    def __init__(self):
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(32, 2, 6, 6, generator=generator, dtype=torch.float64) * 2 + 1
        self.y = torch.randn(32, 1, generator=generator, dtype=torch.float64)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return index, self.x[index], self.y[index]


def bn_classes(model: nn.Module):
    return [type(m).__name__ for m in model.modules() if isinstance(m, _BatchNorm)]


def result(model: nn.Module, seen, classes_in_training) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "seen": torch.stack(seen),  # (STEPS, BATCH) sample indices
        "classes_in_training": classes_in_training,
        "classes_after": bn_classes(model),
    }


# ---- the three scripts (run as: python tests/test_integrations.py {lightning,fabric,accelerate} OUT)


def run_lightning_trainer(out: str) -> None:
    import lightning.pytorch as L
    from lightning.pytorch.strategies import DDPStrategy

    from syncnorm.integrations.lightning import SyncNormLayerSync

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_model()
            self.seen, self.classes_in_training = [], None

        def training_step(self, batch, batch_index):
            index, x, y = batch
            self.seen.append(index.clone())
            self.classes_in_training = self.classes_in_training or bn_classes(self.trainer.strategy.model)
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

        def train_dataloader(self):
            return DataLoader(IndexedData(), batch_size=BATCH, shuffle=True)

    module = Module()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, plugins=[SyncNormLayerSync()],
        strategy=DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60)),
        precision="64-true", max_steps=STEPS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module)
    torch.save(result(module.net, module.seen, module.classes_in_training),
               os.path.join(out, f"rank{trainer.global_rank}.pt"))


def run_fabric(out: str) -> None:
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    # Default precision: the model is float64 already, and "64-true" would cast its outputs back to the
    # default dtype (float32), which the float64 comparison would see.
    fabric = Fabric(accelerator="cpu", devices=2,
                    strategy=DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60)))
    fabric.launch()
    model = syncnorm.convert_sync_batchnorm(make_model())  # the recipe: convert first,
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, optimizer = fabric.setup(model, optimizer)  # then set up as usual
    classes_in_training = bn_classes(model)
    loader = fabric.setup_dataloaders(DataLoader(IndexedData(), batch_size=BATCH, shuffle=True))
    seen = []
    for _, (index, x, y) in zip(range(STEPS), loader):
        seen.append(index.clone())
        fabric.backward(F.mse_loss(model(x), y))
        optimizer.step()
        optimizer.zero_grad()
    torch.save(result(model.module, seen, classes_in_training), os.path.join(out, f"rank{fabric.global_rank}.pt"))


def run_accelerate(out: str) -> None:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=60))])
    model = syncnorm.convert_sync_batchnorm(make_model())  # the recipe: convert before prepare
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loader = DataLoader(IndexedData(), batch_size=BATCH, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    assert isinstance(model, nn.parallel.DistributedDataParallel), type(model)
    classes_in_training = bn_classes(model)
    seen = []
    for _, (index, x, y) in zip(range(STEPS), loader):
        seen.append(index.clone())
        accelerator.backward(F.mse_loss(model(x), y))
        optimizer.step()
        optimizer.zero_grad()
    torch.save(result(accelerator.unwrap_model(model), seen, classes_in_training),
               os.path.join(out, f"rank{accelerator.process_index}.pt"))


def run_fabric_then_trainer(out: str) -> None:
    """Both Lightning runs in one pair of processes (Lightning's imports dominate the time): Fabric
    starts rank 1; the Trainer then finds the ranks and the process group in place."""
    os.makedirs(os.path.join(out, "fabric"), exist_ok=True)
    os.makedirs(os.path.join(out, "trainer"), exist_ok=True)
    run_fabric(os.path.join(out, "fabric"))
    run_lightning_trainer(os.path.join(out, "trainer"))


SCRIPTS = {"lightning": run_lightning_trainer, "fabric": run_fabric, "accelerate": run_accelerate,
           "fabric+trainer": run_fabric_then_trainer}


# ---- the tests


def _launch(command, tmp_path, env_extra=None):
    """Run ``command`` in its own session; kill the whole session at the deadline; return its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               PYTHONUNBUFFERED="1", **(env_extra or {}))
    if "lo" in [name for _, name in socket.if_nameindex()]:
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return run_in_session(command, tmp_path, env, DEADLINE, f"{command[-2]} run")


def _reference(seen_by_rank):
    """One process, plain BatchNorm, each step on the concatenation of the ranks' batches."""
    data = IndexedData()
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        index = torch.cat([seen[step] for seen in seen_by_rank])
        F.mse_loss(model(data.x[index]), data.y[index]).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.state_dict()


def _check_against_reference(results, converted_class="SyncBatchNorm", reverted=True):
    rank0, rank1 = results
    # The framework gave the ranks different samples (else the test would not show any syncing).
    assert not set(rank0["seen"].flatten().tolist()) & set(rank1["seen"].flatten().tolist())
    assert rank0["classes_in_training"] == [converted_class] * 2
    assert rank0["classes_after"] == (["BatchNorm2d", "BatchNorm1d"] if reverted else [converted_class] * 2)
    expected = _reference([rank0["seen"], rank1["seen"]])
    assert rank0["state"].keys() == rank1["state"].keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(rank0["state"][name], rank1["state"][name]), name  # ranks bitwise equal
        torch.testing.assert_close(rank0["state"][name], value, rtol=0, atol=1e-10, msg=name)
    # The statistics moved away from their initial values: the comparison is not vacuous.
    assert rank0["state"]["5.num_batches_tracked"] == STEPS
    assert rank0["state"]["1.running_var"].sub(1).abs().max() > 0.05


def _run_script(name, tmp_path, launcher=()):
    out = tmp_path / "out"
    out.mkdir()
    _launch([*launcher, os.path.abspath(__file__), name, str(out)], tmp_path)
    return out


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory):
    """One 2-process run of Fabric, then the Trainer (see run_fabric_then_trainer)."""
    pytest.importorskip("lightning", reason="the Lightning tests need pip install -e '.[dev]'")
    out = _run_script("fabric+trainer", tmp_path_factory.mktemp("lightning"), launcher=[sys.executable])
    return {part: [torch.load(out / part / f"rank{rank}.pt") for rank in range(2)] for part in ("fabric", "trainer")}


def test_lightning_trainer_plugin_equals_one_process_on_the_global_batch(lightning_runs):
    _check_against_reference(lightning_runs["trainer"])  # the plugin's revert ran at the end of fit


def test_fabric_recipe_equals_one_process_on_the_global_batch(lightning_runs):
    _check_against_reference(lightning_runs["fabric"], reverted=False)


def test_accelerate_recipe_equals_one_process_on_the_global_batch(tmp_path):
    pytest.importorskip("accelerate", reason="the accelerate test needs pip install -e '.[dev]'")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    launcher = [torchrun, "--nproc_per_node=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}"]
    out = _run_script("accelerate", tmp_path, launcher=launcher)
    _check_against_reference([torch.load(out / f"rank{rank}.pt") for rank in range(2)], reverted=False)


def test_pytorch_lightning_trainer_accepts_its_plugin():
    # The two Lightning package names have separate LayerSync classes; each Trainer takes its own.
    pl = pytest.importorskip("pytorch_lightning", reason="needs pip install -e '.[dev]'")
    from syncnorm.integrations import lightning, pytorch_lightning

    plugin = pytorch_lightning.SyncNormLayerSync()
    trainer = pl.Trainer(accelerator="cpu", devices=1, plugins=[plugin], logger=False)
    assert trainer._accelerator_connector._layer_sync is plugin
    with pytest.raises(Exception, match="invalid type for plugin"):
        pl.Trainer(accelerator="cpu", devices=1, plugins=[lightning.SyncNormLayerSync()], logger=False)
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    assert bn_classes(plugin.apply(model)) == ["SyncBatchNorm"]
    assert plugin.revert(model) is model and bn_classes(model) == ["BatchNorm1d"]


if __name__ == "__main__":
    script, out_dir = sys.argv[1], sys.argv[2]
    try:
        SCRIPTS[script](out_dir)
    except BaseException:
        rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
        print(f"rank {rank} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        raise
