"""CUDA: exactness on the GPU's kernels, no host synchronization, CUDA-graph capture, torch.compile.

What runs where:

* **one CUDA device** (the GPU check, ``bash benchmarks/gpu_check.sh``):
  (a) 2 gloo ranks sharing ``cuda:0`` (gloo copies CUDA tensors through host memory, so this proves the
  CUDA kernels exact, not sync-free): BatchNorm on the concatenated batch is the reference, with uneven
  and empty ranks, float64/float32/float16/bfloat16, NCHW and channels_last, eager and compiled; and
  ``syncnorm.join`` with uneven numbers of batches against one process (tests/test_join.py's case);
  (b) a 1-rank NCCL group with the synced step forced (``SyncBatchNorm`` takes the local path in a group
  of one, so the layers call ``syncnorm.SyncBatchNormFunction`` directly, and
  ``comm._COLLECTIVES_AT_ONE_RANK`` makes it send its collectives anyway: real NCCL calls): a converted
  resnet's training step runs under ``torch.cuda.set_sync_debug_mode("error")`` eagerly and compiled,
  its capture in a CUDA graph replays like eager, and ``torch.compile(fullgraph=True)`` equals eager.
* **two CUDA devices**: the same step with 2 NCCL ranks (NCCL before 2.30 refuses two ranks on one GPU).
* **dry mode**, ``SYNCNORM_GPU_DRY=1`` (``gpu_check.sh --dry``, run by CI through the last test here):
  the same test bodies on the CPU, a 1-rank gloo group standing in for NCCL and the on-device path
  forced; what needs CUDA itself (sync debug mode, CUDA graphs, NCCL) is skipped, and a smaller model and
  the ``aot_eager`` compile backend keep it cheap. It proves this file's code, not the GPU.

Without a CUDA device and without the dry mode every test but the last is skipped with the reason
(``pytest -ra`` shows it).
"""

import copy
import json
import os
import re
import subprocess
import sys
import traceback
from xml.etree import ElementTree

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import syncnorm
from syncnorm import comm
from syncnorm._compat import COMPILE_MIN_TORCH, TORCH_VERSION
from syncnorm.testing import run_ranks
from reference import compare, make_case, run_layer_on_rank, use_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRY = os.environ.get("SYNCNORM_GPU_DRY") == "1"
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
DEVICE = "cpu" if DRY else ("cuda" if GPUS else None)
ONE_RANK_BACKEND = "nccl" if DEVICE == "cuda" else "gloo"
# The dry run checks this file's code, not the compiler: aot_eager traces forward and backward like
# inductor but generates no kernels (inductor's CPU code generation would cost a minute here).
COMPILE_BACKEND = "inductor" if DEVICE == "cuda" else "eager"
COMPILE_OK = TORCH_VERSION >= COMPILE_MIN_TORCH
# Per run of rank processes (they compile): below the GPU check's step timeout, so that a hang in one
# fixture leaves time for the other.
TIMEOUT = 200.0

needs_device = pytest.mark.skipif(
    DEVICE is None,
    reason=f"needs a CUDA device (found {GPUS}); SYNCNORM_GPU_DRY=1 runs these on the CPU",
)
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA itself (this is the dry run on the CPU)")
needs_compile = pytest.mark.skipif(
    not COMPILE_OK, reason=f"torch.compile of syncnorm needs torch >= 2.9 (this is {torch.__version__})"
)
needs_two_gpus = pytest.mark.skipif(
    DRY or GPUS < 2 or not torch.distributed.is_nccl_available(),
    reason=f"needs 2 CUDA devices and NCCL (found {GPUS} CUDA device(s))",
)


def _prepare(rank, device, backend):
    """Per rank: its device, no TF32 (float32 results comparable to a float32 reference), the
    on-device path even on the CPU, and collectives even in a group of one."""
    use_path("device")
    comm._COLLECTIVES_AT_ONE_RANK = True
    if device != "cuda":
        return torch.device(device)
    index = rank if backend == "nccl" else 0  # gloo ranks share cuda:0
    torch.cuda.set_device(index)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return torch.device("cuda", index)


def _attempt(check, *args):
    """``("ok", value)`` or ``("error", traceback)``: one failed check must not hide the others."""
    try:
        return ("ok", check(*args))
    except Exception:
        return ("error", traceback.format_exc())


def _value(results, name):
    status, value = results[name]
    assert status == "ok", f"{name} failed on the rank:\n{value}"
    return value


