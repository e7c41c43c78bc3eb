"""The command lines of ``launch/train.py`` and ``launch/eval.py``: arguments -> run -> exit status.

Exit status: 0 done; 2 a mistake the user can fix (:class:`ConfigError`: bad config, missing files,
bad checkpoint), printed as one line; 1 a started run that failed (:class:`TrainingError`: a
non-finite loss, a crashed or stuck rank), printed as one line; 130 interrupted (Ctrl-C).
"""

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import torch

from syncnorm.train.config import load_config
from syncnorm.train.elastic import parent_says_failure, record_failure
from syncnorm.train.distributed import default_threads, env_int
from syncnorm.train import rundir
from syncnorm.train.errors import CollectiveError, ConfigError, Interrupted, TrainingError
from syncnorm.train.evaluation import evaluate_checkpoint
from syncnorm.train.loop import train
from syncnorm.train.preflight import check_launch_environment
from syncnorm.train.resume import resumed_config
from syncnorm.train.ui import Reporter, error_line


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/train.py",
        description="Train a CNN (LeNet, any torchvision or timm model) with synced BatchNorm under DDP, on "
                    "built-in digits or your image folder (run it with torchrun or srun, or as one process).",
        epilog="examples:\n"
               "  torchrun --nproc_per_node=2 launch/train.py --config configs/lenet.yaml\n"
               "  torchrun --nproc_per_node=2 launch/train.py --config configs/resnet18_imagefolder.yaml "
               "--set data.root=DIR\n"
               "  python launch/train.py --config configs/lenet.yaml --set output_dir=runs/lenet_1p\n"
               "  torchrun --nproc_per_node=2 launch/train.py --config configs/lenet.yaml --resume auto\n"
               "  srun -N2 -n2 python launch/train.py --config configs/lenet.yaml   (SLURM, no torchrun)\n"
               "config keys, outputs, logs: docs/launcher.md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="YAML config file, e.g. configs/lenet.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, typed like YAML (repeatable): --set train.epochs=3")
    p.add_argument("--resume", metavar="auto|PATH",
                   help="continue from the newest good checkpoint of the run dir (auto) or from PATH")
    p.add_argument("--overwrite", action="store_true",
                   help="start a fresh run even though output_dir holds an earlier run's checkpoints "
                        "(they are deleted)")
    return p


def run_training(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, configure, train; exceptions propagate (:func:`train_main` turns them into exit codes)."""
    args = train_parser().parse_args(argv)
    check_launch_environment()
    cfg = load_config(args.config, args.overrides)
    if args.resume:
        cfg = resumed_config(cfg, args.overrides)
    if env_int("RANK", 0) == 0:  # before any process-group work; the other ranks' torchrun stops them
        rundir.check_writable(cfg.output_dir)
        if not args.resume and not args.overwrite:
            rundir.check_fresh(cfg.output_dir)
    threads = cfg.dist.threads or default_threads(env_int("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(threads)
    train(cfg, resume=args.resume)
    return 0


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    """``launch/train.py``: run, and say a failure in one line (see the module docstring for exit codes).
    Under torchrun each failed rank also writes its line to torchrun's error file
    (:mod:`syncnorm.train.elastic`); under ``launch/run.py`` that wrapper prints it instead."""
    try:
        return run_training(argv)
    except ConfigError as error:
        # Every rank fails alike: said once, or once per node when it concerns each node
        # (NetworkError, SharedStorageError set every_node), or by every process (a broken environment).
        return _failed(str(error), 2, rank_zero() or getattr(error, "every_rank", False) or (
            getattr(error, "every_node", False) and os.environ.get("LOCAL_RANK", "0") == "0"))
    except CollectiveError as error:  # each surviving rank has its own view (rank 0 may be the lost one)
        return _failed(_with_log(error), 1, True)
    except Interrupted as error:  # every rank got the signal (torchrun passes Ctrl-C on): say it once
        # launch/run.py ends quietly on Ctrl-C (torchrun's SignalException): rank 0 says where it stopped.
        return _failed(_with_log(error), 130, rank_zero(), even_under_wrapper=True)
    except TrainingError as error:  # all ranks agree (e.g. a non-finite loss): say it once
        return _failed(_with_log(error), 1, rank_zero())
    except KeyboardInterrupt:  # before the run started
        return _failed("interrupted before the run started", 130, rank_zero(), even_under_wrapper=True)


def _failed(line: str, code: int, say: bool, even_under_wrapper: bool = False) -> int:
    """Report a failure: torchrun's error file, the ``error:`` line when this process says it; ``code``."""
    record_failure(line)
    if say and (even_under_wrapper or not parent_says_failure()):
        error_line(line)
    return code


def rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _with_log(error: BaseException) -> str:
    """The error's line, naming this rank's log file."""
    path = getattr(error, "log_path", None)
    return f"{error} (log: {path})" if path else str(error)


def exit_now(code: int) -> None:
    """Leave without the interpreter's teardown. With torch 2.14 + gloo a worker sometimes aborts in
    C++ destructors at interpreter exit ("terminate called without an active exception", SIGABRT, no
    Python frame) after all its work is done, and torchrun then reports a finished run as failed
    (seen in 1-2 of 10 two-rank runs, with or without this project's changes). By now the checkpoints
    are fsynced and the process group is destroyed: flush the streams and exit."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/eval.py", description="Evaluate a training checkpoint on the full "
                                "test set, in one process, with plain BatchNorm.")
    p.add_argument("--checkpoint", required=True, help="ckpt_epoch{N}.pt, or a run directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the checkpoint's config (e.g. data.root)")
    p.add_argument("--export", metavar="PATH",
                   help="also save the plain-BatchNorm model's state_dict to PATH (load it into a model "
                        "built with model.norm=bn)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return p


def eval_main(argv: Optional[Sequence[str]] = None) -> int:
    """``launch/eval.py``: evaluate, print one line (or JSON); a user mistake is one line and exit 2."""
    args = eval_parser().parse_args(argv)
    try:
        result = evaluate_checkpoint(args.checkpoint, args.overrides, Reporter(), export=args.export)
    except ConfigError as error:
        error_line(str(error))
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['checkpoint']} (epoch {result['epoch']}, {result['model']} + {result['norm']} as plain "
              f"BatchNorm): test accuracy {result['test_acc']:.2%} ({result['test_correct']}/"
              f"{result['test_count']}) on {result['dataset']}, test loss {result['test_loss']:.4f}")
        if args.export:
            print(f"plain-BatchNorm state_dict written to {args.export}")
    return 0
