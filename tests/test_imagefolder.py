"""The launcher on a user's images and models (issue 30): ImageFolder data, torchvision and timm models by
name, mixed precision, channels_last, gradient accumulation, clipping, per-group sync, throughput.

The folder is the mnist5k digits written as 32x32 RGB PNGs (launch/make_imagefolder.py). The default suite
runs one 2-rank case (torchvision's resnet18 from the folder equals one process on the global batch, float64)
and the one-line checks of bad input; the rest is marked slow (torchrun launches, timm, 4 ranks, bf16).
"""

import json
import math
import os
import sys

import pytest
import torch

import syncnorm.distributed
from syncnorm.testing import run_ranks
from syncnorm.train import cli
from syncnorm.train.build import datasets_of, make_model, network_of
from syncnorm.train.config import from_dict, to_dict
from syncnorm.train.data import ImageFiles, write_digit_folder
from syncnorm.train.distributed import DistInfo, seed_everything
from syncnorm.train.errors import ConfigError
from syncnorm.train.loop import train
from trainkit import DETERMINISTIC, QUIET, ROOT, free_port, run_in_session

TIMM_MODEL = "timm:mobilenetv3_small_050"  # small, built from timm's BatchNormAct2d


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """train/ and val/ with 6 digits per class each (60 + 60 PNGs)."""
    root = tmp_path_factory.mktemp("digits")
    assert write_digit_folder(str(root), per_class=6) == (60, 60)
    return str(root)


def _config(out, root, **sections):
    """An imagefolder run: float64 torchvision resnet18, 2 steps of 4 per rank, no augmentation randomness
    beyond the seeded crops."""
    cfg = {"model": {"name": "torchvision:resnet18", "norm": "syncbn"},
           "data": {"name": "imagefolder", "root": root, "image_size": 32, "min_crop_scale": 0.5},
           "train": {"epochs": 1, "batch_size": 4, "max_steps": 2, "dtype": "float64", "lr": 0.05,
                     "eval_batch_size": 30, "seed": 5},
           "output_dir": str(out)}
    for section, keys in sections.items():
        cfg.setdefault(section, {}).update(keys)
    return to_dict(from_dict(cfg))


def _train(rank, world_size, cfg):
    result = train(from_dict(cfg), reporter=QUIET)
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}, result.metrics


def _assert_same_run(two, one, rtol=1e-9, atol=1e-11):
    (state2, metrics2), (state1, metrics1) = two, one
    for key, expected in state1.items():
        torch.testing.assert_close(state2[key], expected, rtol=rtol, atol=atol, msg=key)
    for row2, row1 in zip(metrics2, metrics1):
        for key in DETERMINISTIC:
            assert row2[key] == pytest.approx(row1[key], rel=1e-9, abs=1e-12), key


# --------------------------------------------------------------------------- the default suite's case


@pytest.mark.parametrize("model", ["lenet", pytest.param("torchvision:resnet18", marks=pytest.mark.slow),
                                   pytest.param(TIMM_MODEL, marks=pytest.mark.slow)])
def test_two_ranks_train_from_a_folder_like_one_process(digits, tmp_path, model):
    """2 ranks x 4 with SyncBN == 1 process x 8 (float64), from PNGs decoded and randomly cropped per sample:
    each sample's crop depends on (seed, epoch, index) only, not on the rank that loads it. timm's model is
    built from BatchNormAct2d layers, which become synced ones."""
    two = run_ranks(_train, 2, _config(tmp_path / "two", digits, model={"name": model}), timeout=300)
    assert all(torch.equal(v, two[1][0][k]) for k, v in two[0][0].items())  # the ranks agree
    one = _train(0, 1, _config(tmp_path / "one", digits, model={"name": model}, train={"batch_size": 8}))
    _assert_same_run(two[0], one)
    row = two[0][1][0]
    assert row["samples"] == 16 and 0.0 <= row["data_wait"] <= 1.0


