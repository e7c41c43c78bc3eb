"""SLURM: the launcher and ``syncnorm.distributed.init_from_env`` under ``srun``, on a real cluster.

The tests marked ``engines`` (``pytest -m engines``; CI runs them as their own step) start one SLURM
cluster for the module (``tests/slurm_cluster.py``: munged, slurmctld, two slurmd, all from a temp dir,
stopped by PID at the end), installing Debian's packages where they are missing (root and apt-get
needed, else skipped with the reason). With root and ``ip netns`` the two nodes are two network
namespaces joined by a veth pair (``tests/netns.py``): slurmctld and node n1 in one, n2 in the other,
each slurmd started with ``nsenter --net=``, so ``srun -N2`` really spans two networks. Without
namespaces both nodes listen on 127.0.0.1 and the two-network test is skipped.

Checks: LeNet under ``srun -N1 -n2`` and under ``srun -N2 -n2`` (one rank per node) equals
``torchrun --standalone --nproc_per_node=2`` bit for bit (metrics and every tensor of the saved model),
and so does torchrun started by ``srun`` (a batch script's other form: torchrun's variables win); a
library script under ``srun`` matches BatchNorm on the global batch in one process; a job of two
tasks that runs the launcher without ``srun`` (``salloc``) is one line and exit status 2.

The other tests read SLURM's variables in this process (no SLURM needed) and run by default.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import netns
import slurm_cluster
from conftest import LAUNCH_VARIABLES
from slurm_cluster import Cluster, SimNode
from syncnorm import distributed as launchers
from syncnorm.train.preflight import LaunchEnvironmentError, check_launch_environment
from trainkit import ROOT, free_port

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
TRAIN = [sys.executable, "launch/train.py", "--config", "configs/lenet.yaml", "--set", "train.epochs=1",
         "--set", "train.max_steps=4", "--set", "dist.threads=1"]
RUN_TIMEOUT_S = 120

# What srun gave rank 1 of `srun -N2 -n2` and a batch script of `sbatch -N2 -n2` on the test cluster.
SRUN_TASK = {"SLURM_JOB_ID": "4321", "SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_PROCID": "1",
             "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "localhost,n2",
             "SLURM_NODELIST": "localhost,n2", "SLURM_STEP_NODELIST": "localhost,n2",
             "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_TASKS_PER_NODE": "1(x2)"}
BATCH_SCRIPT = {"SLURM_JOB_ID": "4321", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
                "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "1(x2)"}


# --------------------------------------------------------------------------- SLURM's variables, one process


def test_expand_hostlist():
    assert launchers.expand_hostlist("node[01-03,7],gpu1") == ["node01", "node02", "node03", "node7", "gpu1"]
    assert launchers.expand_hostlist("r[1-2]c[08-10]") == ["r1c08", "r1c09", "r1c10", "r2c08", "r2c09", "r2c10"]
    assert launchers.expand_hostlist("localhost") == ["localhost"]
    with pytest.raises(launchers.LaunchEnvironmentError, match=r"expected ranges like \[01-03,7\] \(got \[3-1\]\)"):
        launchers.expand_hostlist("n[3-1]")


def test_srun_task_becomes_torchrun_variables():
    assert launchers.torchrun_environment(SRUN_TASK) == {
        "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "1",
        "MASTER_ADDR": "localhost", "MASTER_PORT": str(15000 + 4321)}
    # a step on part of the job's nodes: rank 0 is on the step's first node, not the job's
    step = {**SRUN_TASK, "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_TASKS_PER_NODE": "3",
            "SLURM_NTASKS": "3", "SLURM_NODEID": "0", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "n[1-2],localhost"}
    assert launchers.torchrun_environment(step)["LOCAL_WORLD_SIZE"] == "3"
    assert launchers.torchrun_environment(step)["MASTER_ADDR"] == "localhost"
    uneven = {**SRUN_TASK, "SLURM_STEP_TASKS_PER_NODE": "2(x2),1", "SLURM_NODEID": "2", "SLURM_NTASKS": "5"}
    assert launchers.torchrun_environment(uneven)["LOCAL_WORLD_SIZE"] == "1"
    given = launchers.torchrun_environment({**SRUN_TASK, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29555"})
    assert (given["MASTER_ADDR"], given["MASTER_PORT"]) == ("10.1.2.3", "29555")


def test_torchrun_wins_and_single_tasks_stay_one_process():
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert launchers.torchrun_environment({**SRUN_TASK, **torchrun}) == {}  # srun torchrun: its workers
    assert launchers.torchrun_environment({}) == {}
    assert launchers.torchrun_environment({**BATCH_SCRIPT, "SLURM_NTASKS": "1"}) == {}  # python in a 1-task job
    # salloc's interactive step and the batch step have step ids far above any srun step
    with pytest.raises(launchers.LaunchEnvironmentError, match="not started by srun"):
        launchers.torchrun_environment({**BATCH_SCRIPT, "SLURM_STEP_ID": str(0xFFFFFFFA)})


def test_tasks_without_srun_are_one_line_with_exit_status_2(monkeypatch, capsys):
    from trainkit import load_launcher

    with pytest.raises(LaunchEnvironmentError, match="SLURM job 4321 has 2 tasks, but this process was not "
                                                     "started by srun"):
        check_launch_environment(BATCH_SCRIPT)
    with pytest.raises(LaunchEnvironmentError, match="'nosuchnode.invalid' hosts rank 0's store, but its name "
                                                     "does not resolve here.*set MASTER_ADDR"):
        check_launch_environment({**SRUN_TASK, "SLURM_STEP_NODELIST": "nosuchnode.invalid,n2",
                                  "PATH": "/nonexistent"})  # no scontrol to ask
    for name, value in BATCH_SCRIPT.items():
        monkeypatch.setenv(name, value)
    assert load_launcher().main(["--config", "configs/lenet.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: SLURM job 4321 has 2 tasks") and "srun python" in err


@pytest.fixture
def own_launch_environment(monkeypatch):
    """The launcher variables absent, and put back as they were afterwards: the code under test writes them
    into os.environ itself (monkeypatch.delenv of an absent name would not remove them again)."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.setenv(name, "")  # recorded, so undone at teardown
        monkeypatch.delenv(name)


