"""Small shims over torch APIs that moved between releases."""

import torch

if hasattr(torch.compiler, "is_compiling"):  # torch >= 2.3
    is_compiling = torch.compiler.is_compiling
else:  # pragma: no cover - older torch
    from torch._dynamo import is_compiling  # noqa: F401

# torch.compile of the synced step (functional collectives and on-device asserts traced by dynamo)
# works from this release on; on 2.2-2.5 dynamo cannot trace the process-group handling and on 2.6 the
# on-device checks are dropped from the graph (measured, docs/compatibility.md).
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

    Those releases (2.6.0 and older were measured) stop a gloo group in its destructor, which joins gloo's
    worker threads while holding the GIL; a worker that is just dropping a finished collective whose
    tensor Python has already let go needs the GIL to free it, so both wait forever (two-rank runs of
    three plain collectives hung in the destroy in 6 of 20 on 2.4.1, 12 of 30 on 2.5.1, 2 of 20 on 2.6.0;
    a 50 ms pause before it still left 1 of 30). Keeping a reference to every group means the destructor
    never runs: the process must then leave through ``os._exit`` (as multiprocessing children and the
    launcher do). Newer torch shuts the group down first, with the GIL released, and needs none of this.
    """
    import torch.distributed as dist

    if not hasattr(dist.ProcessGroup, "shutdown"):
        _UNDESTROYED_GROUPS.extend(dist.distributed_c10d._world.pg_map)
    dist.destroy_process_group()