def test_training_crops_depend_on_seed_epoch_and_index_only(digits):
    data = datasets_of(from_dict(_config("unused", digits)), download=False)
    assert isinstance(data.train, ImageFiles) and data.shape == (3, 32, 32) and data.num_classes == 10
    torch.manual_seed(0)
    first = data.train[7][0]
    torch.manual_seed(123)  # the global RNG does not matter, and is left as it was
    state = torch.get_rng_state()
    assert torch.equal(data.train[7][0], first) and torch.equal(torch.get_rng_state(), state)
    data.train.set_epoch(2)
    assert not torch.equal(data.train[7][0], first)  # another epoch, another crop
    assert torch.equal(data.test[3][0], data.test[3][0])


# --------------------------------------------------------------------------- bad input: one line, exit 2


def _fails(capsys, argv):
    """launch/train.py's main in this process: exit 2 and one error line (nothing else on stderr)."""
    assert cli.train_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _argv(tmp_path, root, *sets):
    argv = ["--config", os.path.join(ROOT, "configs", "resnet18_imagefolder.yaml"),
            "--set", f"data.root={root}", "--set", f"output_dir={tmp_path / 'run'}",
            "--set", "model.name=lenet", "--set", "data.num_workers=0", "--set", "train.batch_size=4"]
    for text in sets:
        argv += ["--set", text]
    return argv


def test_missing_and_empty_folders_are_one_line(capsys, tmp_path):
    line = _fails(capsys, _argv(tmp_path, tmp_path / "nowhere"))
    assert "no such directory" in line and "launch/make_imagefolder.py" in line
    (tmp_path / "empty").mkdir()
    assert "expected one folder per class" in _fails(capsys, _argv(tmp_path, tmp_path / "empty"))
    (tmp_path / "hollow" / "cat").mkdir(parents=True)
    (tmp_path / "hollow" / "cat" / "notes.txt").write_text("not an image")
    line = _fails(capsys, _argv(tmp_path, tmp_path / "hollow"))
    assert "expected images in every class folder" in line and "cat" in line
    (tmp_path / "half" / "train" / "cat").mkdir(parents=True)
    assert "expected both train/ and val/" in _fails(capsys, _argv(tmp_path, tmp_path / "half"))


def test_train_and_val_with_other_class_folders_is_one_line(capsys, tmp_path):
    root = tmp_path / "digits"
    write_digit_folder(str(root), per_class=2)
    os.rename(root / "val" / "7", root / "val" / "seven")
    line = _fails(capsys, _argv(tmp_path, root))
    assert "expected the same class folders in train/ and val/" in line
    assert "only in train/: 7" in line and "only in val/: seven" in line


def test_an_unreadable_image_names_the_file(capsys, tmp_path):
    """Read in a DataLoader worker: the worker's traceback comes back as the one line, naming the file."""
    root = tmp_path / "digits"
    write_digit_folder(str(root), per_class=2)
    bad = root / "train" / "3" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    line = _fails(capsys, _argv(tmp_path, root, "data.num_workers=1", "train.shuffle=false", "train.drop_last=false"))
    assert f"cannot read image {bad}" in line and "remove it or replace it" in line


@pytest.mark.parametrize("name, hint", [("resnet5O", "did you mean resnet50"),
                                        ("timm:mobilenetv3_smal_050", "did you mean timm:mobilenetv3_small_050"),
                                        ("resnet18d", "did you mean timm:resnet18d")])
def test_unknown_model_names_say_did_you_mean(capsys, tmp_path, name, hint):
    line = _fails(capsys, _argv(tmp_path, tmp_path, f"model.name={name}"))
    assert "model.name" in line and hint in line


def test_speed_settings_that_cannot_work_are_one_line(capsys, tmp_path):
    root = tmp_path / "digits"
    write_digit_folder(str(root), per_class=2)
    assert "on CPU use train.amp=bf16" in _fails(capsys, _argv(tmp_path, root, "train.amp=fp16"))
    assert "expected train.dtype=float32" in _fails(capsys, _argv(tmp_path, root, "train.amp=bf16",
                                                                  "train.dtype=float64"))
    assert "expected syncbn or bn for model.name=timm:" in _fails(
        capsys, _argv(tmp_path, root, f"model.name={TIMM_MODEL}", "model.norm=gn"))
    assert "model.weights" in _fails(capsys, _argv(tmp_path, root, f"model.weights={tmp_path / 'none.pt'}"))


