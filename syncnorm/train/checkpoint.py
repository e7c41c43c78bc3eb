"""Checkpoints: atomic writes, safe loads, keep-last-k, and fallback to the last good one.

One file per epoch, ``<run dir>/ckpt_epoch{N}.pt``, written by rank 0: a temp file in the same
directory, ``torch.save``, flush, ``os.fsync``, then ``os.replace`` onto the final name (and an fsync
of the directory), so a crash leaves either the old set of files or the new one, never half a file
under a checkpoint name. Only the newest ``keep`` epoch files are kept.

Loading is ``torch.load(..., weights_only=True)`` only: a file that needs arbitrary unpickling (a
pickle carrying code) is refused. Everything stored is tensors, numbers, strings, lists, tuples and
dicts. ``--resume auto`` takes the newest file that loads and validates, reporting (not failing on)
newer ones that are truncated or corrupt.

With several ranks, :func:`agree_on_resume` makes that choice once: rank 0 picks the file, every rank
loads that same file (so ``--resume`` needs an ``output_dir`` every node can read), and a rank that
cannot stops every rank -- never a mix of epochs.
"""

import os
import random
import re
import tempfile
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from syncnorm.train.errors import CheckpointError

FORMAT = "syncnorm.train/1"
REQUIRED_KEYS = ("format", "epoch", "model", "optimizer", "scheduler", "rng", "config", "metrics")
_NAME = re.compile(r"^ckpt_epoch(\d+)\.pt$")
# Temp files of atomic_save/atomic_write_text, left behind only when a writer was killed mid-write.
_TEMP = re.compile(r"^\.(ckpt_epoch\d+\.pt|metrics\.jsonl|config\.yaml|curves\.png)\..+\.tmp$")


def checkpoint_path(run_dir: str, epoch: int) -> str:
    return os.path.join(run_dir, f"ckpt_epoch{epoch}.pt")


def list_checkpoints(run_dir: str) -> List[Tuple[int, str]]:
    """(epoch, path) of every ``ckpt_epoch{N}.pt`` in ``run_dir``, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        match = _NAME.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(run_dir, name)))
    return sorted(found)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported here (e.g. Windows): the file itself is already synced
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """This process's umask (read by setting it and setting it back: the only portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: str, mode: str, write, **open_kwargs) -> None:
    """Call ``write(handle)`` on a temp file in ``path``'s directory, flush and fsync it, then rename it
    onto ``path``: a crash leaves the old file or the new one, never half of one. The file gets the
    mode ``open()`` would give it (0666 less the umask)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        # mkstemp creates the temp file 0600 (private while it is written); the renamed file would keep
        # that mode, so other users could not read a run written under umask 022.
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to ``path`` through a synced temp file in the same directory + rename."""
    _atomic_write(path, "wb", lambda handle: torch.save(obj, handle))


def atomic_write_bytes(data: bytes, path: str) -> None:
    """Write ``data`` to ``path`` atomically (same recipe as :func:`atomic_save`)."""
    _atomic_write(path, "wb", lambda handle: handle.write(data))


def atomic_write_text(text: str, path: str) -> None:
    """Write a small text file atomically (same recipe as :func:`atomic_save`)."""
    _atomic_write(path, "w", lambda handle: handle.write(text), encoding="utf-8")


def save_checkpoint(run_dir: str, epoch: int, payload: Dict[str, Any], keep: int) -> str:
    """Write epoch ``epoch``'s checkpoint and delete all but the newest ``keep``; return its path.
    The file also records the world size that saved it (``world_size``; checked on resume)."""
    path = checkpoint_path(run_dir, epoch)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    atomic_save(dict(payload, format=FORMAT, epoch=epoch, world_size=payload.get("world_size", world)), path)
    for old_epoch, old_path in list_checkpoints(run_dir)[:-keep]:
        try:
            os.unlink(old_path)
        except FileNotFoundError:
            pass
    return path


def remove_stale_temp_files(run_dir: str) -> int:
    """Delete the temp files a killed writer left in ``run_dir`` (never under a checkpoint's name);
    only the run's rank 0 writes there, and it calls this before its first write."""
    removed = 0
    if os.path.isdir(run_dir):
        for name in os.listdir(run_dir):
            if _TEMP.match(name):
                try:
                    os.unlink(os.path.join(run_dir, name))
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


