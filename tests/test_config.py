"""Config loading and every bad input of launch/train.py: one clear line on stderr, exit status 2."""

import os
import subprocess
import sys

import pytest
import torch
import yaml

from syncnorm.train import checkpoint as ckpt
from syncnorm.train.config import Config, ConfigError, describe_keys, from_dict, load_config, to_dict
from syncnorm.train.data import DATASET_NAMES, Datasets, make_loaders
from syncnorm.train.errors import DataError
from syncnorm.train.inits import INIT_NAMES
from syncnorm.train.loop import train
from syncnorm.train.norms import NORM_NAMES
from syncnorm.train.ui import Reporter
from trainkit import LENET, ROOT, load_launcher


def _fails(capsys, argv, *fragments):
    """Run launch/train.py's main in-process: exit 2 and exactly one stderr line holding ``fragments``."""
    code = load_launcher().main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --------------------------------------------------------------------------- good configs


def test_shipped_configs_validate_and_round_trip():
    for name in ("lenet.yaml", "resnet18_cifar10.yaml"):
        cfg = load_config(os.path.join(ROOT, "configs", name))
        assert from_dict(to_dict(cfg)) == cfg
        assert yaml.safe_load(yaml.safe_dump(to_dict(cfg))) == to_dict(cfg)
    cfg = load_config(LENET)
    assert (cfg.model.name, cfg.model.norm, cfg.data.name, cfg.output_dir) == ("lenet", "syncbn", "mnist5k", "runs/lenet")
    assert cfg.train.epochs == 5 and cfg.train.batch_size == 64
    # An empty file is all defaults; the defaults are the dataclass defaults.
    assert from_dict(None) == Config()


def test_set_overrides_are_typed_like_yaml(tmp_path):
    cfg = load_config(LENET, ["train.epochs=3", "model.norm=gn", "train.lr=1e-3", "data.download=true",
                              "train.max_steps=7", "data.synthetic_shape=[3, 32, 32]", "output_dir=x/y",
                              "train.epochs=4"])  # the last one wins
    assert cfg.train.epochs == 4 and cfg.model.norm == "gn" and cfg.output_dir == "x/y"
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.data.download is True and cfg.train.max_steps == 7
    assert cfg.data.synthetic_shape == (3, 32, 32)
    assert load_config(LENET, ["train.max_steps=null"]).train.max_steps is None
    # Every key is documented (the README table is generated from this).
    assert all(doc for _, _, _, doc in describe_keys())


# --------------------------------------------------------------------------- one line, exit 2


def test_missing_config_file(capsys, tmp_path):
    _fails(capsys, ["--config", str(tmp_path / "nope.yaml")], "config file not found", "nope.yaml")


def test_yaml_syntax_error_names_the_line(capsys, tmp_path):
    path = _write(tmp_path, "bad.yaml", "model:\n  norm: bn\ntrain:\n  epochs: [3\n  lr: 0.1\n")
    line = _fails(capsys, ["--config", path], "bad.yaml line ", "invalid YAML")
    assert "line 5" in line or "line 4" in line


def test_unknown_key_suggests_the_closest(capsys, tmp_path):
    path = _write(tmp_path, "c.yaml", "train:\n  epoch: 3\n")
    _fails(capsys, ["--config", path], "unknown key train.epoch", "did you mean train.epochs?")
    _fails(capsys, ["--config", LENET, "--set", "modle.norm=bn"], "--set modle.norm=bn",
           "unknown key modle", "did you mean model?")


@pytest.mark.parametrize("override, fragments", [
    ("train.epochs=three", ["train.epochs", "expected an integer", "'three'"]),
    ("data.download=maybe", ["data.download", "expected true or false"]),
    ("train.lr=[1]", ["train.lr", "expected a number"]),
    ("train=5", ["train", "expected a mapping"]),
])
def test_wrong_type(capsys, override, fragments):
    _fails(capsys, ["--config", LENET, "--set", override], *fragments)


@pytest.mark.parametrize("override, fragments", [
    ("train.batch_size=0", ["train.batch_size", "expected an integer >= 1 (got 0)"]),
    ("train.lr=-0.1", ["train.lr", "expected a number > 0.0 (got -0.1)"]),
    ("train.momentum=1.5", ["train.momentum", "< 1.0"]),
    ("data.test_fraction=1", ["data.test_fraction", "< 1.0"]),
])
def test_out_of_range(capsys, override, fragments):
    _fails(capsys, ["--config", LENET, "--set", override], *fragments)


def test_out_of_range_in_file_names_the_file(capsys, tmp_path):
    path = _write(tmp_path, "c.yaml", "train:\n  batch_size: 0\n")
    _fails(capsys, ["--config", path], "c.yaml: train.batch_size: expected an integer >= 1 (got 0)")


