"""What a new user meets at launch/train.py: the run directory checks, earlier runs, a finished run,
Ctrl-C, the per-rank logs, unwrapped output, the thread default, train.compile."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from syncnorm.train import checkpoint as ckpt
from syncnorm.train import build, distributed
from syncnorm.train.config import ConfigError, load_config
from syncnorm.train.ui import Reporter
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
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path),
                            preexec_fn=_sigint_default)
    try:
        _wait_for(out / "ckpt_epoch1.pt", proc)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
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
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path),
                            env=env, start_new_session=True)
    try:
        _wait_for(out / "ckpt_epoch1.pt", proc)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    lines = [line for line in (stdout + stderr).splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted at epoch "), stdout + stderr
    assert "; continue with --resume auto" in lines[0] and "collective failed" not in stdout + stderr
    for rank in (0, 1):
        log = (out / "logs" / f"rank{rank}.log").read_text()
        assert "error: interrupted at epoch " in log and "collective" not in log, log


def test_ctrl_c_while_a_checkpoint_is_written_takes_effect_after_the_write(tmp_path, python_sigint_handler):
    """SIGINT inside the block is held until the block is done (the checkpoint is whole), then raised; an
    error raised while handling a Ctrl-C (torch.save cut short) still counts as the interrupt."""
    from syncnorm.train.loop import _during_interrupt, _interrupts_deferred

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    path = tmp_path / "ckpt_epoch1.pt"
    with pytest.raises(KeyboardInterrupt):
        with _interrupts_deferred():
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
        assert _during_interrupt(error)
    assert not _during_interrupt(RuntimeError("Connection closed by peer"))
