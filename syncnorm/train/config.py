"""Run configuration: YAML file (``yaml.safe_load`` only) -> frozen, validated dataclasses.

A config file is a mapping with the sections below; every key is optional and defaults to the value
given here. ``--set a.b=value`` overrides are parsed with YAML too, so they are typed like the file
(``--set train.epochs=3``, ``--set train.lr=0.05``, ``--set data.download=true``). Any mistake raises
:class:`ConfigError` whose message is one line naming the source, the key path and what was expected::

    configs/lenet.yaml: train.batch_size: expected an integer >= 1 (got 0)
    configs/lenet.yaml: unknown key train.epoch; did you mean train.epochs?
"""

import copy
import dataclasses
import difflib
import math
import operator
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import yaml

from syncnorm.train.data import DATASET_NAMES
from syncnorm.train.errors import ConfigError
from syncnorm.train.inits import INIT_NAMES
from syncnorm.train.models import ACTIVATION_NAMES, MODEL_NAMES, model_name_problem
from syncnorm.train.norms import NORM_NAMES

__all__ = [
    "Config", "ConfigError", "DataConfig", "DistConfig", "ModelConfig", "SyncConfig", "TrainConfig",
    "apply_overrides", "from_dict", "load_config", "to_dict",
]


def _opt(default, *, ge=None, gt=None, le=None, lt=None, choices=None, length=None, check=None, kind=None, doc=""):
    """A dataclass field with validation rules in its metadata. ``check(value)`` returns what is wrong
    with a value of the right type (``expected ... (got ...)``), or None; ``kind`` describes the values
    in the key table."""
    rules = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "length": length, "check": check,
             "kind": kind, "doc": doc}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=rules)
    return field(default=default, metadata=rules)


@dataclass(frozen=True)
class ModelConfig:
    name: str = _opt("lenet", check=model_name_problem, kind=f"{' | '.join(MODEL_NAMES)} | a torchvision "
                     f"classification model | timm:NAME",
                     doc="network: the launcher's lenet or resnet18 (CIFAR stem), any torchvision classification "
                         "model by name (torchvision:NAME also), or timm:NAME (needs timm); num_classes from the "
                         "data, no pretrained weights downloaded")
    norm: str = _opt("syncbn", choices=NORM_NAMES, doc="normalization layer (syncbn: synced over ranks)")
    init: str = _opt("default", choices=INIT_NAMES, doc="weight init of conv/linear layers; biases zero")
    act: str = _opt("relu", choices=ACTIVATION_NAMES, doc="activation (d2l's LeNet uses sigmoid; model.norm=syncbn_act "
                                                         "takes leaky_relu)")
    checkpoint_activations: bool = _opt(False, doc="recompute each block's activations in backward instead of "
                                                   "keeping them (torch.utils.checkpoint, non-reentrant); the "
                                                   "same results, less memory, more compute")
    weights: Optional[str] = _opt(None, doc="a local state_dict file (or a launcher checkpoint) loaded into the "
                                            "model after it is built; a classifier whose shape differs "
                                            "(another num_classes) keeps its fresh init; null: none")


