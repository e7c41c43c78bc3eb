"""Imported once by the forkserver that ``syncnorm.testing.run_ranks`` forks every rank from (named in
tests/conftest.py): what each rank process would otherwise import or work out again. A rank still starts
as a fresh process (module globals, monkeypatching and torch.compile's caches do not carry from one run
to the next); it only starts with these modules imported and these per-process keys computed, which
saves seconds per rank on 2 cores. Nothing here may fail the forkserver: a missing module is skipped.
"""

import importlib

# Not timm: importing it changes what syncnorm's conversion looks for; only test_timm's ranks need it.
MODULES = (
    "pytest", "yaml", "torchvision.models", "torch.nn.parallel", "torch.utils.checkpoint", "torch.distributed.fsdp",
    "syncnorm.train.loop", "torch._dynamo", "torch._inductor.compile_fx", "torch.utils.cpp_extension",
)


def _warm_compiler():
    """What the first ``torch.compile`` in a process computes and caches: the hashes of torch's and
    triton's sources (inductor's cache keys), the CPU's vector instruction set (it builds a probe with
    the C++ compiler), the registered backends. Each runs in this thread and starts none."""
    from torch._dynamo.backends.registry import list_backends
    from torch._inductor import codecache, cpu_vec_isa

    list_backends()
    codecache.torch_key()
    codecache.CacheBase.get_system()
    cpu_vec_isa.pick_vec_isa()


for _name in MODULES:
    try:
        importlib.import_module(_name)
    except Exception:  # absent (the floor torch's venv has no timm) or broken: the ranks import it themselves
        pass
try:
    _warm_compiler()
except Exception:  # another torch's internals: the ranks compute these themselves
    pass
