"""Two machines: torchrun --nnodes=2 across two network namespaces, against one machine.

The two "machines" (``tests/netns.py``) are network namespaces joined by a veth pair; each has its own
host name resolving to 127.0.1.1 (Debian's layout, where gloo's default fails) and its own disk for
``output_dir``. The recipes are docs/multinode.md's, with nothing else set: the static form
(``--master-addr/--master-port/--node-rank``) and the c10d form (``--rdzv-endpoint`` + ``--local-addr``,
``--rdzv-conf=is_host=1`` on the endpoint node). Reference: the same config on one machine,
``torchrun --standalone --nproc_per_node=2`` with the same ``dist.threads``; metrics and the saved
model must agree bit for bit. Needs root and ``ip netns`` (skipped otherwise, with the reason).

The unit tests of the interface chooser (``syncnorm.train.network``) and of the join-failure line run
everywhere.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

import netns
from syncnorm.train import network
from syncnorm.train.failures import describe_join_failure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
# What the tests add to the recipe: one short epoch, equal threads per rank (bitwise agreement needs it).
QUICK = ["--set", "train.epochs=1", "--set", "dist.threads=1"]
NODE_TIMEOUT_S = 120
STORE_PORT, RDZV_PORT = 29500, 29400


def _clean_env():
    """This process's environment without anything a launcher or an earlier run may have set."""
    drop = ("MASTER_", "GLOO_", "NCCL_", "TORCHELASTIC_", "RANK", "WORLD_SIZE", "LOCAL_", "GROUP_", "ROLE_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def _train_argv(launch, output_dir, extra=()):
    return [TORCHRUN, *launch, "launch/train.py", "--config", "configs/lenet.yaml", *QUICK,
            "--set", f"output_dir={output_dir}", *extra]


def _recipe(form, host, endpoint, node_rank):
    """docs/multinode.md's torchrun arguments for ``host`` (``endpoint``: node A's address)."""
    if form == "static":
        return ["--nnodes=2", "--nproc_per_node=1", f"--master-addr={endpoint}", f"--master-port={STORE_PORT}",
                f"--node-rank={node_rank}"]
    return (["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}:{RDZV_PORT}",
             "--rdzv-id=job1", f"--local-addr={host.address}"]
            + (["--rdzv-conf=is_host=1"] if node_rank == 0 else []))


def _run_two(two, form, out, extra=(), endpoint=None):
    """Both nodes' torchrun, each with its own disk at ``out/run``; returns [(exit code, node)].
    ``endpoint``: how the recipe names node A (default: its address)."""
    endpoint = endpoint or two.hosts[0].address
    nodes = [two.start(host, _train_argv(_recipe(form, host, endpoint, k), f"{out}/run", extra),
                       log=f"{out}/node{k}.log", timeout=NODE_TIMEOUT_S, cwd=ROOT, env=_clean_env(),
                       disk=f"{out}/disk{k}", mount_at=f"{out}/run")
             for k, host in enumerate(two.hosts)]
    return [(node.wait(), node) for node in nodes]


def _report(results):
    return "\n".join(f"--- {node.host.hostname} (exit {code}), last lines:\n{node.tail()}" for code, node in results)


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as rows:
        rows = [json.loads(line) for line in rows]
    for row in rows:  # timing is not part of the result
        row.pop("samples_per_s")
        row.pop("seconds")
        row.pop("data_wait", None)
    return rows


def _model(run_dir):
    return torch.load(os.path.join(run_dir, "ckpt_epoch1.pt"), map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def two_hosts():
    reason = netns.unavailable()
    if reason:
        pytest.skip(f"two simulated machines need root and ip netns: {reason}")
    with netns.TwoHosts() as two:  # namespaces and veth pair deleted on every exit
        yield two


@pytest.fixture(scope="module")
def single_host(two_hosts, tmp_path_factory):
    """The reference: the same training on one machine, 2 ranks, same threads per rank."""
    out = tmp_path_factory.mktemp("one_host")
    argv = _train_argv(["--standalone", "--nproc_per_node=2"], f"{out}/run")
    done = subprocess.run(argv, cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=NODE_TIMEOUT_S)
    assert done.returncode == 0, f"single-host reference run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return f"{out}/run"


@pytest.fixture(scope="module")
def static_run(two_hosts, tmp_path_factory):
    out = tmp_path_factory.mktemp("static")
    return out, _run_two(two_hosts, "static", out)


def _check_agrees(out, results, single_host):
    assert [code for code, _ in results] == [0, 0], _report(results)
    # rank 0 (node A, node rank 0) wrote the outputs on its own disk; node B's disk has only its log
    assert _metrics(f"{out}/disk0") == _metrics(single_host), _report(results)
    assert not os.path.exists(f"{out}/disk1/metrics.jsonl")
    ours, reference = _model(f"{out}/disk0"), _model(single_host)
    assert ours.keys() == reference.keys()
    for key in ours:
        assert torch.equal(ours[key], reference[key]), key
    for _, node in results:  # the chooser took the veth: the address that reaches node A
        host = node.host
        assert f"gloo on {host.hostname}: interface {host.interface} ({host.address}," in node.output(), _report(results)


def test_static_recipe_matches_one_host(static_run, single_host):
    out, results = static_run
    _check_agrees(out, results, single_host)


def test_c10d_recipe_matches_one_host(two_hosts, single_host, tmp_path):
    results = _run_two(two_hosts, "c10d", tmp_path)
    # c10d ignores node ranks: global rank 0, and with it the outputs, lands on either node
    if not os.path.exists(f"{tmp_path}/disk0/metrics.jsonl"):
        os.rename(f"{tmp_path}/disk0", f"{tmp_path}/disk_b")
        os.rename(f"{tmp_path}/disk1", f"{tmp_path}/disk0")
        os.rename(f"{tmp_path}/disk_b", f"{tmp_path}/disk1")
    _check_agrees(tmp_path, results, single_host)


def test_resume_without_shared_disk_stops_every_node(two_hosts, static_run):
    """Node A's disk has epoch 1's checkpoint, node B's has none: every node ends with the one line.
    Here the recipe names node A by its host name, which is 127.0.1.1 on node A itself."""
    out, first = static_run
    assert [code for code, _ in first] == [0, 0], _report(first)
    started = time.monotonic()
    results = _run_two(two_hosts, "static", out, ["--resume", "auto", "--set", "train.epochs=2"], endpoint="hosta")
    assert all(code not in (0, -9) for code, _ in results), _report(results)  # torchrun: a worker failed
    (_, node_a), (_, node_b) = results  # both joined: gloo on the veths
    assert ("gloo on hosta: interface vetha (the default route's; MASTER_ADDR=hosta is a loopback address here)"
            in node_a.output()), _report(results)
    assert "gloo on hostb: interface vethb (10.213.7.2, the address that reaches MASTER_ADDR=hosta)" in node_b.output()
    for _, node in results:
        lines = [line for line in node.output().splitlines() if line.startswith("error: ")]
        assert lines and "--resume needs an output_dir every node can read" in lines[0], _report(results)
        assert "rank 0 chose" in lines[0] and "ckpt_epoch1.pt (epoch 1)" in lines[0], _report(results)
    assert time.monotonic() - started < 60, "the stop must not wait for a timeout"
    assert len(_metrics(f"{out}/disk0")) == 1, "no epoch 2 was recorded"


def test_no_interface_towards_master_fails_at_once(two_hosts, tmp_path):
    """Host name on loopback and no route to MASTER_ADDR: one line naming GLOO_SOCKET_IFNAME, before any join."""
    probe = ("from syncnorm.train import network\n"
             "try:\n    network.apply_gloo_interface('gloo', 2, 1, 0)\n"
             "except network.NetworkError as error:\n    print('NetworkError:', error)\n")
    env = dict(_clean_env(), MASTER_ADDR="nosuchhost.invalid")  # no address, so no route
    node = two_hosts.start(two_hosts.hosts[1], [sys.executable, "-c", probe], log=f"{tmp_path}/probe.log",
                           timeout=60, cwd=ROOT, env=env)
    assert node.wait() == 0, node.tail()
    line = node.output().strip().splitlines()[-1]
    assert line.startswith("NetworkError: ") and "'hostb' resolves to 127.0.1.1" in line, line
    assert "set GLOO_SOCKET_IFNAME=" in line, line


# ---------------------------------------------------------------- the chooser and the join line, anywhere


def _ip_addresses():
    """(interface, primary IPv4 address) as ``ip -o -4 addr`` lists them: a reference independent of ours."""
    try:
        listed = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    first = {}
    for line in listed.splitlines():
        words = line.split()
        first.setdefault(words[1], words[3].split("/")[0])
    return list(first.items())


def test_interface_of_agrees_with_ip_addr():
    pairs = _ip_addresses()
    if not pairs:
        pytest.skip("'ip -o -4 addr' is not available to compare with")
    for name, address in pairs:
        assert network.interface_of(address) == name, (name, address)


def test_default_route_interface_agrees_with_ip_route():
    try:
        listed = subprocess.run(["ip", "-4", "route", "show", "default"], capture_output=True, text=True,
                                timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        pytest.skip("'ip route' is not available to compare with")
    expected = listed[listed.index("dev") + 1] if "dev" in listed else None
    assert network.default_route_interface() == expected


def test_local_address_towards_loopback():
    assert network.local_address_towards("127.0.0.1") == "127.0.0.1"
    assert network.interface_of(network.local_address_towards("127.0.0.1")) == network.loopback_interface(
        network.interface_addresses())


def test_choose_gloo_interface_cases(monkeypatch):
    lo = network.loopback_interface(network.interface_addresses())
    choose = network.choose_gloo_interface
    assert choose("gloo", 2, 2, {}).name == lo                      # one machine: loopback, as before
    assert choose("gloo", 2, 1, {"GLOO_SOCKET_IFNAME": "eth7"}).name is None  # the user's setting wins
    assert choose("nccl", 2, 1, {"MASTER_ADDR": "127.0.0.1"}).name is None
    assert choose("gloo", 1, 1, {}).name is None
    across = choose("gloo", 2, 1, {"MASTER_ADDR": "127.0.0.1"})  # an address: every node is this machine
    assert across.name == lo and "MASTER_ADDR=127.0.0.1" in across.message
    if network.default_route_interface() is not None:  # a name, loopback only here: the default route's
        assert choose("gloo", 2, 1, {"MASTER_ADDR": "localhost"}).name == network.default_route_interface()

    def unroutable(host, port=9):
        raise OSError(101, "Network is unreachable")
    monkeypatch.setattr(network, "local_address_towards", unroutable)
    monkeypatch.setattr(network, "hostname_address", lambda: "127.0.1.1")
    with pytest.raises(network.NetworkError) as caught:
        choose("gloo", 2, 1, {"MASTER_ADDR": "10.9.9.9"})
    message = str(caught.value)
    assert "\n" not in message and "127.0.1.1" in message and "set GLOO_SOCKET_IFNAME=" in message
    monkeypatch.setattr(network, "hostname_address", lambda: "192.0.2.7")  # gloo's default can work
    left = choose("gloo", 2, 1, {"MASTER_ADDR": "10.9.9.9"})
    assert left.name is None and "192.0.2.7" in left.message


def test_apply_gloo_interface_sets_and_says_once():
    said, env = [], {"MASTER_ADDR": "127.0.0.1"}
    name = network.apply_gloo_interface("gloo", 2, 1, 0, env, said.append)
    assert env["GLOO_SOCKET_IFNAME"] == name and len(said) == 1
    env2 = {"MASTER_ADDR": "127.0.0.1"}
    network.apply_gloo_interface("gloo", 2, 1, 1, env2, said.append)  # local rank 1 is quiet
    assert env2["GLOO_SOCKET_IFNAME"] == name and len(said) == 1


# What torch 2.14's gloo said in the two failures of issue 10 (hosts on 127.0.1.1, nothing set).
_REFUSED = RuntimeError("Gloo connectFullMesh failed with [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/"
                        "pair.cc:152] timed out connecting: SO_ERROR: Connection refused, remote=[127.0.1.1]:44465$0")
_TIMEOUT = RuntimeError("Gloo connectFullMesh failed with [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/"
                        "pair.h:311] Connect timeout [none]")


def test_join_failure_lines():
    refused = describe_join_failure(_REFUSED, "group", 0, 2, "10.0.0.1:29500", 10, 0.4)
    assert "after 0 s (dist.timeout_s=10)" in refused and "10.0.0.1:29500" in refused
    assert "gloo could not connect its peers" in refused and "loopback" in refused and "GLOO_SOCKET_IFNAME" in refused
    slow = describe_join_failure(_TIMEOUT, "group", 1, 2, "10.0.0.1:29500", 10, 50.2, interface="eth0")
    assert "after 50 s (dist.timeout_s=10)" in slow and "interface eth0" in slow
    store = describe_join_failure(RuntimeError("The client socket has timed out after 10000ms while trying to "
                                               "connect to (10.0.0.1, 29500)."), "store", 1, 2, "10.0.0.1:29500",
                                  10, 10.0)
    assert "could not reach the rendezvous store at 10.0.0.1:29500 after 10 s" in store
    missing = describe_join_failure(RuntimeError("wait timeout after 10000ms, keys: /syncnorm/attempt_0/0//cpu//0/1"),
                                    "group", 0, 2, "10.0.0.1:29500", 10, 10.0)
    assert "not all 2 ranks joined" in missing
    for line in (refused, slow, store, missing):
        assert "\n" not in line and line.startswith("rank ")


# ---------------------------------------------------------------- one agreed resume, in processes on this machine


def _resume_cases(rank, world_size, cases):
    """Each case as this rank sees it: ('ok', (path, epoch) or None, warnings) or (error class, message).
    A case is (--resume, the directory each rank works in): output_dir is the relative path ``run``, so
    ranks in different directories see different disks at the same path, as on two machines."""
    from types import SimpleNamespace

    from syncnorm.train import checkpoint as ckpt
    info = SimpleNamespace(rank=rank, world_size=world_size)
    outcomes = []
    for resume, cwd_by_rank in cases:
        os.chdir(cwd_by_rank[rank])
        warnings = []
        try:
            found = ckpt.agree_on_resume(resume, "run", info, warnings.append)
            outcomes.append(("ok", found and (found[0], int(found[1]["epoch"])), warnings))
        except ckpt.CheckpointError as error:
            outcomes.append((type(error).__name__, str(error)))
    return outcomes


def test_agreed_resume_on_two_ranks(tmp_path):
    """Rank 0 chooses; a rank that cannot read that same file stops every rank; never a mix of epochs."""
    from syncnorm.testing import run_ranks
    from syncnorm.train import checkpoint as ckpt
    payload = {"model": {}, "optimizer": {}, "scheduler": {}, "rng": {}, "config": {}, "metrics": [],
               "world_size": 3}
    disks = {name: tmp_path / name for name in ("shared", "a", "b", "c", "empty")}
    for disk in disks.values():
        (disk / "run").mkdir(parents=True)
    for epoch in (1, 2):
        ckpt.save_checkpoint(str(disks["shared"] / "run"), epoch, payload, keep=3)
    ckpt.save_checkpoint(str(disks["a"] / "run"), 1, payload, keep=3)
    ckpt.atomic_save(dict(payload, format=ckpt.FORMAT, epoch=5), str(disks["c"] / "run" / "ckpt_epoch1.pt"))
    on = lambda first, second: (str(disks[first]), str(disks[second]))  # noqa: E731
    cases = [("auto", on("shared", "shared")),  # one disk for all: epoch 2 everywhere
             ("auto", on("a", "b")),            # rank 1's disk lacks rank 0's choice
             ("auto", on("a", "c")),            # rank 1's disk has another epoch under that name
             ("auto", on("empty", "shared")),   # rank 0 finds nothing: every rank starts at epoch 1
             ("nope.pt", on("shared", "shared"))]  # rank 0's error stops every rank
    by_rank = run_ranks(_resume_cases, 2, cases, timeout=90)
    agreed, missing_there, other_epoch, none, bad_path = zip(*by_rank)  # per case: (rank 0's, rank 1's)
    assert agreed[0][:2] == agreed[1][:2] == ("ok", ("run/ckpt_epoch2.pt", 2))
    assert agreed[0][2] == ["run/ckpt_epoch2.pt was saved by 3 ranks, this run has 2: the global batch and the data "
                            "each rank sees change, so the results will differ from an uninterrupted run"]
    for outcome, reason in [(missing_there, "checkpoint not found: run/ckpt_epoch1.pt"),
                            (other_epoch, "the file there holds epoch 5")]:
        assert outcome[0] == outcome[1], outcome
        assert outcome[0] == ("SharedStorageError", f"--resume auto: rank 0 chose run/ckpt_epoch1.pt (epoch 1), but "
                                                    f"rank 1 cannot read that same file ({reason}): --resume needs an "
                                                    f"output_dir every node can read (shared storage, the same path "
                                                    f"on every node)")
    assert none[0][:2] == none[1][:2] == ("ok", None)
    assert bad_path[0] == bad_path[1] == ("CheckpointError", "checkpoint not found: nope.pt")
