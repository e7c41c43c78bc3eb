import os

# Inductor compiles in worker processes it starts in every process that compiles (each rank of each
# run): on 2 cores only a cost. Set before torch reads it, so the ranks and torchrun's workers inherit it.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from syncnorm import testing  # noqa: E402
from syncnorm._compat import COMPILE_MIN_TORCH, TORCH_VERSION  # noqa: E402

# run_ranks forks each rank from a server process started on its first call: there these are imported
# (and the compiler's per-process keys computed) once for the session, not again in every rank.
testing._CONTEXT.set_forkserver_preload(["torch", "torch.distributed", "syncnorm", "rank_preload"])

# The library's own tests: what `.ci/run` also runs on the oldest torch that pyproject.toml admits
# (docs/compatibility.md). The launcher's and the integrations' tests need the `dev` extras on a
# current torch and are not among them.
CORE_TEST_FILES = {
    "test_core.py", "test_stats.py", "test_errors.py", "test_autograd_ddp.py", "test_convert.py",
    "test_compile.py", "test_gpu.py", "test_precise.py", "test_join.py", "test_checkpointing.py", "test_divergence.py",
    "test_act.py",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "core: the library's tests, run on the oldest supported torch too")
    config.addinivalue_line("markers", "slow: variants of a test already run once; deselect with -m 'not slow'")
    config.addinivalue_line("markers", "engines: runs under a real SLURM cluster or Ray Train (installs them where "
                                       "missing); its own CI step: pytest -m engines")


def pytest_collection_modifyitems(config, items):
    old_compile = TORCH_VERSION < COMPILE_MIN_TORCH
    for item in items:
        name = os.path.basename(str(item.fspath))
        if name in CORE_TEST_FILES:
            item.add_marker(pytest.mark.core)
        if old_compile and name == "test_compile.py":
            item.add_marker(pytest.mark.skip(
                reason=f"torch.compile of syncnorm needs torch >= {'.'.join(map(str, COMPILE_MIN_TORCH))} "
                       f"(this is {torch.__version__}); the eager path is tested"))


# What torchrun sets, and what the launcher derives from SLURM's variables: a test that leaves one of these in
# os.environ makes every later in-process run wait for ranks that never come.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_leaked_launch_environment():
    """Fail the test that leaves torchrun's variables changed in this process (and restore them), instead of
    a later test hanging in the rendezvous."""
    before = {name: os.environ.get(name) for name in LAUNCH_VARIABLES}
    yield
    after = {name: os.environ.get(name) for name in LAUNCH_VARIABLES}
    if after != before:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        changed = ", ".join(f"{name}={after[name]}" for name in LAUNCH_VARIABLES if after[name] != before[name])
        pytest.fail(f"the test left launcher variables changed in os.environ ({changed}): restore them")


@pytest.fixture(autouse=True)
def _one_thread():
    """In-process work with one torch thread: on a shared 2-core machine, 2 threads that compete with
    other processes can be 10x slower than one. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
