"""What a new user meets at launch/train.py: the run directory checks, earlier runs, a finished run,
Ctrl-C, the per-rank logs, unwrapped output, the thread default, train.compile."""

import json
import math
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

from syncnorm.train import checkpoint as ckpt
from syncnorm.train import build, distributed
from syncnorm.train.config import ConfigError, load_config
from syncnorm.train.ui import Reporter, progress_fields
from trainkit import LENET, ROOT, free_port, load_launcher

LAUNCHER = os.path.join(ROOT, "launch", "train.py")
# A run of a few seconds: synthetic data, 2 steps per epoch.
TINY = ["--set", "data.name=synthetic", "--set", "data.synthetic_samples=64", "--set", "train.batch_size=16",
        "--set", "train.max_steps=2"]


def _run(capsys, out, *extra, epochs=1):
    """launch/train.py in-process; returns (exit status, stdout, stderr)."""
    code = load_launcher().main(["--config", LENET, *TINY, "--set", f"train.epochs={epochs}",
                                 "--set", f"output_dir={out}", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- the run directory


def test_output_dir_that_is_a_file_or_below_one_is_one_line_before_any_work(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for out, fragment in [(blocker, "expected a directory (got a file)"),
                          (blocker / "run", "cannot create it or write in it: Not a directory")]:
        code, stdout, err = _run(capsys, out)
        assert code == 2 and stdout == "", (stdout, err)  # no start-up line: nothing started
        line = _one_error_line(err)
        assert f"output_dir {out}" in line and fragment in line and "--set output_dir=PATH" in line
    assert blocker.read_text() == "not a directory"


def _read_only_dir(tmp_path):
    """A command prefix and a directory in which that command cannot write: a read-only tmpfs in a
    private mount namespace as root (chmod does not stop root), a mode-0555 directory otherwise."""
    target = tmp_path / "ro"
    target.mkdir()
    if os.geteuid() != 0:
        target.chmod(0o555)
        return [], target
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {target}"],
                           capture_output=True, text=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("running as root without `unshare -m` (needs CAP_SYS_ADMIN): no way to make a "
                    f"directory read-only for this process ({probe.stderr.strip() if probe else 'no unshare'})")
    return ["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o ro tmpfs {target} && exec "$0" "$@"'], target


def test_read_only_output_dir_is_one_line_exit_2(tmp_path):
    prefix, target = _read_only_dir(tmp_path)
    out = target / "run"
    command = prefix + [sys.executable, LAUNCHER, "--config", LENET, *TINY, "--set", f"output_dir={out}"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = _one_error_line(proc.stderr)
    reason = "Read-only file system" if prefix else "Permission denied"
    assert f"output_dir {out}: cannot create it or write in it: {reason}" in line, line
    assert proc.stdout == ""


# --------------------------------------------------------------------------- an earlier run, a finished run


def test_a_fresh_run_refuses_an_earlier_runs_checkpoints_unless_resume_or_overwrite(capsys, tmp_path):
    out = tmp_path / "run"
    code, stdout, _ = _run(capsys, out)
    assert code == 0 and [e for e, _ in ckpt.list_checkpoints(str(out))] == [1]
    first = (out / "ckpt_epoch1.pt").read_bytes()

    code, stdout, err = _run(capsys, out)  # the same command again: refused, nothing touched
    assert code == 2 and stdout == ""
    line = _one_error_line(err)
    assert f"output_dir {out} holds an earlier run's checkpoints (ckpt_epoch1.pt)" in line
    assert "--resume auto" in line and "--overwrite" in line
    assert (out / "ckpt_epoch1.pt").read_bytes() == first

    code, stdout, err = _run(capsys, out, "--resume", "auto")  # epoch 1 of 1 is done
    assert code == 0 and err == ""
    assert stdout.strip() == (f"nothing to do: epoch 1 of 1 done ({out / 'ckpt_epoch1.pt'}); to train on, add "
                              f"--set train.epochs=N with N > 1")
    assert (out / "ckpt_epoch1.pt").read_bytes() == first and len((out / "metrics.jsonl").read_text().splitlines()) == 1

    code, stdout, err = _run(capsys, out, "--overwrite", "--set", "train.seed=1", epochs=2)
    assert code == 0, err
    assert "fresh run: removed 1 old checkpoint(s)" in stdout
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2] and (out / "ckpt_epoch1.pt").read_bytes() != first

    # The printed evaluation hint runs as printed, with the interpreter that ran the training.
    hint = [line for line in stdout.splitlines() if line.startswith("evaluate ")][0]
    command = shlex.split(hint[len("evaluate "):])
    assert os.path.samefile(command[0], sys.executable), hint
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and f"{out / 'ckpt_epoch2.pt'} (epoch 2" in proc.stdout, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- logs, output


def test_every_line_and_the_failure_go_to_the_ranks_log(capsys, tmp_path):
    """The log holds the start-up keys, the epoch rows, the summary; then a second run (lr=1e30 without
    normalization: step 2's loss is NaN) appends its warning and its one-line failure, which names the log."""
    out = tmp_path / "run"
    code, stdout, err = _run(capsys, out)
    assert code == 0
    log = out / "logs" / "rank0.log"
    text = log.read_text()
    for fragment in ["---- rank 0 of 1", "model lenet (", "data synthetic (64 train", "threads/rank ",
                     "epoch 1  train loss ", "test accuracy final "]:
        assert fragment in text, (fragment, text)
    row = json.loads((out / "metrics.jsonl").read_text())
    assert f"train loss {row['train_loss']:.4f}" in text  # the same numbers as metrics.jsonl

    code, stdout, err = _run(capsys, out, "--overwrite", "--set", "model.norm=none", "--set", "train.lr=1e30")
    assert code == 1
    line = _one_error_line(err)
    assert "non-finite training loss at epoch 1, step 2" in line and line.endswith(f"(log: {log})")
    text = log.read_text()
    assert text.count("---- rank 0 of 1") == 2  # appended: the earlier run's lines stay
    assert "warning: fresh run: removed 1 old checkpoint(s)" in text
    assert text.rstrip().splitlines()[-1].split(" ", 2)[2] == "error: " + line[len("error: "):-len(f" (log: {log})")]


def test_output_off_a_terminal_is_not_wrapped(capsys):
    reporter = Reporter()
    long_value = "x" * 150
    reporter.keys([("run dir", long_value), ("steps/epoch", 3)])
    reporter.info(f"resumed from {long_value}")
    reporter.summary([("evaluate", f"python launch/eval.py --checkpoint {long_value}")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"run dir {long_value}  steps/epoch 3", f"resumed from {long_value}", "",
                     f"evaluate python launch/eval.py --checkpoint {long_value}"]


def test_thread_default_leaves_one_core_to_a_single_process(monkeypatch):
    """Measured on 2 busy cores (docs/launcher.md): one process with 2 threads trained LeNet 10-30x
    slower than with 1. One process takes cores - 1; ranks share the cores."""
    for cores, local, expected in [(1, 1, 1), (2, 1, 1), (8, 1, 7), (2, 2, 1), (8, 2, 4), (3, 4, 1)]:
        monkeypatch.setattr(distributed, "usable_cores", lambda: cores)
        assert distributed.default_threads(local) == expected, (cores, local)
    monkeypatch.setattr(distributed, "usable_cores", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert torch.get_num_threads() == 1  # tests/conftest.py
    assert distributed.threads_text(0) == "default: cores - 1, 2 cores; set dist.threads"
    assert distributed.threads_text(3) == "dist.threads"
    monkeypatch.setattr(distributed, "usable_cores", lambda: 8)
    assert distributed.threads_text(0) == "set before the run, not by the launcher"


# --------------------------------------------------------------------------- train.compile


def test_train_compile_is_validated_and_reaches_torch_compile(capsys, tmp_path, monkeypatch):
    assert load_config(LENET).train.compile is False
    assert load_config(LENET, ["train.compile=true"]).train.compile is True
    with pytest.raises(ConfigError, match=r"train.compile: expected true or false \(got 'yes please'\)"):
        load_config(LENET, ["train.compile=yes please"])

    compiled = []

    def fake_compile(model, **kwargs):  # records the call; the model runs eagerly
        compiled.append((model, kwargs))
        return model

    monkeypatch.setattr(build.torch, "compile", fake_compile)
    code, stdout, err = _run(capsys, tmp_path / "off")
    assert code == 0 and compiled == [] and "compile off" in stdout
    code, stdout, err = _run(capsys, tmp_path / "on", "--set", "train.compile=true")
    assert code == 0, err
    assert len(compiled) == 1 and compiled[0][1] == {}  # default settings
    assert isinstance(compiled[0][0], torch.nn.Module) and "compile on (torch.compile)" in stdout
    assert stdout.count("compiled in ") == 1  # the first step's time, once
    assert "compiled in " in (tmp_path / "on" / "logs" / "rank0.log").read_text()


# --------------------------------------------------------------------------- Ctrl-C


def _wait_for(path, proc, seconds=120):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, f"ended before {path} appeared: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{path} did not appear in time"
        time.sleep(0.02)


def _sigint_default():
    """In a child before exec: SIGINT back to its default, so that Python installs its Ctrl-C handler even
    when this test run was started with SIGINT ignored (a background job of a non-interactive shell)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_after_first_epoch(command, cwd, out, **popen):
    """Start ``command``, send it SIGINT once epoch 1's checkpoint exists; return (process, stdout, stderr).

    With ``start_new_session=True`` in ``popen`` a leftover process group is killed whole."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(cwd), **popen)
    try:
        _wait_for(out / "ckpt_epoch1.pt", proc)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            if popen.get("start_new_session"):
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            proc.wait(timeout=10)
    return proc, stdout, stderr


@pytest.fixture
def python_sigint_handler():
    """This process's SIGINT handler as Python sets it up when SIGINT is not ignored; restored after."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_in_one_process_is_one_line_and_exit_130(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, LAUNCHER, "--config", LENET, *TINY, "--set", "train.epochs=100000",
               "--set", f"output_dir={out}"]
    proc, stdout, stderr = _interrupt_after_first_epoch(command, tmp_path, out, preexec_fn=_sigint_default)
    assert proc.returncode == 130, stderr
    line = _one_error_line(stderr)
    last = max(ckpt.list_checkpoints(str(out)))[1]
    assert line.startswith("error: interrupted at epoch ") and f"; last checkpoint {last}; continue with " \
        f"--resume auto (log: {out / 'logs' / 'rank0.log'})" in line, line
    assert line[len("error: "):].split(" (log: ")[0] in (out / "logs" / "rank0.log").read_text()


def test_ctrl_c_under_torchrun_is_one_line_from_rank_0_and_every_rank_logs_it(tmp_path):
    """A terminal's Ctrl-C reaches torchrun only (its workers run in their own sessions); torchrun
    passes SIGINT on to every worker and then reports its own SignalException."""
    out = tmp_path / "run"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = [torchrun, "--nproc_per_node=2", f"--master_port={free_port()}", LAUNCHER, "--config", LENET, *TINY,
               "--set", "train.epochs=100000", "--set", f"output_dir={out}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc, stdout, stderr = _interrupt_after_first_epoch(command, tmp_path, out, env=env, start_new_session=True)
    lines = [line for line in (stdout + stderr).splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted at epoch "), stdout + stderr
    assert "; continue with --resume auto" in lines[0] and "collective failed" not in stdout + stderr
    for rank in (0, 1):
        log = (out / "logs" / f"rank{rank}.log").read_text()
        assert "error: interrupted at epoch " in log and "collective" not in log, log


def test_ctrl_c_while_a_checkpoint_is_written_takes_effect_after_the_write(tmp_path, python_sigint_handler):
    """SIGINT inside the block is held until the block is done (the checkpoint is whole), then raised; an
    error raised while handling a Ctrl-C (torch.save cut short) still counts as the interrupt."""
    from syncnorm.train.interrupts import during_interrupt, interrupts_deferred

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    path = tmp_path / "ckpt_epoch1.pt"
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # a signal handler runs here at the latest: the default one would raise now
            ckpt.atomic_save({"w": torch.ones(3)}, str(path))
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored

    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("unexpected pos 373312 vs 373216")  # what torch.save raised in that case
    except RuntimeError as error:
        assert during_interrupt(error)
    assert not during_interrupt(RuntimeError("Connection closed by peer"))


# --------------------------------------------------------------------------- resume keeps the run's settings


def _launch(capsys, *argv):
    """launch/train.py in-process with exactly ``argv`` after --config; (exit status, stdout, stderr)."""
    code = load_launcher().main(["--config", LENET, *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _cosine_lr(epoch, epochs, base=0.1):
    """configs/lenet.yaml's schedule in closed form: the rate after ``epoch`` of ``epochs``."""
    return base * (1 + math.cos(math.pi * epoch / epochs)) / 2


def test_resume_continues_the_run_as_it_was_configured(capsys, tmp_path):
    """A run started with --set train.epochs=2 and stopped after epoch 1, resumed with --resume auto alone
    (configs/lenet.yaml says 5 epochs), trains epoch 2 and stops there; a contradicting --set is one line;
    more epochs stretch the cosine schedule; a finished run changes no file but its log and curves.png."""
    out = tmp_path / "run"
    run = [*TINY, "--set", f"output_dir={out}"]
    code, stdout, err = _launch(capsys, *run, "--set", "train.epochs=2")
    assert code == 0, err
    assert stdout.count("warning: model.norm=syncbn in one process: nothing syncs") == 1
    (out / "ckpt_epoch2.pt").unlink()  # as if killed during epoch 2's checkpoint: epoch 1 is the last

    code, stdout, err = _launch(capsys, *run, "--resume", "auto")
    assert code == 0 and err == "", err
    assert f"resumed from {out / 'ckpt_epoch1.pt'} (epoch 1 done)" in stdout and "nothing to do" not in stdout
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2] and [e for e, _ in ckpt.list_checkpoints(str(out))] == [1, 2]
    assert load_config(str(out / "config.yaml")).train.epochs == 2

    for extra, fragment in [(["--set", "train.lr=0.5"], "--set train.lr=0.5: the run in"),
                            (["--set", "model.norm=bn"], "--set model.norm=bn: the run in"),
                            (["--set", "train.epochs=1"], "train.epochs: expected at least 2")]:
        code, stdout, err = _launch(capsys, *run, "--resume", "auto", *extra)
        assert code == 2 and fragment in _one_error_line(err), (extra, err)
    assert "was configured with train.lr=0.1" in _launch(capsys, *run, "--resume", "auto", "--set", "train.lr=0.5")[2]

    kept = {name: (out / name).read_bytes() for name in ("config.yaml", "metrics.jsonl", "ckpt_epoch2.pt")}
    log_lines = len((out / "logs" / "rank0.log").read_text().splitlines())
    code, stdout, err = _launch(capsys, *run, "--resume", "auto")
    assert code == 0 and stdout.startswith(f"nothing to do: epoch 2 of 2 done ({out / 'ckpt_epoch2.pt'})"), stdout
    assert {name: (out / name).read_bytes() for name in kept} == kept  # docs/launcher.md: nothing else changes
    log = (out / "logs" / "rank0.log").read_text().splitlines()
    assert len(log) > log_lines and "nothing to do: epoch 2 of 2" in log[-1]

    code, stdout, err = _launch(capsys, *run, "--resume", "auto", "--set", "train.epochs=4")
    assert code == 0, err
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    # Epochs 1-2 followed the cosine over 2 epochs, epochs 3-4 the cosine over 4 (metrics hold the rate after
    # each epoch's scheduler step).
    expected = [_cosine_lr(1, 2), _cosine_lr(2, 2), _cosine_lr(3, 4), _cosine_lr(4, 4)]
    assert [r["lr"] for r in rows] == pytest.approx(expected, abs=1e-12)
    assert load_config(str(out / "config.yaml")).train.epochs == 4


# --------------------------------------------------------------------------- up-front checks


def test_a_half_set_torchrun_environment_is_one_line_from_every_process(capsys, monkeypatch, tmp_path):
    from syncnorm.train.preflight import LaunchEnvironmentError, check_launch_environment

    check_launch_environment({})  # one plain process
    check_launch_environment({"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})  # exported by a cluster shell
    check_launch_environment({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                              "MASTER_PORT": "29500"})  # what torchrun sets
    check_launch_environment({"RANK": "0", "WORLD_SIZE": "1"})
    for env, fragment in [({"WORLD_SIZE": "2"}, "WORLD_SIZE=2, but RANK, MASTER_ADDR, MASTER_PORT are not set"),
                          ({"RANK": "0"}, "RANK=0, but WORLD_SIZE is not set"),
                          ({"LOCAL_RANK": "0"}, "but RANK, WORLD_SIZE are not set"),
                          ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"},
                           "expected 0 <= RANK < WORLD_SIZE=2 (got 2)"),
                          ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK: expected an integer (got 'x')")]:
        with pytest.raises(LaunchEnvironmentError, match=re.escape(fragment)):
            check_launch_environment(env)

    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for env in ({"WORLD_SIZE": "2"}, {"WORLD_SIZE": "2", "RANK": "1"}):  # rank 1 speaks too: it is alone
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        code, stdout, err = _run(capsys, tmp_path / "run")
        assert code == 2 and stdout == ""
        assert "torchrun's environment is half set" in _one_error_line(err) and "torchrun --nproc_per_node=N" in err
    assert not (tmp_path / "run").exists()


def test_a_per_rank_batch_of_one_into_batchnorm_is_one_line_before_any_step(capsys, tmp_path):
    from torch import nn

    from syncnorm.train.models import build_model
    from syncnorm.train.preflight import check_batch_norm_batch

    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):  # what torch would say later
        nn.BatchNorm1d(3).train()(torch.zeros(1, 3))
    code, stdout, err = _run(capsys, tmp_path / "run", "--set", "train.batch_size=1")
    assert code == 2 and stdout == ""
    line = _one_error_line(err)
    assert "train.batch_size: expected at least 2 samples per BatchNorm batch in training (got 1 in one process" in line
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before the run dir was written
    code, stdout, err = _run(capsys, tmp_path / "gn", "--set", "train.batch_size=1", "--set", "model.norm=gn")
    assert code == 0, err  # no BatchNorm: a batch of 1 trains
    synced = build_model("lenet", norm="syncbn")
    check_batch_norm_batch(synced, 1, (1, 28, 28), world_size=2)  # synced over 2 ranks: 2 values per channel
    with pytest.raises(ConfigError, match="got 1 in each rank"):
        check_batch_norm_batch(build_model("lenet", norm="bn"), 1, (1, 28, 28), world_size=2)
    check_batch_norm_batch(build_model("resnet18", norm="bn", in_shape=(3, 32, 32)), 1, (3, 32, 32), world_size=1)


def test_an_lr_far_above_the_linear_scaling_rule_for_the_global_batch_is_warned_once(capsys, tmp_path):
    """``--nproc_per_node=3 --set train.batch_size=1`` trained to chance with no word (issue 30): one warning
    with the rule's lr; the default run (2 x 64, lr 0.1) gets none."""
    from syncnorm.train.preflight import small_batch_warning

    assert small_batch_warning(0.1, 64, 2) is None and small_batch_warning(0.1, 16, 2) is None
    text = small_batch_warning(0.1, 1, 3)
    assert text.startswith("train.lr=0.1 is high for a global batch of 3 (3 rank(s) x 1)") and "0.0012" in text
    assert "--set train.lr=0.02" in text
    assert "x 4 micro-batches" in small_batch_warning(0.5, 2, 2, grad_accum=4)
    code, stdout, err = _run(capsys, tmp_path / "run", "--set", "train.batch_size=3")
    assert code == 0, err
    assert stdout.count("warning: train.lr=0.1 is high for a global batch of 3 (1 rank(s) x 3)") == 1
    code, stdout, err = _run(capsys, tmp_path / "ok", "--set", "train.batch_size=3", "--set", "train.lr=0.009")
    assert code == 0 and "is high for a global batch" not in stdout


# --------------------------------------------------------------------------- files, checkpoints, output


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_run_files_follow_the_umask(capsys, tmp_path, umask):
    previous = os.umask(umask)
    try:
        out = tmp_path / "run"
        code, _, err = _run(capsys, out)
        assert code == 0, err
        exported = tmp_path / "plain.pt"
        assert load_launcher("eval").main(["--checkpoint", str(out), "--export", str(exported)]) == 0
        reference = tmp_path / "reference"
        with open(reference, "w"):  # what open() gives under this umask
            pass
    finally:
        os.umask(previous)
    expected = stat.S_IMODE(os.stat(reference).st_mode)
    assert expected == 0o666 & ~umask
    files = [out / "config.yaml", out / "metrics.jsonl", out / "ckpt_epoch1.pt", out / "curves.png",
             out / "logs" / "rank0.log", exported]
    assert {f.name: oct(stat.S_IMODE(os.stat(f).st_mode)) for f in files} == {f.name: oct(expected) for f in files}


def test_eval_of_a_file_that_is_not_a_checkpoint_says_so(capsys, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  name: lenet\n")
    assert load_launcher("eval").main(["--checkpoint", str(config)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {config} is not a syncnorm checkpoint (expected a ckpt_epoch{{N}}.pt")
    assert "refused" not in line and "trust" not in line


def test_progress_bar_and_hints_at_80_columns():
    """Before the first step the bar shows no NaN and no 0 samples/s; a hint longer than the terminal is
    printed as one line (the terminal folds it on screen; a copy is the whole command)."""
    import io

    from rich.console import Console

    buffer = io.StringIO()
    reporter = Reporter(console=Console(file=buffer, force_terminal=True, width=80, color_system=None))
    with reporter.epoch_progress(1, 5, 31) as advance:
        first = buffer.getvalue()
        advance(0.6931, 4354.2)
        advance(0.6931, 4354.2, 0.25)  # with the share of the time spent waiting for batches
    assert "0/31 loss - - samples/s data wait -" in first and "nan" not in first.lower()
    assert progress_fields(0.6931, 4354.2, 0.25) == {"loss": "0.6931", "sps": "4,354", "wait": "25%"}
    command = "/a/long/venv/bin/python /a/long/checkout/launch/eval.py --checkpoint runs/lenet/ckpt_epoch5.pt"
    buffer.seek(0)
    buffer.truncate()
    reporter.summary([("evaluate", command)])
    reporter.info(f"to continue: {command} --resume auto")
    printed = buffer.getvalue()
    assert f"evaluate {command}\n" in printed and f"to continue: {command} --resume auto\n" in printed


# --------------------------------------------------------------------------- curves.png


def test_each_run_draws_its_curves_and_a_resumed_run_redraws_them(capsys, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="curves.png needs matplotlib: pip install -e '.[train]'")
    from syncnorm.train import curves

    out = tmp_path / "run"
    code, stdout, err = _run(capsys, out, epochs=2)
    assert code == 0, err
    png = (out / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and "curves.png" in stdout  # named in the summary's run dir line
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    fig = curves.figure(curves.read_metrics(str(out)))
    drawn = {(axes.get_title(), line.get_label()): (list(line.get_xdata()), list(line.get_ydata()))
             for axes in fig.axes for line in axes.get_lines()}
    assert drawn == {
        ("loss", "train"): ([1, 2], [r["train_loss"] for r in rows]),
        ("loss", "test"): ([1, 2], [r["test_loss"] for r in rows]),
        ("accuracy", "train"): ([1, 2], [100 * r["train_acc"] for r in rows]),
        ("accuracy", "test"): ([1, 2], [100 * r["test_acc"] for r in rows]),
    }

    code, stdout, err = _launch(capsys, *TINY, "--set", f"output_dir={out}", "--resume", "auto",
                                "--set", "train.epochs=3")
    assert code == 0, err
    assert (out / "curves.png").read_bytes() != png  # redrawn with epoch 3
    assert len(curves.figure(curves.read_metrics(str(out))).axes[0].get_lines()[0].get_xdata()) == 3

    (out / "curves.png").unlink()
    assert load_launcher("curves").main([str(out)]) == 0  # any run directory, drawn again
    assert capsys.readouterr().out.strip() == str(out / "curves.png") and (out / "curves.png").exists()
    assert load_launcher("curves").main([str(tmp_path)]) == 2
    assert "expected a run directory with a metrics.jsonl" in _one_error_line(capsys.readouterr().err)

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: import raises ImportError
    code, stdout, err = _run(capsys, tmp_path / "bare")
    assert code == 0 and err == "", err
    assert stdout.count(f"warning: {curves.MISSING_MATPLOTLIB}") == 1
    assert not (tmp_path / "bare" / "curves.png").exists() and "curves.png" not in stdout.split("warning")[0]


# --------------------------------------------------------------------------- under torchrun


def test_under_torchrun_a_failure_ends_with_our_line_and_its_exit_status(tmp_path):
    """Plain torchrun shows the failed rank's line as its root cause (from the error file), where it
    used to say "To enable traceback see"; launch/run.py (torchrun, same options) ends with that one
    line and exits with the rank's status instead of torchrun's traceback and status 1."""
    bad = ["--config", LENET, "--set", "train.epochs=0", "--set", f"output_dir={tmp_path / 'run'}"]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    commands = {
        "torchrun": [torchrun, "--nproc_per_node=2", f"--master_port={free_port()}", LAUNCHER, *bad],
        "run.py": [sys.executable, os.path.join(ROOT, "launch", "run.py"), "--nproc_per_node=2",
                   f"--master_port={free_port()}", LAUNCHER, *bad],
    }
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {name: subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    cwd=str(tmp_path), env=env) for name, command in commands.items()}
    results = {name: (proc.communicate(timeout=180), proc.returncode) for name, proc in procs.items()}
    line = "error: --set train.epochs=0: train.epochs: expected an integer >= 1 (got 0)"

    (stdout, stderr), code = results["torchrun"]
    assert code == 1 and "ChildFailedError" in stderr  # torchrun's own ending, which we cannot change
    root_cause = stderr.split("Root Cause (first observed failure):")[1]
    assert f"traceback : {line}" in root_cause and "To enable traceback" not in root_cause, stderr

    (stdout, stderr), code = results["run.py"]
    assert code == 2, stderr
    assert stderr.strip().splitlines()[-1] == line and "Traceback" not in stderr and "ChildFailedError" not in stderr
    assert (stdout + stderr).count("error: ") == 1, stdout + stderr  # the workers leave the line to run.py


def test_the_torchrun_summary_line_for_each_kind_of_failure():
    from types import SimpleNamespace

    from syncnorm.train.elastic import _failure_line

    ours = SimpleNamespace(message={"message": "x", "extraInfo": {"py_callstack": "error: bad key"}}, exitcode=2,
                           pid=7, signal_name=lambda: "<N/A>")
    assert _failure_line(1, ours) == "bad key"
    killed = SimpleNamespace(message="Signal 9 (SIGKILL) received by PID 7", exitcode=-9, pid=7,
                             signal_name=lambda: "SIGKILL")
    assert _failure_line(1, killed).startswith("rank 1 was killed by SIGKILL (pid 7)")
    bug = SimpleNamespace(message={"message": "x", "extraInfo": {"py_callstack": "Traceback ...\nKeyError: 'w'"}},
                          exitcode=1, pid=7, signal_name=lambda: "<N/A>")
    assert _failure_line(0, bug) == "rank 0 exited with status 1 (KeyError: 'w'); its traceback or message is above"


def test_a_run_without_a_finished_epoch_leaves_no_picture(capsys, tmp_path):
    """lr=1e30 without normalization: step 2's loss is NaN, no epoch finishes; the earlier run's picture goes."""
    pytest.importorskip("matplotlib", reason="curves.png needs matplotlib: pip install -e '.[train]'")
    out = tmp_path / "run"
    assert _run(capsys, out)[0] == 0 and (out / "curves.png").exists()
    code, stdout, err = _run(capsys, out, "--overwrite", "--set", "model.norm=none", "--set", "train.lr=1e30")
    assert code == 1 and not (out / "curves.png").exists() and "curves.png" not in stdout + err


@pytest.mark.slow
def test_ctrl_c_under_launch_run_is_rank_0s_line_and_exit_130(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, os.path.join(ROOT, "launch", "run.py"), "--nproc_per_node=2",
               f"--master_port={free_port()}", LAUNCHER, "--config", LENET, *TINY, "--set", "train.epochs=100000",
               "--set", f"output_dir={out}"]
    proc, stdout, stderr = _interrupt_after_first_epoch(
        command, tmp_path, out, env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True,
        preexec_fn=_sigint_default,
    )
    assert proc.returncode == 130, stdout + stderr
    lines = [line for line in (stdout + stderr).splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted at epoch "), stdout + stderr
    assert "Traceback" not in stderr and "SignalException" not in stderr, stderr
