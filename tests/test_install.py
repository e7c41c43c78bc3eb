"""The library needs torch only: ``import syncnorm`` and a 2-rank SyncBatchNorm step work when nothing
but the standard library, torch and torch's own requirements can be imported.

The test runs this file as a script in a fresh interpreter whose ``sitecustomize`` (first on
PYTHONPATH) installs an import hook that refuses every other top-level module, as if torchvision,
PyYAML, rich, mlxtend, numpy, Lightning, accelerate, onnx... were not installed. Every interpreter that
process starts inherits it (PYTHONPATH), the ranks' forkserver included. No pytest import at the top:
this file is the script too.
"""

import importlib.metadata
import os
import re
import subprocess
import sys

import torch

# Imported by the blocked interpreter: it may name only what syncnorm's dependencies provide.
_SITECUSTOMIZE = '''
import os, sys

ALLOWED = set(os.environ["SYNCNORM_ONLY_IMPORTABLE"].split(","))
REFUSED = []


class OnlyTorch:
    """Refuse any top-level module outside the standard library, torch's requirements and syncnorm."""

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if (top in ALLOWED or top in sys.stdlib_module_names or top in sys.builtin_module_names
                or top.startswith("_sysconfigdata")):  # the standard library's platform data
            return None
        REFUSED.append(top)
        raise ModuleNotFoundError(f"No module named {top!r} (blocked: only torch is installed)", name=top)


sys.meta_path.insert(0, OnlyTorch())
'''

# Not something torch needs, but typical of what a launcher-only dependency would bring in.
MUST_BE_BLOCKED = ["torchvision", "yaml", "rich", "mlxtend", "numpy", "lightning", "accelerate", "onnx", "pytest"]


def _requirement_closure(distribution: str) -> set:
    """``distribution`` and every distribution it requires, recursively (extras left out)."""
    seen, todo = set(), [distribution]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # a requirement for another platform or Python
        for requirement in requirements:
            if "extra ==" not in requirement:
                todo.append(re.match(r"[A-Za-z0-9._-]+", requirement).group(0))
    return seen


def _modules_of_torch_and_its_requirements() -> set:
    distributions = _requirement_closure("torch")
    modules = {"torch", "syncnorm"}
    for module, owners in importlib.metadata.packages_distributions().items():
        if any(re.sub(r"[-_.]+", "-", owner).lower() in distributions for owner in owners):
            modules.add(module)
    return modules


def test_syncnorm_works_with_only_torch_importable(tmp_path):
    if sys.version_info < (3, 10):
        import pytest

        pytest.skip("the import blocker needs Python 3.10+ (sys.stdlib_module_names)")
    allowed = _modules_of_torch_and_its_requirements()
    assert not allowed & set(MUST_BE_BLOCKED), "torch now requires one of these: update MUST_BE_BLOCKED"
    (tmp_path / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), SYNCNORM_ONLY_IMPORTABLE=",".join(sorted(allowed)),
               OMP_NUM_THREADS="1")
    process = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, f"exit {process.returncode}\n{process.stdout}\n{process.stderr[-4000:]}"
    assert "torch-only: import, 2-rank step and reference agree" in process.stdout, process.stdout


# ---- the script: runs in the blocked interpreter


def _one_synced_step(rank, world_size):
    import syncnorm

    generator = torch.Generator().manual_seed(rank)
    x = (torch.randn(3 + rank, 4, 5, generator=generator, dtype=torch.float64) * (rank + 1)).requires_grad_()
    layer = syncnorm.SyncBatchNorm(4).double()
    output = layer(x)
    (output * torch.arange(5, dtype=torch.float64)).sum().backward()
    return x.detach(), x.grad, output.detach(), layer.running_mean, layer.running_var


def _main():
    import sitecustomize  # the blocker

    for name in MUST_BE_BLOCKED:
        try:
            __import__(name)
        except ImportError:
            continue
        raise AssertionError(f"{name} could be imported: the blocker is not working")

    import syncnorm
    from syncnorm.testing import run_ranks

    ranks = run_ranks(_one_synced_step, 2, timeout=60, pg_timeout=30)
    x = torch.cat([r[0] for r in ranks]).requires_grad_()
    reference = torch.nn.BatchNorm1d(4).double()
    output = reference(x)
    (output * torch.arange(5, dtype=torch.float64)).sum().backward()
    for got, expected in [(torch.cat([r[1] for r in ranks]), x.grad), (torch.cat([r[2] for r in ranks]), output),
                          (ranks[1][3], reference.running_mean), (ranks[1][4], reference.running_var)]:
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)

    # The optional parts say what to install.
    try:
        import syncnorm.integrations.lightning  # noqa: F401
    except ImportError as error:
        message = str(error)
    else:
        raise AssertionError("syncnorm.integrations.lightning imported without Lightning")
    assert "install it: pip install lightning" in message, message
    print(message)
    print("refused imports:", sorted(set(sitecustomize.REFUSED)))
    print("torch-only: import, 2-rank step and reference agree")


if __name__ == "__main__":
    _main()