# --- (a) exactness of the CUDA kernels: 2 gloo ranks on one device --------------------------------

# uneven batches, a rank with a single sample, an empty rank
SIZES = [[3, 5], [1, 6], [4, 0]]
TOLERANCES = {  # (outputs and gradients, running statistics); half outputs are rounded to the dtype
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (4e-3, 1e-5),
    torch.bfloat16: (3e-2, 1e-5),
}


def _layer_cases(compiled):
    if compiled:  # each new batch size is a recompilation: fewer steps and dtypes than eager
        kinds = [(torch.float32, False), (torch.bfloat16, True)]
        sizes = [[3, 5], [6, 0]]
    else:
        kinds = [(dtype, channels_last) for dtype in TOLERANCES for channels_last in (False, True)]
        sizes = SIZES
    return [
        make_case((0, 3, 5, 4), sizes, steps=len(sizes), dtype=dtype, channels_last=channels_last,
                  module_dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        for dtype, channels_last in kinds
    ]


class _CompiledSyncBatchNorm(syncnorm.SyncBatchNorm):
    """A SyncBatchNorm compiled in place (its names and buffers stay the module's own)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.compile(fullgraph=True, backend=COMPILE_BACKEND)


def _layers_on_one_device(rank, world_size, device):
    where = _prepare(rank, device, "gloo")
    records = {"eager": [run_layer_on_rank(rank, world_size, case, device=where) for case in _layer_cases(False)]}
    if COMPILE_OK:
        # reference.run_layer_on_rank builds its layer as syncnorm.SyncBatchNorm: in this rank's process
        # only, that name now gives a compiled one.
        syncnorm.SyncBatchNorm = _CompiledSyncBatchNorm
        records["compiled"] = []
        for case in _layer_cases(True):
            torch._dynamo.reset()  # a fresh cache per case, far from the recompilation limit
            records["compiled"].append(run_layer_on_rank(rank, world_size, case, device=where))
        from torch._dynamo.utils import counters

        records["graphs"] = counters["stats"]["unique_graphs"]  # so "compiled" cannot quietly be eager
    return records


@pytest.fixture(scope="module")
def two_ranks_one_device():
    return run_ranks(_layers_on_one_device, 2, DEVICE, timeout=TIMEOUT)


def _compare_layer_cases(compiled, per_rank_records):
    for index, case in enumerate(_layer_cases(compiled)):
        rel, buffer_rel = TOLERANCES[case.inputs[0].dtype]
        per_rank = [records[index] for records in per_rank_records]
        compare(case, per_rank, rel=rel, buffer_rel=buffer_rel)
        assert all(all(rank["formats_kept"]) for rank in per_rank), "dtype or memory format not kept"


@needs_device
def test_two_ranks_on_one_device_match_batchnorm_on_the_global_batch(two_ranks_one_device):
    _compare_layer_cases(False, [ranks["eager"] for ranks in two_ranks_one_device])


@needs_device
@needs_compile
def test_two_ranks_on_one_device_compiled_match_batchnorm_on_the_global_batch(two_ranks_one_device):
    _compare_layer_cases(True, [ranks["compiled"] for ranks in two_ranks_one_device])
    assert all(ranks["graphs"] >= len(_layer_cases(True)) for ranks in two_ranks_one_device)


# --- syncnorm.join on CUDA tensors: 2 gloo ranks on one device -------------------------------------


def _join_on_one_device(rank, world_size, device):
    from test_join import TWO_RANKS, _train_rank  # the CPU test's model, batches and loop

    return _train_rank(rank, world_size, TWO_RANKS, device=_prepare(rank, device, "gloo"))


@needs_device
def test_join_on_one_device_matches_one_process():
    """Uneven numbers of batches under syncnorm.join with CUDA tensors (the stand-in's empty batches on
    the on-device path): equal to one process on the CPU, as tests/test_join.py checks on the CPU."""
    from test_join import TWO_RANKS, _check, _reference

    _check(run_ranks(_join_on_one_device, 2, DEVICE, timeout=TIMEOUT), _reference(TWO_RANKS, 2))


def _fused_on_one_device(rank, world_size, device):
    from test_act import _train_rank

    _prepare(rank, device, "gloo")
    return _train_rank(rank, world_size, [3, 5], torch.float64, True, "cuda:0" if device == "cuda" else "cpu")


def _fused_memory(rank, world_size, device):
    """One training step of six conv3x3 -> norm -> LeakyReLU(0.01) blocks, (8, 32, 32, 32) per rank:
    saved-for-backward bytes (unique storages) and, on CUDA, the step's peak memory above its start."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_memory import step_memory

    target = torch.device(device if device != "cuda" else "cuda:0")
    x = torch.randn(8, 32, 32, 32, device=target)
    result = {}
    for name in ("separate", "fused"):
        torch.manual_seed(0)
        layers = []
        for _ in range(6):
            layers.append(nn.Conv2d(32, 32, 3, padding=1, bias=False))
            layers += ([syncnorm.SyncBatchNormAct(32)] if name == "fused" else
                       [syncnorm.SyncBatchNorm(32), nn.LeakyReLU(0.01, inplace=True)])
        model = nn.Sequential(*layers).to(target)
        model(x.clone()).sum().backward()  # warm-up
        model.zero_grad(set_to_none=True)
        result[name] = step_memory(model, x)
    return result


@needs_device
def test_fused_norm_act_on_one_device_matches_and_keeps_less():
    """Issue 28 on the device: SyncBatchNormAct on 2 gloo ranks sharing the device (float64, channels_last,
    uneven batches) equals BatchNorm + the activation with the same weight rule on the global batch, and a
    training step of the six-block stack keeps at most 0.56x the saved bytes of SyncBatchNorm +
    LeakyReLU(inplace=True), and on CUDA reaches a lower peak (torch.cuda.max_memory_allocated)."""
    from test_act import _check_ranks

    _check_ranks(run_ranks(_fused_on_one_device, 2, DEVICE, timeout=TIMEOUT), [3, 5])
    for rank, result in enumerate(run_ranks(_fused_memory, 2, DEVICE, timeout=TIMEOUT)):
        (separate, separate_peak), (fused, fused_peak) = result["separate"], result["fused"]
        assert fused <= 0.56 * separate, (rank, fused, separate)
        if DEVICE == "cuda":
            assert fused_peak < separate_peak, (rank, fused_peak, separate_peak)


# --- (b) the synced training step: 1 NCCL rank (forced to sync), or 2 GPUs -------------------------


class _SyncedAtOneRank(syncnorm.SyncBatchNorm):
    """SyncBatchNorm that takes the synced path in training even in a group of one rank."""

    def forward(self, input):
        if not self.training:
            return super().forward(input)
        self.num_batches_tracked.add_(1)
        return syncnorm.SyncBatchNormFunction.apply(
            input, self.weight, self.bias, self.running_mean, self.running_var, self.eps, self.momentum,
            self.process_group,
        )


def _resnet(world_size):
    """A converted resnet: resnet18 on CUDA, a one-block-per-stage resnet in the dry run."""
    from torchvision.models.resnet import BasicBlock, ResNet, resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=10) if DEVICE == "cuda" else ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    model = syncnorm.convert_sync_batchnorm(model)
    if world_size == 1:
        for layer in model.modules():
            if type(layer) is syncnorm.SyncBatchNorm:
                layer.__class__ = _SyncedAtOneRank
    return model