def test_weights_load_a_local_state_dict_and_keep_a_new_classifier(tmp_path):
    digits = tmp_path / "digits"
    write_digit_folder(str(digits), per_class=2)
    info = DistInfo(0, 1, 0, 1, "", torch.device("cpu"), False)
    cfg = from_dict(_config(tmp_path / "run", str(digits), train={"dtype": "float32"}))
    data = datasets_of(cfg, download=False)
    source = torchvision_resnet18(num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "imagenet_shaped.pt")
    warnings = []
    cfg = from_dict(_config(tmp_path / "run", str(digits), train={"dtype": "float32"},
                            model={"weights": str(tmp_path / "imagenet_shaped.pt")}))
    model = make_model(cfg, data, info, warnings.append)
    assert torch.equal(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert model.fc.weight.shape == (10, 512) and "fc.bias, fc.weight keep their fresh init" in warnings[0]
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="missing: .* other shape: conv1.weight"):
        make_model(from_dict(_config(tmp_path / "run", str(digits), model={"weights": str(tmp_path / "other.pt")})),
                   data, info)


def torchvision_resnet18(num_classes):
    from torchvision.models import resnet18

    return resnet18(weights=None, num_classes=num_classes)


# --------------------------------------------------------------------------- speed knobs, one process (LeNet)


def _lenet(out, **train_keys):
    cfg = {"model": {"name": "lenet", "norm": "gn"}, "data": {"name": "mnist5k"},
           "train": {"epochs": 1, "batch_size": 16, "max_steps": 3, "dtype": "float64", "lr": 0.1, "momentum": 0.0,
                     "weight_decay": 0.0, "seed": 1, "shuffle": False, **train_keys},
           "output_dir": str(out)}
    return to_dict(from_dict(cfg))


def test_grad_accum_equals_the_large_batch_and_clip_bounds_the_step(tmp_path):
    """GroupNorm (per sample): 2 micro-batches of 8 per step == one batch of 16; the clipped step moves the
    weights by lr * clip (no momentum, no weight decay)."""
    accum = _train(0, 1, _lenet(tmp_path / "accum", batch_size=8, grad_accum=2))
    whole = _train(0, 1, _lenet(tmp_path / "whole"))
    _assert_same_run(accum, whole)
    assert accum[1][0]["samples"] == whole[1][0]["samples"] == 48
    cfg = from_dict(_lenet(tmp_path / "clip", clip_grad=0.01, max_steps=1))
    seed_everything(cfg.train.seed)  # what train() builds its model from
    start = network_of(cfg, datasets_of(cfg, download=False)).double().state_dict()
    clipped = _train(0, 1, to_dict(cfg))[0]
    moved = torch.cat([(clipped[k] - start[k]).flatten() for k in start if k.endswith(("weight", "bias"))])
    assert moved.norm().item() == pytest.approx(0.1 * 0.01, rel=1e-6)


def test_channels_last_trains_to_the_same_weights(tmp_path):
    plain = _train(0, 1, _lenet(tmp_path / "plain"))
    last = _train(0, 1, _lenet(tmp_path / "last", channels_last=True))
    assert last[0]["4.weight"].is_contiguous(memory_format=torch.channels_last)
    assert not plain[0]["4.weight"].is_contiguous(memory_format=torch.channels_last)
    _assert_same_run(last, plain, rtol=1e-9, atol=1e-12)


def test_the_fp16_scaler_path_unscales_before_clipping(tmp_path):
    """train.amp=fp16's step (scale the loss, unscale, clip, scaler.step) with torch's CPU GradScaler: its
    scales are powers of 2, so without autocast the step equals the unscaled one bit for bit."""
    from syncnorm.train.data import make_loaders
    from syncnorm.train.epoch import StepSettings, train_one_epoch

    cfg = from_dict(_lenet(tmp_path, dtype="float32"))
    data = datasets_of(cfg, download=False)
    info = DistInfo(0, 1, 0, 1, "", torch.device("cpu"), False)
    states = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)):
        seed_everything(1)
        model = network_of(cfg, data)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loader, _, _ = make_loaders(data, batch_size=16, eval_batch_size=100, rank=0, world_size=1, seed=1,
                                    shuffle=False)
        train_one_epoch(model, loader, optimizer, info, torch.float32, max_steps=3,
                        settings=StepSettings(scaler=scaler, clip_grad=0.05))
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