@pytest.mark.parametrize("key, valid", [("model.norm", NORM_NAMES), ("model.init", INIT_NAMES),
                                        ("data.name", DATASET_NAMES)])
def test_unknown_names_list_the_valid_ones(capsys, key, valid):
    line = _fails(capsys, ["--config", LENET, "--set", f"{key}=bogus"], key, "'bogus'")
    assert all(name in line for name in valid)


def test_dataset_files_missing_offline(capsys, tmp_path):
    _fails(capsys, ["--config", LENET, "--set", "data.name=fashion_mnist", "--set", f"data.root={tmp_path}",
                    "--set", f"output_dir={tmp_path / 'run'}"],
           "data.name=fashion_mnist", str(tmp_path), "data.download=true", "mnist5k")


def test_world_size_larger_than_the_data():
    tiny = Datasets(torch.utils.data.TensorDataset(torch.zeros(2, 1)), torch.utils.data.TensorDataset(torch.zeros(2, 1)),
                    (1, 1, 1), 10)
    with pytest.raises(DataError, match=r"world size 3 is larger than the training set \(2 samples\)"):
        make_loaders(tiny, batch_size=1, eval_batch_size=1, rank=0, world_size=3, seed=0)
    make_loaders(tiny, batch_size=1, eval_batch_size=1, rank=1, world_size=2, seed=0)  # fits


def test_resume_path_that_does_not_exist(capsys, tmp_path):
    _fails(capsys, ["--config", LENET, "--set", f"output_dir={tmp_path}", "--resume", str(tmp_path / "x.pt")],
           "checkpoint not found", "x.pt")


def _tiny_run(tmp_path, norm="bn", epochs=1, **train_keys):
    cfg = from_dict({"model": {"norm": norm}, "data": {"name": "synthetic", "synthetic_samples": 64},
                     "train": {"epochs": epochs, "batch_size": 16, "max_steps": 1, **train_keys},
                     "output_dir": str(tmp_path / "run")})
    return train(cfg, reporter=Reporter(enabled=False))


def test_checkpoint_from_a_different_model_names_the_keys(capsys, tmp_path):
    result = _tiny_run(tmp_path, norm="bn")
    _fails(capsys, ["--config", LENET, "--set", "model.norm=gn", "--set", "data.name=synthetic",
                           "--set", f"output_dir={tmp_path / 'other'}", "--resume", result.last_checkpoint],
                  "different model", result.last_checkpoint, "unexpected", "running_mean")


class _Payload:
    """Unpickling this runs code: it creates the file named in ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_carrying_code_is_refused(capsys, tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    torch.save({"model": _Payload(str(marker))}, bad)
    _fails(capsys, ["--config", LENET, "--set", f"output_dir={tmp_path / 'run'}", "--resume", str(bad)],
           "refused to load", str(bad), "weights_only")
    assert not marker.exists()
    torch.load(bad, weights_only=False)  # proves the file is dangerous (and the refusal mattered)
    assert marker.exists()


def test_truncated_checkpoint_is_reported_with_its_path(capsys, tmp_path):
    result = _tiny_run(tmp_path)
    data = open(result.last_checkpoint, "rb").read()
    broken = tmp_path / "broken.pt"
    broken.write_bytes(data[: len(data) // 2])
    _fails(capsys, ["--config", LENET, "--set", "data.name=synthetic", "--set", "model.norm=bn",
                    "--set", f"output_dir={tmp_path / 'run2'}", "--resume", str(broken)],
           "truncated or corrupt", str(broken))


def test_eval_launcher_bad_checkpoint_is_one_line(capsys, tmp_path):
    module = load_launcher("eval")
    assert module.main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: checkpoint not found: {tmp_path / 'missing.pt'}"]
    assert module.main(["--checkpoint", str(tmp_path)]) == 2  # a directory without checkpoints
    assert capsys.readouterr().err.strip().splitlines() == [f"error: no checkpoint (ckpt_epoch*.pt) in {tmp_path}"]


def test_real_command_line_prints_one_line_no_traceback(tmp_path):
    """The same through a real interpreter: nothing but the error line on stderr."""
    path = _write(tmp_path, "c.yaml", "train:\n  lr: -1\n")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config", path],
                          capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {path}: train.lr: expected a number > 0.0 (got -1.0)"]
    assert proc.stdout == ""


def test_config_errors_are_value_errors():
    with pytest.raises(ConfigError, match=r"train.batch_size: expected an integer \(got True\)"):
        from_dict({"train": {"batch_size": True}})  # a bool is not an integer
    assert issubclass(ConfigError, ValueError)


def test_not_a_training_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, path)  # loads fine with weights_only, but is no checkpoint
    with pytest.raises(ckpt.CheckpointError, match="not a syncnorm training checkpoint"):
        ckpt.load_checkpoint(str(path))
