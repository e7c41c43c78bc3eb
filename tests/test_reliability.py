"""Issue 6: a killed rank loses at most one epoch, a stuck rank fails fast, bad input fails clearly.

- a worker SIGKILLed under ``torchrun --max-restarts=1 ... --resume auto`` is restarted, the run
  resumes from the last checkpoint and ends with the metrics of an uninterrupted run;
- a rank that stalls (SIGSTOP under torchrun) or raises before a collective makes the others fail
  within the process-group timeout, with a message naming that rank;
- a non-finite loss on one rank stops every rank (``train.nan_policy: stop``, naming epoch and step,
  the last good checkpoint kept) or drops that step on every rank (``skip``);
- the bad inputs not covered by tests/test_config.py: one line, non-zero exit.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from syncnorm.testing import run_ranks
from syncnorm.train import checkpoint as ckpt
from syncnorm.train import distributed, epoch, loop
from syncnorm.train.config import from_dict, load_config, to_dict
from trainkit import DETERMINISTIC, LENET, QUIET, ROOT, free_port, load_launcher


def _one_line(capsys, argv, code, *fragments):
    """launch/train.py in-process: exit ``code`` and exactly one stderr line holding ``fragments``."""
    status = load_launcher().main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == code, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _cfg(out, epochs=2, norm="bn", max_steps=4, **train_keys):
    return to_dict(from_dict({
        "model": {"norm": norm}, "data": {"name": "synthetic", "synthetic_samples": 256},
        "train": {"epochs": epochs, "batch_size": 16, "max_steps": max_steps, "seed": 2, **train_keys},
        "output_dir": str(out),
    }))


class _Fault:
    """Wraps ``epoch.training_step`` in a rank's process: at call ``at`` (0-based, over the whole run) on
    rank ``rank`` (None: every rank) it poisons the loss or the inputs with NaN, or raises (``kind`` an
    exception: that one)."""

    def __init__(self, rank, at, kind):
        self.rank, self.at, self.kind = rank, at, kind
        self.calls = 0
        self.original = epoch.training_step

    def __call__(self, model, inputs, targets):
        hit = self.calls == self.at and self.rank in (None, torch.distributed.get_rank())  # None: every rank
        self.calls += 1
        if hit and isinstance(self.kind, BaseException):
            raise self.kind
        if hit and self.kind == "nan_input":
            inputs = inputs.clone()
            inputs[0] = float("nan")
        if hit and self.kind == "raise":
            raise ValueError("injected data bug")
        out = self.original(model, inputs, targets)
        if hit and self.kind == "nan_loss":
            out["loss"] = out["loss"] * float("nan")
        return out


class _LastStep:
    """Remembers when the last training step finished."""

    def __init__(self):
        self.time = time.monotonic()

    def on_step(self, state):
        self.time = time.monotonic()


def _train_with_fault(rank, world_size, cfg, fault):
    epoch.training_step = fault  # this rank's process only (a fresh fork per run)
    last = _LastStep()
    try:
        result = loop.train(from_dict(cfg), reporter=QUIET, callbacks=[last])
    except Exception as error:  # TrainingError, or the injected bug on the faulty rank
        return {"error": type(error).__name__, "message": str(error),
                "seconds_after_last_step": time.monotonic() - last.time}
    state = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
    return {"error": None, "metrics": result.metrics, "state": state}


def _train_each(rank, world_size, runs):
    """Several (config, fault) runs one after the other in one process group."""
    return [_train_with_fault(rank, world_size, cfg, fault) for cfg, fault in runs]


# --------------------------------------------------------------------------- non-finite loss


def test_nan_on_one_rank_stops_every_rank_naming_epoch_and_step(tmp_path):
    """NaN loss on rank 1 only (local BatchNorm: rank 0's loss is finite), epoch 2, step 3: both ranks
    stop at the same step (no hang on a collective), epoch 1's checkpoint stays, epoch 2 is not saved."""
    out = tmp_path / "run"
    ranks = run_ranks(_train_with_fault, 2, _cfg(out, epochs=3), _Fault(rank=1, at=4 + 2, kind="nan_loss"),
                      timeout=120)
    for result in ranks:
        assert result["error"] == "NonFiniteLossError", result
        message = result["message"]
        assert "non-finite training loss at epoch 2, step 3 (on rank 1)" in message
        assert f"last good checkpoint: {out / 'ckpt_epoch1.pt'}" in message and "nan_policy" in message
    assert [e for e, _ in ckpt.list_checkpoints(str(out))] == [1]
    assert ckpt.load_checkpoint(str(out / "ckpt_epoch1.pt"))["epoch"] == 1
    assert [json.loads(line)["epoch"] for line in open(out / "metrics.jsonl")] == [1]


def test_nan_skip_drops_the_step_on_every_rank_and_restores_batchnorm(tmp_path):
    """NaN in rank 1's inputs with SyncBN poisons the global batch statistics, so every rank's loss is
    NaN: with nan_policy=skip the step is dropped everywhere, the running statistics the forward
    touched are restored, and the run goes on."""
    runs = run_ranks(_train_each, 2, [(_cfg(tmp_path / "clean", norm="syncbn"), _Fault(1, -1, "none")),
                                      (_cfg(tmp_path / "skip", norm="syncbn", nan_policy="skip"),
                                       _Fault(rank=1, at=1, kind="nan_input"))], timeout=180)
    clean, skip = [runs[0][0], runs[1][0]], [runs[0][1], runs[1][1]]
    assert skip[0]["error"] is None and skip[1]["error"] is None
    rows, clean_rows = skip[0]["metrics"], clean[0]["metrics"]
    assert [r["skipped_steps"] for r in rows] == [1, 0] and [r["skipped_steps"] for r in clean_rows] == [0, 0]
    assert rows[0]["samples"] == clean_rows[0]["samples"] - 2 * 16 and rows[1]["samples"] == clean_rows[1]["samples"]
    state = skip[0]["state"]
    for key, value in state.items():
        assert torch.equal(value, skip[1]["state"][key]), key  # the ranks still agree
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key
    # The dropped forward's BatchNorm update was undone: one batch fewer tracked than the clean run.
    tracked = [k for k in state if k.endswith("num_batches_tracked")]
    assert tracked and all(state[k].item() == clean[0]["state"][k].item() - 1 for k in tracked)
    written = [json.loads(line) for line in open(tmp_path / "skip" / "metrics.jsonl")]
    assert [r["skipped_steps"] for r in written] == [1, 0]


def test_nan_stop_from_the_command_line_is_one_line(capsys, tmp_path):
    """lr=1e30 without normalization: the first update blows the weights up, step 2's loss is NaN."""
    _one_line(capsys, ["--config", LENET, "--set", "model.norm=none", "--set", "train.lr=1e30",
                       "--set", "data.name=synthetic", "--set", "data.synthetic_samples=128",
                       "--set", "train.batch_size=32", "--set", f"output_dir={tmp_path / 'run'}"],
              1, "non-finite training loss at epoch 1, step 2", "train.nan_policy=stop",
              "last good checkpoint: none")
    assert ckpt.list_checkpoints(str(tmp_path / "run")) == []


# --------------------------------------------------------------------------- bad input not in test_config.py


def test_bad_input_gaps_are_one_line_each(capsys, tmp_path):
    run = tmp_path / "run"
    tiny = ["--set", "data.name=synthetic", "--set", "data.synthetic_samples=64", "--set", "model.norm=bn",
            "--set", "train.batch_size=16", "--set", "train.max_steps=1", "--set", f"output_dir={run}"]
    _one_line(capsys, ["--config", LENET, "--set", "train.nan_policy=ignore"], 2,
              "train.nan_policy: expected one of stop, skip (got 'ignore')")
    _one_line(capsys, ["--config", LENET, *tiny, "--resume", str(tmp_path)], 2,
              "checkpoint path is a directory", "--resume auto")
    assert load_launcher().main(["--config", LENET, *tiny, "--set", "train.epochs=2"]) == 0
    capsys.readouterr()
    for _, path in ckpt.list_checkpoints(str(run)):  # every checkpoint of the run damaged
        open(path, "wb").close()
    line = _one_line(capsys, ["--config", LENET, *tiny, "--resume", "auto"], 2,
                     f"--resume auto: no usable checkpoint in {run}", str(run / "ckpt_epoch2.pt"))
    assert "truncated or corrupt" in line


def test_a_config_carrying_code_is_refused(capsys, tmp_path):
    """yaml.safe_load only: a python/object tag is an error line, and its code never runs."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"train:\n  epochs: !!python/object/apply:os.system ['touch {marker}']\n")
    _one_line(capsys, ["--config", str(path)], 2, str(path), "line 2", "invalid YAML",
              "python/object/apply:os.system")
    assert not marker.exists()


# --------------------------------------------------------------------------- stuck or crashed rank


def test_a_rank_that_raises_before_a_collective_makes_the_others_fail_fast_naming_it(tmp_path):
    """Rank 1 raises (a data bug) before its step-2 forward; rank 0, waiting in that step's collective,
    must fail promptly (within the 3 s process-group timeout at most) with a line naming rank 1.
    A rank that stalls instead is tested under torchrun (SIGSTOP) below."""
    timeout_s = 3
    cfg = _cfg(tmp_path / "run", epochs=1, norm="syncbn")
    cfg["dist"]["timeout_s"] = timeout_s
    rank0, rank1 = run_ranks(_train_with_fault, 2, cfg, _Fault(rank=1, at=1, kind="raise"), timeout=60,
                             pg_timeout=timeout_s)
    assert (rank1["error"], rank1["message"]) == ("ValueError", "injected data bug")
    assert rank0["error"] == "CollectiveError", rank0
    message = rank0["message"]
    assert message.startswith("rank 0: a collective failed during training step at epoch 1, step 2: rank 1 ")
    assert "crashed, was killed, or is stuck" in message
    rank1_log = tmp_path / "run" / "logs" / "rank1.log"
    assert f"see its log {rank1_log} [" in message  # the log it names exists and says what happened there
    assert "error: ValueError: injected data bug (traceback on stderr)" in rank1_log.read_text()
    assert f"error: {message}" in (tmp_path / "run" / "logs" / "rank0.log").read_text()
    # The deadline it must not hang past: the timeout, 2 s waiting for the other ranks' reports, slack.
    assert rank0["seconds_after_last_step"] < timeout_s + 2 + 10


UNSUPPORTED = "no support for _allgather_base in Gloo process group"  # torch 2.1's gloo, verbatim


def test_an_unsupported_operation_is_not_reported_as_a_lost_peer(tmp_path):
    """A backend's "no support for ..." mentions gloo, like a lost peer's errors, but no rank is at fault:
    every rank says what it is in one line (UnsupportedOperationError); any other NotImplementedError
    keeps its own type and traceback; a real lost peer's error still counts as one."""
    from syncnorm.train.failures import is_collective_failure

    assert not is_collective_failure(RuntimeError(UNSUPPORTED))
    assert not is_collective_failure(NotImplementedError("gloo: op not implemented"))
    assert is_collective_failure(RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection "
                                              "closed by peer [127.0.0.1]:41235"))
    cfg = _cfg(tmp_path / "run", epochs=1, norm="syncbn")
    runs = [(cfg, _Fault(rank=None, at=1, kind=RuntimeError(UNSUPPORTED))),
            (cfg, _Fault(rank=None, at=0, kind=NotImplementedError("a missing kernel")))]
    for unsupported, other in run_ranks(_train_each, 2, runs, timeout=60):
        assert unsupported["error"] == "UnsupportedOperationError", unsupported
        message = unsupported["message"]
        assert "an operation is not supported during training step at epoch 1, step 2" in message
        assert UNSUPPORTED in message and "not a lost peer" in message and "crashed" not in message
        assert (other["error"], other["message"]) == ("NotImplementedError", "a missing kernel")