def remove_checkpoints(run_dir: str) -> int:
    """Delete every epoch checkpoint in ``run_dir`` (a fresh run must not resume an older run's)."""
    removed = 0
    for _, path in list_checkpoints(run_dir):
        try:
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Load and validate a checkpoint with ``weights_only=True``; CheckpointError names the path."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint path is a directory, expected a .pt file: {path} "
                              f"(use --resume auto to take the newest checkpoint of the run directory)")
    if not _is_zip_archive(path):
        # torch.save writes a zip archive; anything else (a YAML or JSON file of the run, a legacy
        # pickle) would reach torch's pickle loader, whose refusal reads like a security rejection.
        raise CheckpointError(f"{path} is not a syncnorm checkpoint (expected a ckpt_epoch{{N}}.pt that "
                              f"launch/train.py wrote, a torch.save zip archive; this file is not one)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError (bad zip), EOFError, ...
        text = str(error)
        if "Weights only load failed" in text or "weights_only" in text:
            # Name the global the file wanted to run: the informative line of torch's message.
            culprit = next((line.strip() for line in text.splitlines()
                            if "GLOBAL" in line or "Unsupported" in line), "it is not tensors-only data")
            raise CheckpointError(f"refused to load {path}: torch.load(weights_only=True) rejects it "
                                  f"({culprit}); only load checkpoints you trust") from None
        first = text.strip().splitlines()[0].split(". ")[0] if text.strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({first})") from None
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
        raise CheckpointError(f"{path} is not a syncnorm training checkpoint "
                              f"(expected keys {', '.join(REQUIRED_KEYS)}; missing {', '.join(missing)})")
    if state["format"] != FORMAT:
        raise CheckpointError(f"{path}: expected checkpoint format {FORMAT} (got {state['format']!r})")
    return state


def _is_zip_archive(path: str) -> bool:
    """True when ``path`` starts like a zip archive, or is too short to tell (a truncated checkpoint:
    torch.load reports it)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
        return len(head) < 4 or head == b"PK\x03\x04"
    except OSError:
        return True  # let torch.load report the read error


def find_resume(resume: str, run_dir: str, warn: Callable[[str], None]) -> Optional[Tuple[str, Dict[str, Any]]]:
    """Resolve ``--resume``: ``auto`` -> newest loadable checkpoint of ``run_dir`` (None when there is
    none), else the given path. Corrupt newer files are reported through ``warn`` and skipped."""
    if resume != "auto":
        return resume, load_checkpoint(resume)
    candidates = list_checkpoints(run_dir)
    if not candidates:
        return None
    problems = []
    for _, path in reversed(candidates):
        try:
            state = load_checkpoint(path)
        except CheckpointError as error:
            problems.append(str(error))
            warn(f"{error}; trying an older checkpoint")
            continue
        return path, state
    raise CheckpointError(f"--resume auto: no usable checkpoint in {run_dir} ({'; '.join(problems)})")


class SharedStorageError(CheckpointError):
    """A rank cannot read the checkpoint rank 0 chose: the nodes do not share ``output_dir``.
    Each node's ranks see it alike, so each node says it (not only rank 0's)."""

    every_node = True


def agree_on_resume(resume: str, run_dir: str, info, warn: Callable[[str], None]
                    ) -> Optional[Tuple[str, Dict[str, Any]]]:
    """:func:`find_resume` decided once for all ranks; all ranks must call this.

    Rank 0 resolves ``--resume`` (``auto``: the newest good checkpoint in its ``run_dir``) and
    broadcasts its choice: the path and epoch, or "no checkpoint" (every rank starts at epoch 1), or
    its error (every rank raises it). Every other rank then loads that same path; if any rank cannot,
    or finds another epoch there, every rank raises :class:`SharedStorageError`. A checkpoint saved by
    another world size gives a warning naming both. ``info`` is the rank's ``DistInfo``."""
    found = error = None
    if info.rank == 0:
        try:
            found = find_resume(resume, run_dir, warn)
        except CheckpointError as raised:
            error = raised
    if info.world_size > 1:
        choice = [None if info.rank else
                  ("error", str(error)) if error is not None else
                  ("none",) if found is None else
                  ("file", found[0], int(found[1]["epoch"]))]
        dist.broadcast_object_list(choice, src=0)
        choice = choice[0]
        if choice[0] == "error":
            raise error if error is not None else CheckpointError(choice[1])
        if choice[0] == "none":
            return None
        if info.rank:
            found = _load_same(choice[1], choice[2])
        problem = found if isinstance(found, str) else ""
        problems = [None] * info.world_size
        dist.all_gather_object(problems, problem)
        failed = [rank for rank, text in enumerate(problems) if text]
        if failed:
            names = ", ".join(str(rank) for rank in failed)
            raise SharedStorageError(
                f"--resume {resume}: rank 0 chose {choice[1]} (epoch {choice[2]}), but rank{'s' * (len(failed) > 1)} "
                f"{names} cannot read that same file ({problems[failed[0]]}): --resume needs an output_dir "
                f"every node can read (shared storage, the same path on every node)")
    if error is not None:
        raise error
    if found is not None:
        saved_world = found[1].get("world_size")
        if saved_world is not None and int(saved_world) != info.world_size:
            warn(f"{found[0]} was saved by {int(saved_world)} ranks, this run has {info.world_size}: the global "
                 f"batch and the data each rank sees change, so the results will differ from an uninterrupted run")
    return found


def _load_same(path: str, epoch: int):
    """(path, state) when this rank reads epoch ``epoch`` at ``path``; else a short reason (a string)."""
    try:
        state = load_checkpoint(path)
    except CheckpointError as error:
        return str(error)
    if int(state["epoch"]) != epoch:
        return f"the file there holds epoch {int(state['epoch'])}"
    return path, state


def check_model_state(model: nn.Module, state_dict: Dict[str, torch.Tensor], path: str) -> None:
    """Raise CheckpointError naming the keys that differ between ``model`` and ``state_dict``."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        return

    def few(items):
        return ", ".join(items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")

    parts = []
    if missing:
        parts.append(f"missing {few(missing)}")
    if unexpected:
        parts.append(f"unexpected {few(unexpected)}")
    if shapes:
        parts.append(f"shape (checkpoint vs model) {few(shapes)}")
    raise CheckpointError(f"checkpoint {path} was saved from a different model: {'; '.join(parts)}")


def rng_state() -> Dict[str, Any]:
    """torch/numpy/python RNG states in weights_only-loadable form."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["gauss"]))
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