def test_check_launch_environment_writes_slurm_ranks_as_torchrun_variables(monkeypatch, own_launch_environment):
    for name, value in SRUN_TASK.items():
        monkeypatch.setenv(name, value)
    check_launch_environment()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_PORT"]) == ("1", "2", "19321")


def test_init_from_env_under_a_one_task_step(monkeypatch, own_launch_environment):
    import torch.distributed as dist

    assert launchers.init_from_env() is False and not dist.is_initialized()  # no launcher: nothing to do
    one = {**SRUN_TASK, "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_NODEID": "0",
           "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_TASKS_PER_NODE": "1", "MASTER_PORT": str(free_port())}
    for name, value in one.items():
        monkeypatch.setenv(name, value)
    assert launchers.init_from_env(backend="gloo") is True
    try:
        assert (dist.get_rank(), dist.get_world_size(), os.environ["LOCAL_RANK"]) == (0, 1, "0")
        assert launchers.init_from_env() is False  # a group exists (Ray Train, Lightning): left alone
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- a real cluster


@pytest.fixture(scope="module")
def cluster():
    reason = slurm_cluster.install()
    if reason:
        pytest.skip(reason)
    two = None
    if netns.unavailable() is None:
        two = netns.TwoHosts().__enter__()
        nets = [os.path.join("/run/netns", host.namespace) for host in two.hosts]
        nodes = [SimNode(f"n{k + 1}", host.address, 6818, net) for k, (host, net) in enumerate(zip(two.hosts, nets))]
        controller = SimNode("ctl", two.hosts[0].address, 6817, nets[0])
    else:
        nodes = [SimNode(f"n{k}", "127.0.0.1", free_port()) for k in (1, 2)]
        controller = SimNode("ctl", "127.0.0.1", free_port())
    running = Cluster(nodes, controller)
    running.separate_networks = two is not None
    try:
        yield running.start()
    finally:
        running.stop()
        if two is not None:
            two.close()