# --------------------------------------------------------------------------- SIGKILL under torchrun


def _descendants(pid):
    """PIDs of every process below ``pid`` (from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _environ(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            pairs = handle.read().split(b"\0")
    except OSError:
        return {}
    return dict(p.decode(errors="replace").split("=", 1) for p in pairs if b"=" in p)


def _wait_for_epoch_1(out, proc, log, seconds=150):
    """Wait until the run in ``out`` has written epoch 1's checkpoint; fail if torchrun ends first.
    Returns the deadline, for the waits that follow."""
    deadline = time.monotonic() + seconds
    while not (out / "ckpt_epoch1.pt").exists():
        assert proc.poll() is None, f"torchrun ended before epoch 1's checkpoint:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no epoch-1 checkpoint in time:\n{log.read_text()}"
        time.sleep(0.02)
    return deadline


def _worker(torchrun_pid, rank, attempt):
    for pid in _descendants(torchrun_pid):
        env = _environ(pid)
        if env.get("RANK") == str(rank) and env.get("TORCHELASTIC_RESTART_COUNT") == str(attempt):
            return pid
    return None


def _exit_status(pid):
    """A finished child's exit code while it is a zombie, "reaped" once its parent collected it, None
    while it runs (Linux: field 52 of /proc/PID/stat is the wait status)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return "reaped"
    if fields[0] != "Z":
        return None
    return int(fields[49]) >> 8 if len(fields) > 49 else "reaped"


