"""What the training-launcher tests share: paths, a silent reporter, the launcher module, a free port."""

import importlib.util
import os
import socket

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