@dataclass(frozen=True)
class DataConfig:
    name: str = _opt("mnist5k", choices=DATASET_NAMES, doc="dataset; mnist5k and synthetic work offline")
    root: str = _opt("data", doc="directory of the torchvision datasets, or imagefolder's folder")
    download: bool = _opt(False, doc="let torchvision download missing files (needs internet)")
    test_fraction: float = _opt(0.2, gt=0.0, lt=1.0, doc="mnist5k, and imagefolder without train/ and val/: "
                                                         "share of each class held out for test")
    image_size: int = _opt(224, ge=8, doc="imagefolder: side of the square crops the model sees")
    min_crop_scale: float = _opt(0.08, gt=0.0, le=1.0, doc="imagefolder: smallest image area share of a "
                                                          "training crop (random-resized-crop scale)")
    hflip: bool = _opt(True, doc="imagefolder: random horizontal flips in training")
    synthetic_samples: int = _opt(4096, ge=1, doc="synthetic: training samples (test gets a fifth)")
    synthetic_shape: Tuple[int, ...] = _opt((1, 28, 28), ge=1, length=3, doc="synthetic: [C, H, W]")
    num_workers: int = _opt(0, ge=0, doc="DataLoader worker processes per rank (imagefolder decodes and "
                                         "augments there)")
    shard: str = _opt("pad", choices=("pad", "uneven"),
                      doc="training-set split: pad (DistributedSampler repeats samples so that every rank "
                          "has as many batches) or uneven (every sample once, ranks may have different "
                          "numbers of batches, trained under syncnorm.join; needs train.drop_last=false)")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = _opt(5, ge=1, doc="training epochs")
    batch_size: int = _opt(64, ge=1, doc="per-rank batch; the global batch is this times the world size")
    eval_batch_size: int = _opt(500, ge=1, doc="per-rank batch for evaluation")
    lr: float = _opt(0.1, gt=0.0, doc="SGD learning rate")
    momentum: float = _opt(0.9, ge=0.0, lt=1.0, doc="SGD momentum")
    weight_decay: float = _opt(5e-4, ge=0.0, doc="SGD weight decay (L2)")
    nesterov: bool = _opt(False, doc="Nesterov momentum")
    schedule: str = _opt("none", choices=("none", "cosine", "step"), doc="learning-rate schedule, per epoch")
    step_size: int = _opt(30, ge=1, doc="schedule=step: epochs between decays")
    gamma: float = _opt(0.1, gt=0.0, le=1.0, doc="schedule=step: decay factor")
    seed: int = _opt(0, ge=0, doc="seed of model init, data order and synthetic data")
    dtype: str = _opt("float32", choices=("float32", "float64"), doc="parameter and input dtype")
    shuffle: bool = _opt(True, doc="reshuffle the training set every epoch")
    drop_last: bool = _opt(True, doc="drop each rank's last incomplete batch")
    max_steps: Optional[int] = _opt(None, ge=1, doc="cap on training steps per epoch (null: no cap)")
    keep_checkpoints: int = _opt(3, ge=1, doc="epoch checkpoints kept in the run directory")
    nan_policy: str = _opt("stop", choices=("stop", "skip"),
                           doc="non-finite loss on any rank: stop the run (the last good checkpoint stays) "
                               "or skip that step's update on every rank")
    compile: bool = _opt(False, doc="torch.compile the (DDP-wrapped) model; the first step compiles")
    precise_bn_batches: int = _opt(0, ge=0, doc="before each evaluation, recompute BatchNorm statistics exactly "
                                                "over this many training batches per rank "
                                                "(syncnorm.update_bn_stats); 0: off")
    amp: str = _opt("off", choices=("off", "bf16", "fp16"),
                    doc="mixed precision: forward under torch.autocast in bfloat16 (CPU or CUDA) or float16 "
                        "(CUDA, with a GradScaler); synced layers keep float32 statistics")
    channels_last: bool = _opt(False, doc="model and 4-d inputs in channels_last memory format")
    grad_accum: int = _opt(1, ge=1, doc="micro-batches of train.batch_size per optimizer step (DDP's no_sync "
                                        "until the last); each micro-batch syncs its own BatchNorm statistics")
    clip_grad: Optional[float] = _opt(None, gt=0.0, doc="clip the gradients' total 2-norm to this before "
                                                        "each step (null: no clipping)")


@dataclass(frozen=True)
class SyncConfig:
    group_size: int = _opt(0, ge=0, doc="sync BatchNorm within consecutive groups of this many ranks "
                                        "(syncnorm.distributed.sync_groups; e.g. the ranks of one node); it "
                                        "must divide the world size; 0: all ranks")


@dataclass(frozen=True)
class DistConfig:
    backend: str = _opt("auto", choices=("auto", "gloo", "nccl"), doc="auto: nccl with CUDA, else gloo")
    timeout_s: float = _opt(120.0, gt=0.0, doc="process-group timeout (init and collectives), seconds")
    threads: int = _opt(0, ge=0, doc="torch threads per rank; 0: cores / local ranks (one process: cores - 1)")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    output_dir: str = _opt("runs/lenet", doc="run directory: config.yaml, metrics.jsonl, checkpoints")


