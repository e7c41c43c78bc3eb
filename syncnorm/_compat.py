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