def _batch(rank, device, dtype, seed=0):
    generator = torch.Generator().manual_seed(100 * seed + rank)
    x = torch.randn(6 + 2 * rank, 3, 32, 32, generator=generator, dtype=torch.float64) * 2 + 1
    target = torch.randint(0, 10, (x.size(0),), generator=generator)
    return x.to(device, dtype).contiguous(memory_format=torch.channels_last), target.to(device)


def _training_step(model, optimizer, x, target):
    optimizer.zero_grad(set_to_none=True)
    output = model(x)
    F.cross_entropy(output, target).backward()
    optimizer.step()
    return output


def _collectives_in_a_step(model, optimizer, x, target):
    """c10d collectives the profiler sees in one training step (counted by torch), and the BN layers."""
    from torch.profiler import ProfilerActivity, profile

    _training_step(model, optimizer, x, target)  # the first synced step also checks num_features
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _training_step(model, optimizer, x, target)
    collectives = sum(1 for event in prof.events() if event.name.startswith("c10d::"))
    layers = sum(1 for layer in model.modules() if isinstance(layer, syncnorm.SyncBatchNorm))
    return collectives, layers


def _without_host_sync(step):
    """Run ``step`` with every synchronizing CUDA call turned into an error."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return True


def _largest_difference(a, b):
    """max |a - b| / max(1, max |b|) over outputs, parameters, gradients and buffers of two models."""
    pairs = [(a["output"], b["output"])]
    for key in ("parameters", "buffers"):
        pairs += list(zip(a[key], b[key]))
    worst = 0.0
    for x, y in pairs:
        x, y = x.double(), y.double()
        worst = max(worst, (x - y).abs().max().item() / max(1.0, y.abs().max().item()))
    return worst


def _state(model, output):
    parameters = [p.detach().clone() for p in model.parameters()]
    parameters += [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    buffers = [b.detach().clone() for b in model.buffers()]
    return {"output": output.detach().clone(), "parameters": parameters, "buffers": buffers}


def _compiled_against_eager(model, x, target):
    """Two SGD steps of ``model`` and of its compiled copy from the same state; returns the compiled
    model and optimizer (for the host-sync check) and the largest difference."""
    compiled_copy = copy.deepcopy(model)
    compiled = torch.compile(compiled_copy, fullgraph=True, backend=COMPILE_BACKEND)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (model, compiled_copy)]
    worst = 0.0
    for _ in range(2):
        eager_state = _state(model, _training_step(model, optimizers[0], x, target))
        compiled_state = _state(compiled_copy, _training_step(compiled, optimizers[1], x, target))
        worst = max(worst, _largest_difference(compiled_state, eager_state))
    return compiled, optimizers[1], worst


def _graph_replay_against_eager(model, rank, device):
    """Capture forward + backward in a CUDA graph, replay it on new data; the largest difference from an
    eager copy of the model run from the same state on the same data."""
    static_x, _ = _batch(rank, device, torch.float32)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as CUDA graphs require
        for _ in range(2):
            model.zero_grad(set_to_none=False)
            model(static_x).sum().backward()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_y = model(static_x)
        static_y.sum().backward()

    static_x.copy_(_batch(rank, device, torch.float32, seed=1)[0])
    reference = copy.deepcopy(model)
    graph.replay()
    reference.zero_grad(set_to_none=True)
    expected_y = reference(static_x)
    expected_y.sum().backward()
    torch.cuda.synchronize()
    return _largest_difference(_state(model, static_y), _state(reference, expected_y))


def _synced_step_checks(rank, world_size, device, backend):
    """Every check of a synced training step on this rank, each result kept apart."""
    where = _prepare(rank, device, backend)
    results = {}
    model = _resnet(world_size).to(where, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, target = _batch(rank, where, torch.float32)
    results["collectives"] = _attempt(_collectives_in_a_step, model, optimizer, x, target)
    if device == "cuda":
        results["eager without host sync"] = _attempt(
            _without_host_sync, lambda: _training_step(model, optimizer, x, target))
        results["graph replay vs eager"] = _attempt(_graph_replay_against_eager, copy.deepcopy(model), rank, where)
    if COMPILE_OK:
        # float64: compiled and eager agree to rounding, so a real difference cannot hide in tolerance
        model64 = copy.deepcopy(model).double()
        x64, _ = _batch(rank, where, torch.float64)
        status, value = results["compiled vs eager"] = _attempt(_compiled_against_eager, model64, x64, target)
        if status == "ok":
            compiled, compiled_optimizer, worst = value
            results["compiled vs eager"] = ("ok", worst)
            if device == "cuda":
                results["compiled without host sync"] = _attempt(
                    _without_host_sync, lambda: _training_step(compiled, compiled_optimizer, x64, target))
    return results


@pytest.fixture(scope="module")
def one_rank():
    return run_ranks(_synced_step_checks, 1, DEVICE, ONE_RANK_BACKEND, backend=ONE_RANK_BACKEND,
                     timeout=TIMEOUT)[0]


@needs_device
def test_one_rank_forced_step_sends_two_collectives_per_layer(one_rank):
    # Without these the host-sync and graph checks below would not involve a collective at all.
    collectives, layers = _value(one_rank, "collectives")
    assert layers > 0 and collectives == 2 * layers, f"{collectives} collectives for {layers} synced layers"


@needs_cuda
@needs_device
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_one_rank_synced_step_never_synchronizes_with_the_host(one_rank, mode):
    if mode == "compiled" and not COMPILE_OK:
        pytest.skip(f"torch.compile of syncnorm needs torch >= 2.9 (this is {torch.__version__})")
    assert _value(one_rank, f"{mode} without host sync") is True


@needs_cuda
@needs_device
def test_one_rank_synced_step_replays_in_a_cuda_graph_like_eager(one_rank):
    worst = _value(one_rank, "graph replay vs eager")
    assert worst < 1e-5, f"replayed graph differs from eager by {worst:g}"


@needs_device
@needs_compile
def test_one_rank_compiled_fullgraph_equals_eager(one_rank):
    worst = _value(one_rank, "compiled vs eager")
    assert worst <= 1e-7, f"compiled differs from eager by {worst:g} (float64, 2 SGD steps)"


# --- two GPUs, two NCCL ranks ------------------------------------------------------------------------


def _layer_on_gpu(rank, world_size, case):
    torch.cuda.set_device(rank)
    return run_layer_on_rank(rank, world_size, case, device=f"cuda:{rank}")


@needs_two_gpus
def test_nccl_matches_batchnorm_on_the_global_batch():
    case = make_case((0, 3, 5, 4), [[3, 5], [1, 6], [4, 0]], dtype=torch.float64)
    compare(case, run_ranks(_layer_on_gpu, 2, case, backend="nccl", timeout=TIMEOUT), rel=1e-10)


@needs_two_gpus
def test_two_nccl_ranks_synced_step_checks():
    for rank, results in enumerate(run_ranks(_synced_step_checks, 2, "cuda", "nccl", backend="nccl",
                                             timeout=TIMEOUT)):
        collectives, layers = _value(results, "collectives")
        assert collectives == 2 * layers, f"rank {rank}: {collectives} collectives for {layers} layers"
        assert _value(results, "eager without host sync") is True
        assert _value(results, "graph replay vs eager") < 1e-5
        if COMPILE_OK:
            assert _value(results, "compiled vs eager") <= 1e-7
            assert _value(results, "compiled without host sync") is True


# --- the GPU check script itself, in its dry mode (what CI runs of this file) ------------------------


@pytest.mark.slow  # this file's tests and the GPU benchmark in dry mode: CI's slow step
@pytest.mark.skipif(os.environ.get("SYNCNORM_GPU_CHECK") == "1", reason="runs inside gpu_check.sh itself")
@pytest.mark.skipif(not COMPILE_OK, reason=f"the GPU machine's torch compiles; this is {torch.__version__}")
def test_gpu_check_script_dry_run_writes_its_logs_and_tables(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    env.pop("SYNCNORM_GPU_DRY", None)
    done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert re.search(r"^torch \S+, CUDA \S+, NCCL \S+", output, re.M), output[:2000]
    for name in ("versions.txt", "tests.log", "tests.xml", "bench.log", "bench_gpu.json", "bench_gpu.md",
                 "summary.txt"):
        assert (tmp_path / name).is_file(), f"{name} missing from $OUT: {sorted(os.listdir(tmp_path))}"
    suite = ElementTree.parse(tmp_path / "tests.xml").getroot().find("testsuite")
    counts = {key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped")}
    assert counts["failures"] == counts["errors"] == 0, (tmp_path / "tests.log").read_text()[-4000:]
    assert counts["tests"] - counts["skipped"] >= 4, counts  # the dry run ran the device tests' bodies

    result = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert result["meta"]["dry"] is True
    memory = result["memory"]  # issue 28's table: saved bytes everywhere, the peak on CUDA only (n/a here)
    assert set(memory["rows"]) == {"syncnorm+act", "syncnorm_act"}
    assert all(row["saved_bytes"] > 0 and row["peak_bytes"] is None for row in memory["rows"].values())
    assert memory["fused_over_separate"]["saved"] < 1
    assert "| syncnorm_act | " in (tmp_path / "bench_gpu.md").read_text()
    variants = {"bn", "torch_syncbn", "syncnorm", "syncnorm_compiled"}
    for row in result["layers"] + [result["train_step"]]:
        assert set(row["times"]) == variants, row
        for name in variants - {"torch_syncbn"}:  # torch's SyncBN kernels are CUDA-only
            assert row["times"][name]["median_ms"] > 0, (name, row)
    # the printed table has a row per layer configuration, every time cell a number or n/a
    table = [line for line in (tmp_path / "bench.log").read_text().splitlines()
             if line.startswith("| (")]
    assert len(table) == len(result["layers"]) > 0
    for line in table:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert all(re.fullmatch(r"[\d.]+|n/a", cell) for cell in cells[3:]), line