def _reference_ranks(rank, world_size, cfg):
    return loop.train(from_dict(cfg), reporter=QUIET).metrics


FAULT_SETTINGS = ["train.epochs=3", "train.batch_size=32", "train.max_steps=40", "train.seed=5"]


def test_sigkilled_worker_is_restarted_by_torchrun_and_resumes_to_the_same_metrics(tmp_path):
    """torchrun --max-restarts=1 ... --resume auto; SIGKILL rank 0 (the checkpoint writer) in epoch 2;
    torchrun restarts both workers, they resume from epoch 1's checkpoint, and the run ends with the
    metrics of an uninterrupted run of the same config."""
    out = tmp_path / "run"
    sets = [arg for s in FAULT_SETTINGS + [f"output_dir={out}"] for arg in ("--set", s)]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = [torchrun, "--nproc_per_node=2", "--max-restarts=1", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{free_port()}", os.path.join(ROOT, "launch", "train.py"),
               "--config", LENET, *sets, "--resume", "auto"]
    log = tmp_path / "torchrun.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log, "w") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=str(tmp_path), env=env,
                                start_new_session=True)
    try:
        deadline = _wait_for_epoch_1(out, proc, log)
        victim = _worker(proc.pid, rank=0, attempt=0)
        assert victim is not None, "rank 0's worker process not found"
        os.kill(victim, signal.SIGKILL)
        killed_in_epoch_2 = not (out / "ckpt_epoch2.pt").exists()
        code = proc.wait(timeout=max(10.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:  # a failure above: no worker may outlive the test
            for pid in _descendants(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    text = log.read_text()
    assert code == 0, text
    assert killed_in_epoch_2, "the kill came after epoch 2's checkpoint: nothing was lost and resumed"
    assert f"resumed from {out / 'ckpt_epoch1.pt'} (epoch 1 done)" in " ".join(text.split()), text
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    # Nothing half-written: every file under a checkpoint name loads, no temp file is left.
    assert all(ckpt.load_checkpoint(path)["epoch"] == epoch for epoch, path in ckpt.list_checkpoints(str(out)))
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]

    # The same config uninterrupted (2 ranks, 1 thread each, in-process): the same numbers.
    cfg = to_dict(load_config(LENET, FAULT_SETTINGS + [f"output_dir={tmp_path / 'reference'}"]))
    reference = run_ranks(_reference_ranks, 2, cfg, timeout=180)[0]
    assert [{k: r[k] for k in DETERMINISTIC} for r in rows] == [{k: r[k] for k in DETERMINISTIC} for r in reference]


@pytest.mark.slow  # a second torchrun launch; the default run has the in-process failing rank above
def test_a_stopped_worker_under_torchrun_makes_rank_0_fail_within_the_timeout(tmp_path):
    """The real thing: SIGSTOP rank 1 under torchrun (a stuck process) after epoch 1. Rank 0 must print
    one line naming rank 1 and exit 1 within dist.timeout_s (3 s) plus the 2 s it waits for reports."""
    out = tmp_path / "run"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = [torchrun, "--nproc_per_node=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
               os.path.join(ROOT, "launch", "train.py"), "--config", LENET, "--set", "dist.timeout_s=3",
               "--set", "train.batch_size=32", "--set", "train.max_steps=20", "--set", f"output_dir={out}"]
    log = tmp_path / "torchrun.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", COLUMNS="400")
    with open(log, "w") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=str(tmp_path), env=env,
                                start_new_session=True)
    expected = ("rank 1 did not join the collective within dist.timeout_s=3: it crashed, was killed, or is "
                "stuck")
    try:
        _wait_for_epoch_1(out, proc, log)
        victim, rank0 = _worker(proc.pid, rank=1, attempt=0), _worker(proc.pid, rank=0, attempt=0)
        assert victim is not None and rank0 is not None, "worker processes not found"
        os.kill(victim, signal.SIGSTOP)  # stuck: alive, holding its sockets, never joining a collective
        stopped = time.monotonic()
        while expected not in log.read_text() or _exit_status(rank0) is None:
            # The deadline it must not hang past: the timeout, the 2 s report wait, and slack.
            assert time.monotonic() - stopped < 3 + 2 + 20, f"rank 0 did not fail in time:\n{log.read_text()}"
            time.sleep(0.1)
        assert _exit_status(rank0) in (1, "reaped")
    finally:
        # torchrun would wait 30 s before it SIGKILLs the stopped worker; the workers are not in
        # torchrun's process group, so kill each of them by pid, then torchrun's group.
        for pid in _descendants(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, text
    assert lines[0].startswith("error: rank 0: a collective failed during training step at epoch 2, step "), text
    assert expected in lines[0] and f"see its log {out / 'logs' / 'rank1.log'} [" in lines[0], text
    assert lines[0].endswith(f"(log: {out / 'logs' / 'rank0.log'})"), text
    assert "model lenet" in (out / "logs" / "rank1.log").read_text()  # the stopped rank's start-up lines
    assert "Traceback" not in text, text  # torchrun's own report comes only after the 30 s it gives workers
    assert [e for e, _ in ckpt.list_checkpoints(str(out))] == [1]  # the last good checkpoint is kept


def test_single_machine_runs_put_gloo_on_loopback(monkeypatch):
    """gloo listens where GLOO_SOCKET_IFNAME says, else on the host name's address: the launcher
    sets ``lo`` when every rank is on this machine and leaves a user's choice alone (the choice for
    ranks on several machines is tested in test_two_machines.py); init_group passes the timeout on."""
    from syncnorm.train.network import apply_gloo_interface

    lo = "lo" if "lo" in [name for _, name in socket.if_nameindex()] else None  # Linux
    for before, after in [(None, lo), ("eth7", "eth7")]:
        environ = {} if before is None else {"GLOO_SOCKET_IFNAME": before}
        apply_gloo_interface("gloo", 2, 2, 0, environ=environ, say=lambda text: None)
        assert environ.get("GLOO_SOCKET_IFNAME") == after, before
    calls = []
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *args, **kwargs: calls.append(kwargs))
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    timeout = distributed.timedelta(seconds=5)
    distributed.init_group("gloo", 0, 2, timeout, 2)
    assert len(calls) == 1 and calls[0]["timeout"] == timeout