@pytest.fixture(scope="module")
def torchrun_reference(cluster, tmp_path_factory):
    """LeNet's short run under torchrun on this machine, 2 ranks: what srun must reproduce."""
    out = tmp_path_factory.mktemp("torchrun")
    argv = [TORCHRUN, "--standalone", "--nproc_per_node=2", *TRAIN[1:], "--set", f"output_dir={out}/run"]
    done = subprocess.run(argv, cwd=ROOT, env=cluster.env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, f"torchrun reference failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return f"{out}/run"


def _srun(cluster, argv, **kwargs):
    done = cluster.run(["srun", *argv], timeout=RUN_TIMEOUT_S, cwd=ROOT, **kwargs)
    return done, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n{cluster.logs()}"


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as rows:
        return [{k: v for k, v in json.loads(row).items() if k not in ("samples_per_s", "seconds", "data_wait")}
                for row in rows]


def _assert_same_run(run_dir, reference, report):
    assert _metrics(run_dir) == _metrics(reference), report
    ours, theirs = (torch.load(os.path.join(d, "ckpt_epoch1.pt"), map_location="cpu", weights_only=True)["model"]
                    for d in (run_dir, reference))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.engines
def test_expand_hostlist_agrees_with_scontrol(cluster):
    for text in ("node[01-03,7],gpu1", "r[1-2]c[08-10]", "a,b[9-11],c"):
        shown = cluster.run(["scontrol", "show", "hostnames", text], timeout=30)
        assert launchers.expand_hostlist(text) == shown.stdout.split(), shown.stderr


@pytest.mark.engines
def test_launcher_under_srun_one_node_equals_torchrun(cluster, torchrun_reference, tmp_path):
    done, report = _srun(cluster, ["-N1", "-n2", *TRAIN, "--set", f"output_dir={tmp_path}/run"])
    assert done.returncode == 0, report
    assert "global batch 128 = 2 rank(s) x 64" in done.stdout, report
    _assert_same_run(f"{tmp_path}/run", torchrun_reference, report)


@pytest.mark.engines
def test_launcher_under_srun_two_nodes_equals_torchrun(cluster, torchrun_reference, tmp_path):
    if not cluster.separate_networks:
        pytest.skip(f"two nodes on separate networks need root and ip netns: {netns.unavailable()}")
    done, report = _srun(cluster, ["-N2", "-n2", *TRAIN, "--set", f"output_dir={tmp_path}/run"])
    assert done.returncode == 0, report
    for node in cluster.nodes:  # one rank on each node, each on its own network, reaching n1's store
        assert f"interface veth{'ab'[int(node.name[1]) - 1]} ({node.address}, the address that reaches " \
               f"MASTER_ADDR={cluster.nodes[0].address})" in done.stdout + done.stderr, report
    _assert_same_run(f"{tmp_path}/run", torchrun_reference, report)


@pytest.mark.engines
def test_torchrun_under_srun_still_equals_torchrun(cluster, torchrun_reference, tmp_path):
    # the form of a batch script that starts one torchrun per node: in its workers torchrun's variables win
    done, report = _srun(cluster, ["-N1", "-n1", TORCHRUN, "--standalone", "--nproc_per_node=2", *TRAIN[1:],
                                   "--set", f"output_dir={tmp_path}/run"])
    assert done.returncode == 0, report
    _assert_same_run(f"{tmp_path}/run", torchrun_reference, report)


# A user's script: init_from_env, one synced layer, the global batch split over the ranks (float64).
LIBRARY_SCRIPT = textwrap.dedent("""
    import os, torch, torch.distributed as dist, syncnorm, syncnorm.distributed
    assert syncnorm.distributed.init_from_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    x = torch.randn(world * 6, 3, 5, 5, dtype=torch.float64) * 3 + 1
    grad = torch.randn_like(x)
    mine = slice(rank * 6, (rank + 1) * 6)
    reference = torch.nn.BatchNorm2d(3).double()
    synced = syncnorm.convert_sync_batchnorm(torch.nn.BatchNorm2d(3).double())
    x_all, x_mine = x.clone().requires_grad_(), x[mine].clone().requires_grad_()
    expected = reference(x_all)
    expected.backward(grad)
    out = synced(x_mine)
    out.backward(grad[mine])
    for ours, theirs in [(out, expected[mine]), (x_mine.grad, x_all.grad[mine]),
                         (synced.running_mean, reference.running_mean), (synced.running_var, reference.running_var)]:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    print(f"rank {rank} of {world} (SLURM_PROCID={os.environ['SLURM_PROCID']}): exact", flush=True)
    dist.destroy_process_group()
""")


@pytest.mark.engines
def test_library_script_under_srun_is_exact(cluster, tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(LIBRARY_SCRIPT)
    done, report = _srun(cluster, ["-N1", "-n2", sys.executable, str(script)])
    assert done.returncode == 0, report
    assert sorted(done.stdout.splitlines()) == [f"rank {k} of 2 (SLURM_PROCID={k}): exact" for k in (0, 1)], report


@pytest.mark.engines
def test_tasks_started_without_srun_are_one_line(cluster, tmp_path):
    # salloc runs the command once, in the job's allocation of two tasks, as a batch script would
    done = cluster.run(["salloc", "-N1", "-n2", *TRAIN, "--set", f"output_dir={tmp_path}/run"], timeout=RUN_TIMEOUT_S,
                       cwd=ROOT)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1, f"{done.stdout}\n{done.stderr}"
    assert "has 2 tasks, but this process was not started by srun" in errors[0]
    assert not (tmp_path / "run").exists()