# --------------------------------------------------------------------------- slow: more of the same


class _Losses:
    def __init__(self):
        self.losses = []

    def on_step(self, state):
        self.losses.append(float(state.loss))


def _losses(rank, world_size, cfg):
    recorder = _Losses()
    result = train(from_dict(cfg), reporter=QUIET, callbacks=[recorder])
    return recorder.losses, result.metrics


# bf16 keeps 8 bits of mantissa (about 0.4 % per rounding). Measured here (one process, batch 8, lr 0.002, no
# momentum, 6 steps): LeNet's bf16 loss stayed within 0.3 % of float32's at every step; torchvision's resnet18
# within 0.5 % at the first step (same weights), then up to 12 % (its last BatchNorm layers normalize 8 values
# of a 1x1 map per channel, which amplifies the rounding), so it is held to the first step only.
BF16_LOSS_RTOL = 0.02


@pytest.mark.slow
@pytest.mark.parametrize("model", ["lenet", "torchvision:resnet18"])
def test_bf16_autocast_tracks_float32(digits, tmp_path, model):
    keys = {"dtype": "float32", "max_steps": 6, "momentum": 0.0, "lr": 0.002}
    full = run_ranks(_losses, 2, _config(tmp_path / "fp32", digits, model={"name": model}, train=keys), timeout=300)
    half = run_ranks(_losses, 2, _config(tmp_path / "bf16", digits, model={"name": model},
                                         train={**keys, "amp": "bf16"}), timeout=300)
    (full_losses, _), (half_losses, _) = full[0], half[0]
    assert len(full_losses) == len(half_losses) == 6 and all(map(math.isfinite, half_losses))
    assert full_losses != half_losses  # bf16 really ran
    tracked = full_losses if model == "lenet" else full_losses[:1]
    for step, (a, b) in enumerate(zip(tracked, half_losses)):
        assert b == pytest.approx(a, rel=BF16_LOSS_RTOL), (step, full_losses, half_losses)


@pytest.mark.slow
def test_syncbn_beats_chance_on_the_digits(tmp_path):
    root = tmp_path / "digits"
    write_digit_folder(str(root), per_class=40)  # 400 train / 400 val
    # Plain SGD: with momentum 0.9 the eval-mode accuracy after 3 epochs depended on the CPU's rounding
    # (0.11 to 0.45 over seeds 1, 2, 5 on an AMD EPYC of CPU family 26; over 0.3 on the machines before).
    # Without momentum: 0.71 to 0.77 over seeds 1-5 there.
    cfg = _config(tmp_path / "run", str(root), data={"hflip": False, "min_crop_scale": 0.6},
                  train={"dtype": "float32", "max_steps": None, "epochs": 3, "batch_size": 16, "lr": 0.05,
                         "momentum": 0.0, "eval_batch_size": 100})
    (_, metrics), _ = run_ranks(_train, 2, cfg, timeout=600)
    assert metrics[-1]["test_acc"] > 0.5, metrics  # chance: 10 %


@pytest.mark.slow
def test_grad_accum_under_ddp_no_sync_equals_the_global_batch(tmp_path):
    """2 ranks x 2 micro-batches of 8 (the first backward under DDP's no_sync) == one process x 32, GroupNorm,
    float64: each loss divided by the step's micro-batches, and the summed gradients all-reduced by the last
    backward (one left under no_sync would leave each rank its own gradients, and the ranks would part)."""
    two = run_ranks(_train, 2, _lenet(tmp_path / "two", batch_size=8, grad_accum=2, shuffle=True), timeout=300)
    one = _train(0, 1, _lenet(tmp_path / "one", batch_size=32, shuffle=True))
    _assert_same_run(two[0], one)
    assert two[0][1][0]["samples"] == one[1][0]["samples"] == 96


