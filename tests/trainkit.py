"""What the training-launcher tests share: paths, a silent reporter, the launcher module, a free port, a
subprocess run with a deadline."""

import importlib.util
import os
import signal
import socket
import subprocess
from typing import Mapping, Sequence

import pytest

from syncnorm.train.ui import Reporter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENET = os.path.join(ROOT, "configs", "lenet.yaml")
QUIET = Reporter(enabled=False)
# Fields of a metrics row that do not depend on timing.
DETERMINISTIC = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "samples")


def load_launcher(script: str = "train"):
    """``launch/{script}.py`` as a module, to call its ``main(argv)`` in this process."""
    spec = importlib.util.spec_from_file_location(f"launch_{script}", os.path.join(ROOT, "launch", f"{script}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_in_session(command: Sequence[str], cwd, env: Mapping[str, str], deadline: float, what: str) -> str:
    """Run ``command`` in a session of its own and return its output; at the deadline kill the whole session
    (the workers it started included) and fail with the output, as also when it exits with an error."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=deadline)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{what} did not finish in {deadline:.0f} s; its output:\n{output[-6000:]}")
    assert process.returncode == 0, f"{what} exited with {process.returncode}:\n{output[-6000:]}"
    return output


# The documented run: README's and docs/launcher.md's command (configs/lenet.yaml, 5 epochs, 2 ranks), with the
# one thread per rank the docs' runs had on their 2-core machine (the default, cores / local ranks, would
# differ on a machine with more cores, and so would the float32 rows).
DOCUMENTED_RUN = ["--nproc_per_node=2", "launch/train.py", "--config", "configs/lenet.yaml", "--set", "dist.threads=1"]


@pytest.fixture(scope="session")
def documented_lenet_run(tmp_path_factory):
    """The documented LeNet run, once per session (torchrun, 2 ranks), then ``launch/eval.py`` of its last
    checkpoint: {"output": rank 0's console output, "eval": eval.py's output, "metrics": metrics.jsonl's
    rows, "out": the run directory}."""
    import json
    import sys

    out = tmp_path_factory.mktemp("documented") / "lenet"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    command = [torchrun, f"--master_port={free_port()}", *DOCUMENTED_RUN, "--set", f"output_dir={out}"]
    output = run_in_session(command, ROOT, env, 300, "the documented LeNet run")
    evaluation = run_in_session([sys.executable, "launch/eval.py", "--checkpoint", str(out / "ckpt_epoch5.pt")],
                                ROOT, env, 120, "launch/eval.py of the documented run")
    with open(out / "metrics.jsonl", encoding="utf-8") as f:
        metrics = [json.loads(line) for line in f]
    return {"output": output, "eval": evaluation, "metrics": metrics, "out": str(out)}
