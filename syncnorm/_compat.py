"""Small shims over torch APIs that moved between releases."""

import torch

if hasattr(torch.compiler, "is_compiling"):  # torch >= 2.3
    is_compiling = torch.compiler.is_compiling
else:  # pragma: no cover - older torch
    from torch._dynamo import is_compiling  # noqa: F401

# torch.compile of the synced step works from this release on (older ones: docs/compatibility.md).
COMPILE_MIN_TORCH = (2, 9)
TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def check_compile_supported() -> None:
    """Raise if a synced SyncBatchNorm is being compiled on a torch that cannot compile it correctly."""
    if TORCH_VERSION < COMPILE_MIN_TORCH:
        raise RuntimeError(
            f"syncnorm under torch.compile needs torch >= {'.'.join(map(str, COMPILE_MIN_TORCH))} "
            f"(this is {torch.__version__}); run the model eagerly or upgrade torch"
        )


# Process groups whose C++ destructor must not run in this process (see destroy_process_group).
_UNDESTROYED_GROUPS = []


def destroy_process_group() -> None:
    """``dist.destroy_process_group()`` that cannot deadlock on torch releases without ``ProcessGroup.shutdown``.

    Their gloo group's destructor joins gloo's threads while holding the GIL, which a worker thread may
    need (measured: docs/compatibility.md, "Teardown deadlock"). Keeping a reference to every group means
    the destructor never runs: the process must then leave through ``os._exit`` (as multiprocessing
    children and the launcher do).
    """
    import torch.distributed as dist

    if not hasattr(dist.ProcessGroup, "shutdown"):
        _UNDESTROYED_GROUPS.extend(dist.distributed_c10d._world.pg_map)
    dist.destroy_process_group()