def _grouped_layers(rank, world_size, group_size):
    """One synced step of LeNet-BN built by the launcher with sync.group_size, on this rank's own batch."""
    cfg = from_dict({"model": {"name": "lenet", "norm": "syncbn"}, "train": {"dtype": "float64", "seed": 2},
                     "sync": {"group_size": group_size}})
    data = datasets_of(cfg, download=False)
    info = DistInfo(rank, world_size, rank, world_size, "gloo", torch.device("cpu"), False)
    torch.manual_seed(2)
    model = make_model(cfg, data, info)
    inputs = data.train.tensors[0][rank * 6:(rank + 1) * 6].double().requires_grad_()
    model(inputs).square().sum().backward()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    return stats, inputs.grad.clone()


def _bad_group_size(rank, world_size):
    with pytest.raises(ValueError, match=r"expected group_size to divide the world size 4 \(got 3\); use one of 1, "
                                         r"2, 4"):
        syncnorm.distributed.sync_groups(3)
    cfg = from_dict({"sync": {"group_size": 3}})
    with pytest.raises(ConfigError, match=r"sync.group_size: expected a divisor of the world size 4 \(got 3\)"):
        make_model(cfg, datasets_of(cfg, download=False), DistInfo(rank, 4, rank, 4, "gloo", torch.device("cpu"),
                                                                    False))
    return True


@pytest.mark.slow
def test_sync_group_size_2_at_4_ranks_is_two_independent_2_rank_syncs():
    """Running statistics and input gradients of ranks {0, 1} and {2, 3} equal plain BatchNorm on each
    pair's concatenated batch (float64): two independent syncs, not one over 4 ranks."""
    ranks = run_ranks(_grouped_layers, 4, 2, timeout=300)
    cfg = from_dict({"model": {"name": "lenet", "norm": "bn"}, "train": {"dtype": "float64", "seed": 2}})
    data = datasets_of(cfg, download=False)
    for group in ((0, 1), (2, 3)):
        torch.manual_seed(2)
        reference = make_model(cfg, data, DistInfo(0, 1, 0, 1, "", torch.device("cpu"), False))
        inputs = data.train.tensors[0][group[0] * 6:(group[1] + 1) * 6].double().requires_grad_()
        reference(inputs).square().sum().backward()
        for rank in group:
            stats, grad = ranks[rank]
            for key, value in stats.items():
                torch.testing.assert_close(value, reference.state_dict()[key], rtol=1e-12, atol=1e-12, msg=key)
            torch.testing.assert_close(grad, inputs.grad[(rank - group[0]) * 6:(rank - group[0] + 1) * 6],
                                       rtol=1e-9, atol=1e-12)
    assert not torch.allclose(ranks[0][0]["1.running_mean"], ranks[2][0]["1.running_mean"])
    assert run_ranks(_bad_group_size, 4, timeout=120) == [True] * 4


def _torchrun(tmp_path, out, nproc, *sets):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = [torchrun, f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
               os.path.join(ROOT, "launch", "train.py"), "--config",
               os.path.join(ROOT, "configs", "resnet18_imagefolder.yaml"), "--set", f"output_dir={out}"]
    for text in sets:
        command += ["--set", text]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    output = run_in_session(command, str(tmp_path), env, 600, f"torchrun --nproc_per_node={nproc}")
    return output, [json.loads(line) for line in open(out / "metrics.jsonl")]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["torchvision:resnet18", TIMM_MODEL])
def test_torchrun_trains_from_the_folder_with_workers_like_one_process(digits, tmp_path, model):
    """Under torchrun, 2 DataLoader workers per rank decode and augment; the metrics equal one process on the
    global batch (float64)."""
    sets = [f"data.root={digits}", f"model.name={model}", "data.num_workers=2", "train.dtype=float64",
            "train.max_steps=2", "train.epochs=2", "train.batch_size=4", "train.eval_batch_size=30"]
    output, two = _torchrun(tmp_path, tmp_path / "two", 2, *sets)
    assert "data imagefolder (60 train / 60 test)" in output and "synced over all ranks" in output
    _, one = _torchrun(tmp_path, tmp_path / "one", 1, *sets, "train.batch_size=8")
    for row2, row1 in zip(two, one):
        for key in DETERMINISTIC:
            assert row2[key] == pytest.approx(row1[key], rel=1e-9), key
        assert 0.0 <= row2["data_wait"] <= 1.0