class _Invalid(Exception):
    """Internal: a validation failure at ``path``; load_config adds the source."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_describe(inner[0])} or null"
    if origin in (tuple, list):
        return f"a list of {_describe(typing.get_args(tp)[0]).replace('an ', '').replace('a ', '')}s"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


def _got(value) -> str:
    if isinstance(value, (dict, list)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}: {value!r}"[:80]
    return "null" if value is None else repr(value)


# The bounds a field may have: rule name, how it reads, the test a value must pass.
_BOUNDS = (("ge", ">=", operator.ge), ("gt", ">", operator.gt), ("le", "<=", operator.le), ("lt", "<", operator.lt))


def _range_text(rules) -> str:
    return " and ".join(f"{sign} {rules[key]}" for key, sign, _ in _BOUNDS if rules.get(key) is not None)


def _coerce(value, tp, rules, path):
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return _coerce(value, inner, rules, path)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _Invalid(path, f"expected {_describe(tp)} (got {_got(value)})")
        if rules.get("length") is not None and len(value) != rules["length"]:
            raise _Invalid(path, f"expected a list of {rules['length']} items (got {len(value)}: {list(value)!r})")
        inner = typing.get_args(tp)[0]
        return tuple(_coerce(item, inner, rules, f"{path}[{i}]") for i, item in enumerate(value))
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
            if not math.isfinite(value):
                raise _Invalid(path, f"expected a finite number (got {value!r})")
    else:
        ok = isinstance(value, str)
    if not ok:
        expected = _describe(tp)
        if rules.get("choices"):
            expected = f"one of {', '.join(rules['choices'])}"
        raise _Invalid(path, f"expected {expected} (got {_got(value)})")
    problem = rules["check"](value) if rules.get("check") else None
    if problem:
        raise _Invalid(path, problem)
    if rules.get("choices") and value not in rules["choices"]:
        close = difflib.get_close_matches(str(value), rules["choices"], n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise _Invalid(path, f"expected one of {', '.join(rules['choices'])} (got {value!r}){hint}")
    if tp in (int, float) and not all(rules.get(key) is None or test(value, rules[key]) for key, _, test in _BOUNDS):
        raise _Invalid(path, f"expected {_describe(tp)} {_range_text(rules)} (got {value!r})")
    return value


def _unknown_key(key: str, path: str, valid: Iterable[str]) -> _Invalid:
    full = f"{path}.{key}" if path else str(key)
    valid = list(valid)
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    prefix = f"{path}." if path else ""
    if close:
        return _Invalid(full, f"unknown key {full}; did you mean {prefix}{close[0]}?")
    return _Invalid(full, f"unknown key {full}; expected one of {', '.join(prefix + v for v in valid)}")


def _build(cls, data, path: str):
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise _Invalid(path, f"expected a mapping of keys to values (got {_got(data)})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise _unknown_key(key, path, fields)
    values = {}
    for name, spec in fields.items():
        if name not in data:
            continue
        sub = f"{path}.{name}" if path else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, data[name], sub)
        else:
            values[name] = _coerce(data[name], tp, spec.metadata, sub)
    return cls(**values)


def from_dict(data: Any, source: str = "config") -> Config:
    """Validate a plain mapping (as read from YAML) into a :class:`Config`."""
    try:
        return _build(Config, data, "")
    except _Invalid as invalid:
        raise ConfigError(_message(source, invalid)) from None


def _message(source: str, invalid: _Invalid) -> str:
    if invalid.message.startswith("unknown key") or not invalid.path:
        return f"{source}: {invalid.message}"
    return f"{source}: {invalid.path}: {invalid.message}"


def to_dict(config) -> Dict[str, Any]:
    """Nested plain dict (lists, not tuples): what ``config.yaml`` in the run directory holds."""

    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def _parse_override(text: str) -> Tuple[List[str], Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text}: expected KEY=VALUE, e.g. --set train.epochs=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {text}: value is not valid YAML ({str(error).splitlines()[0]})") from None
    return key.split("."), value


def apply_overrides(data: Dict[str, Any], overrides: Iterable[str]) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """Merge ``KEY=VALUE`` overrides into the raw mapping ``data`` (a copy is returned).

    Returns (merged mapping, {key path: "--set ..."}) so errors can name the override they came from.
    """
    merged = copy.deepcopy(data)
    origins = {}
    for text in overrides:
        keys, value = _parse_override(text)
        cls, node, path = Config, merged, ""
        for i, key in enumerate(keys):
            fields = {f.name: f for f in dataclasses.fields(cls)}
            if key not in fields:
                raise ConfigError(f"--set {text}: {_unknown_key(key, path, fields).message}")
            path = f"{path}.{key}" if path else key
            tp = typing.get_type_hints(cls)[key]
            last = i == len(keys) - 1
            if dataclasses.is_dataclass(tp) and not last:
                child = node.get(key)
                if not isinstance(child, dict):
                    child = node[key] = {}
                cls, node = tp, child
            elif not last:
                raise ConfigError(f"--set {text}: {path} is a value, not a section")
            else:
                node[key] = value
        origins[path] = f"--set {text}"
    return merged, origins


def read_yaml(path: str) -> Any:
    """``yaml.safe_load`` of a file, with one-line errors for missing files and syntax errors."""
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    if os.path.isdir(path):
        raise ConfigError(f"config path is a directory, expected a YAML file: {path}")
    try:
        with open(path, "r", encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = error.problem or error.context or "syntax error"
        raise ConfigError(f"{path}{where}: invalid YAML: {what}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {str(error).splitlines()[0]}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from None


def load_config(path: Optional[str], overrides: Iterable[str] = ()) -> Config:
    """Read ``path`` (or start from the defaults when None), apply ``--set`` overrides, validate."""
    data = {} if path is None else read_yaml(path)
    source = path or "defaults"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (model, data, train, dist, "
                          f"sync, output_dir) at the top level (got {_got(data)})")
    merged, origins = apply_overrides(data, overrides)
    try:
        return _build(Config, merged, "")
    except _Invalid as invalid:
        origin = next((o for p, o in origins.items()
                       if invalid.path == p or invalid.path.startswith(p + ".") or invalid.path.startswith(p + "[")),
                      None)
        raise ConfigError(_message(origin or source, invalid)) from None


def describe_keys() -> List[Tuple[str, str, Any, str]]:
    """(key path, type, default, description) for every key: the README's key table."""
    rows = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            path = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], path + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rules = f.metadata
            kind = _describe(hints[f.name])
            if rules.get("kind"):
                kind = rules["kind"]
            elif rules.get("choices"):
                kind = " | ".join(rules["choices"])
            elif _range_text(rules):
                kind = f"{kind} {_range_text(rules)}"
            rows.append((path, kind, default, rules.get("doc", "")))

    walk(Config, "")
    return rows
