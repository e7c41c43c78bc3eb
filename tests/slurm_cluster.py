"""A real SLURM cluster for the tests: munged, slurmctld and one slurmd per simulated node.

Everything lives in a fresh directory under /tmp (munge's key and socket, ``slurm.conf``, state, spool,
logs): nothing of the machine's own SLURM or munge configuration is read or touched. ``SLURM_CONF`` in
:meth:`Cluster.env` points the client commands (``srun``, ``sinfo``, ``scontrol``) at it. Each daemon
runs in the foreground (``-D`` / ``-F``) as a child of the test, so :meth:`Cluster.stop` ends exactly
the processes it started, by PID; it cancels any job left over first.

A node may live in a network namespace (``netns``: a path like ``/run/netns/NAME``, entered with
``nsenter --net=``, which leaves ``/sys`` and the mounts alone). Node names (``n1``, ``n2``) do not
resolve: ``scontrol show node`` knows their addresses (``NodeAddr``).

:func:`install` puts Debian's packages in place where they are missing (root and apt-get needed).
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

# tool -> the Debian package that has it
TOOLS = {"slurmctld": "slurmctld", "slurmd": "slurmd", "srun": "slurm-client", "sinfo": "slurm-client",
         "scontrol": "slurm-client", "munged": "munge"}
SEARCH_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin"


def which(tool: str) -> Optional[str]:
    return shutil.which(tool, path=SEARCH_PATH)


def install() -> Optional[str]:
    """Install the SLURM packages that are missing; returns why they cannot be (None: all there).
    Raises RuntimeError when apt-get itself fails (with root and apt-get, CI expects it to work)."""
    missing = sorted({package for tool, package in TOOLS.items() if which(tool) is None})
    if not missing:
        return None
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return f"SLURM is not installed (packages {', '.join(missing)}) and installing it needs root"
    if which("apt-get") is None:
        return f"SLURM is not installed (packages {', '.join(missing)}) and there is no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:  # a fresh machine may have no package lists yet
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return None


@dataclass(frozen=True)
class SimNode:
    """One simulated node: its slurmd listens on ``address:port``, inside ``netns`` when given."""
    name: str
    address: str
    port: int
    netns: Optional[str] = None


def _in(netns: Optional[str], argv: Sequence[str]) -> List[str]:
    return ([which("nsenter") or "nsenter", f"--net={netns}"] if netns else []) + list(argv)


class Cluster:
    """``controller``: slurmctld's address and port (and netns); ``nodes``: one slurmd each."""

    def __init__(self, nodes: Sequence[SimNode], controller: SimNode) -> None:
        self.nodes, self.controller = list(nodes), controller
        self.dir = tempfile.mkdtemp(prefix="syncnorm-slurm-")
        os.chmod(self.dir, 0o755)  # munged wants every directory above its socket searchable by all
        self.conf = os.path.join(self.dir, "slurm.conf")
        self.processes: List[tuple] = []  # (name, Popen, log path)

    def env(self, **extra: str) -> Dict[str, str]:
        """This process's environment without any launcher's variables, with ``SLURM_CONF`` set."""
        drop = ("SLURM_", "MASTER_", "GLOO_", "TORCHELASTIC_", "RANK", "WORLD_SIZE", "LOCAL_", "GROUP_")
        return {**{k: v for k, v in os.environ.items() if not k.startswith(drop)}, "SLURM_CONF": self.conf,
                "PATH": SEARCH_PATH, **extra}

    def run(self, argv: Sequence[str], timeout: float, netns: Optional[str] = None, **kwargs):
        """``argv`` (e.g. srun ...) as a client of this cluster, in the controller's namespace by default."""
        kwargs.setdefault("env", self.env())
        return subprocess.run(_in(netns or self.controller.netns, argv), capture_output=True, text=True,
                              timeout=timeout, **kwargs)

    def _start(self, name: str, argv: Sequence[str], netns: Optional[str] = None, **kwargs) -> None:
        log = os.path.join(self.dir, "log", f"{name}.out")
        with open(log, "w") as out:
            process = subprocess.Popen(_in(netns, argv), stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=self.env(), **kwargs)
        self.processes.append((name, process, log))

    def _write_conf(self) -> None:
        d, ctl = self.dir, self.controller
        lines = [
            "ClusterName=syncnorm", f"SlurmctldHost=localhost({ctl.address})", f"SlurmctldPort={ctl.port}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={d}/munge/socket",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "MpiDefault=none", "ReturnToService=2",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool/%n",
            f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd.%n.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log", f"SlurmdLogFile={d}/log/slurmd.%n.log",
        ]
        lines += [f"NodeName={n.name} NodeAddr={n.address} Port={n.port} CPUs=2 State=UNKNOWN" for n in self.nodes]
        lines.append("PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES")
        with open(self.conf, "w") as conf:
            conf.write("\n".join(lines) + "\n")

    def start(self, timeout: float = 60) -> "Cluster":
        """Start munged, slurmctld and the slurmds; return once ``sinfo`` shows every node idle."""
        d = self.dir
        for sub in ("munge", "state", "spool", "log"):
            os.makedirs(os.path.join(d, sub))
        munge = os.path.join(d, "munge")
        with open(os.path.join(munge, "key"), "wb") as key:
            key.write(os.urandom(1024))
        shutil.chown(munge, "munge", "munge")
        shutil.chown(os.path.join(munge, "key"), "munge", "munge")
        os.chmod(os.path.join(munge, "key"), 0o400)
        os.chmod(munge, 0o755)
        self._write_conf()
        self._start("munged", [which("munged"), "-F", f"--socket={munge}/socket", f"--key-file={munge}/key",
                               f"--pid-file={munge}/pid", f"--log-file={munge}/log", f"--seed-file={munge}/seed"],
                    user="munge", group="munge")
        deadline = time.monotonic() + timeout
        while not os.path.exists(f"{munge}/socket"):
            self._check_alive(deadline)
        self._start("slurmctld", [which("slurmctld"), "-D"], self.controller.netns)
        for node in self.nodes:
            self._start(f"slurmd-{node.name}", [which("slurmd"), "-D", "-N", node.name], node.netns)
        while True:
            states = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], timeout=30).stdout.split()
            if states[1::2] == ["idle"] * len(self.nodes):
                return self
            self._check_alive(deadline, f"sinfo: {' '.join(states) or 'no answer'}")

    def _check_alive(self, deadline: float, state: str = "") -> None:
        for name, process, _ in self.processes:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with status {process.returncode}:\n{self.logs()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the SLURM cluster did not come up ({state}):\n{self.logs()}")
        time.sleep(0.2)

    def logs(self, lines: int = 15) -> str:
        text = []
        for path in [log for _, _, log in self.processes] + [os.path.join(self.dir, "log", name) for name in
                                                              sorted(os.listdir(os.path.join(self.dir, "log")))
                                                              if name.endswith(".log")]:
            with open(path, errors="replace") as handle:
                text.append(f"--- {os.path.basename(path)}\n" + "\n".join(handle.read().splitlines()[-lines:]))
        return "\n".join(dict.fromkeys(text))

    def stop(self) -> None:
        """Cancel leftover jobs, stop the daemons by PID (SIGTERM, then SIGKILL), remove the directory."""
        if any(name == "slurmctld" and process.poll() is None for name, process, _ in self.processes):
            jobs = self.run(["squeue", "-h", "-o", "%i"], timeout=30).stdout.split()
            if jobs:
                self.run(["scancel", "--full", *jobs], timeout=30)
        for _, process, _ in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _, process, _ in reversed(self.processes):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        self.processes = []
        shutil.rmtree(self.dir, ignore_errors=True)
