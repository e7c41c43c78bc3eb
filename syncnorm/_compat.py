"""Small shims over torch APIs that moved between releases."""

import torch

if hasattr(torch.compiler, "is_compiling"):  # torch >= 2.3
    is_compiling = torch.compiler.is_compiling
else:  # pragma: no cover - older torch
    from torch._dynamo import is_compiling  # noqa: F401
