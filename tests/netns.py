"""Two simulated machines on this one: two network namespaces joined by a veth pair.

Each "machine" is a network namespace with its own loopback, one end of the veth pair with an
address on a private /24 only these namespaces use (nothing outside them is touched or reached), its
own host name (a UTS namespace per process) that resolves to 127.0.1.1 on that machine as on Debian,
while the other machine's name resolves to its veth address as DNS would give it
(``/etc/netns/<ns>/hosts``, which ``ip netns exec`` bind-mounts over ``/etc/hosts``), a default route
through the veth (nothing lies beyond it: the other end is the other namespace), the machine's name
servers unreachable (a lookup of a name not in the hosts file fails at once instead of waiting seconds
for a server the veth cannot reach), and, if asked, its own "local disk": a directory bind-mounted
over a shared path in a private mount namespace, so the two machines see different files at the same
path.

Needs root and a working ``ip netns`` (:func:`unavailable` says why not). Names carry the pid and a
random suffix; :meth:`TwoHosts.close` deletes the namespaces (which deletes the veth pair) and their
``/etc/netns`` directories, and kills every process still inside them, by pid. :func:`remove_stale`
clears what a killed earlier run left behind (its pid no longer alive).
"""

import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

PREFIX = "snmn"                 # every namespace this helper makes: snmn<pid>x<hex><a|b>
SUBNET = "10.213.7"             # private /24, lives only on the veth pair between the two namespaces
NETNS_ETC = "/etc/netns"


def _ip(*args: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout, check=check)


def unavailable() -> Optional[str]:
    """Why the two-machine harness cannot run here (``None`` when it can)."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    for tool in ("ip", "unshare", "mount", "hostname"):
        if shutil.which(tool) is None:
            return f"{tool!r} not found on PATH"
    probe = f"{PREFIX}{os.getpid()}x{secrets.token_hex(2)}p"
    try:
        added = _ip("netns", "add", probe, check=False)
        if added.returncode != 0:
            return f"ip netns add fails here: {added.stderr.strip()}"
        inside = subprocess.run(["ip", "netns", "exec", probe, "unshare", "--uts", "--mount", "true"],
                                capture_output=True, text=True, timeout=10)
        if inside.returncode != 0:
            return f"ip netns exec + unshare --uts --mount fails here: {inside.stderr.strip()}"
    except (OSError, subprocess.SubprocessError) as error:
        return f"ip netns does not work here: {error}"
    finally:
        _ip("netns", "delete", probe, check=False)
    return None


def _name_servers(path: str = "/etc/resolv.conf") -> List[str]:
    """The machine's IPv4 name servers that are not loopback (a namespace reaches none of them)."""
    try:
        with open(path) as conf:
            words = [line.split() for line in conf]
    except OSError:
        return []
    return [w[1] for w in words if len(w) >= 2 and w[0] == "nameserver" and "." in w[1] and not w[1].startswith("127.")]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_inside(namespace: str) -> None:
    """SIGKILL every process inside ``namespace``, by pid (all of them were started by this harness)."""
    listed = _ip("netns", "pids", namespace, check=False)
    for word in listed.stdout.split():
        try:
            os.kill(int(word), signal.SIGKILL)
        except (ValueError, ProcessLookupError):
            pass


def _delete(namespace: str) -> None:
    _kill_inside(namespace)
    _ip("netns", "delete", namespace, check=False)
    shutil.rmtree(os.path.join(NETNS_ETC, namespace), ignore_errors=True)


def remove_stale() -> None:
    """Delete the namespaces of earlier runs of this harness whose process is gone (a killed run)."""
    listed = _ip("netns", "list", check=False).stdout.split()
    for word in listed:
        if not word.startswith(PREFIX) or "x" not in word[len(PREFIX):]:
            continue
        owner = word[len(PREFIX):].split("x", 1)[0]
        if owner.isdigit() and not _pid_alive(int(owner)):
            _delete(word)
    if os.path.isdir(NETNS_ETC):
        for name in os.listdir(NETNS_ETC):
            if name.startswith(PREFIX) and name not in listed:
                owner = name[len(PREFIX):].split("x", 1)[0]
                if owner.isdigit() and not _pid_alive(int(owner)):
                    shutil.rmtree(os.path.join(NETNS_ETC, name), ignore_errors=True)


@dataclass
class Host:
    """One simulated machine."""
    namespace: str
    hostname: str
    address: str
    interface: str


@dataclass
class Node:
    """A command running on a :class:`Host`; its output goes to ``log``."""
    host: Host
    process: subprocess.Popen
    log: str
    deadline: float

    def wait(self) -> int:
        try:
            return self.process.wait(timeout=max(0.1, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_inside(self.host.namespace)
            self.process.kill()
            self.process.wait(timeout=10)
            return -9

    def output(self) -> str:
        with open(self.log, errors="replace") as handle:
            return handle.read()

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.output().splitlines()[-lines:])


@dataclass
class TwoHosts:
    """Two namespaces ``a`` (``hosta``, SUBNET.1) and ``b`` (``hostb``, SUBNET.2) joined by a veth pair."""
    hosts: List[Host] = field(default_factory=list)

    def __enter__(self) -> "TwoHosts":
        remove_stale()
        tag = f"{PREFIX}{os.getpid()}x{secrets.token_hex(2)}"
        try:
            for index, letter in enumerate("ab"):
                namespace, other = tag + letter, "ba"[index]
                os.makedirs(os.path.join(NETNS_ETC, namespace))
                with open(os.path.join(NETNS_ETC, namespace, "hosts"), "w") as hosts:
                    # Debian's layout: the host's own name on 127.0.1.1; the other's as DNS would give it.
                    hosts.write(f"127.0.0.1 localhost\n127.0.1.1 host{letter}\n{SUBNET}.{2 - index} host{other}\n")
                _ip("netns", "add", namespace)
                self.hosts.append(Host(namespace, f"host{letter}", f"{SUBNET}.{index + 1}", f"veth{letter}"))
            a, b = self.hosts
            # Created directly inside the two namespaces: the veth pair never exists in ours.
            _ip("link", "add", a.interface, "netns", a.namespace, "type", "veth",
                "peer", "name", b.interface, "netns", b.namespace)
            for host in self.hosts:
                _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host.interface)
                _ip("-n", host.namespace, "link", "set", "lo", "up")
                _ip("-n", host.namespace, "link", "set", host.interface, "up")
                _ip("-n", host.namespace, "route", "add", "default", "dev", host.interface)
                for server in _name_servers():
                    _ip("-n", host.namespace, "route", "add", "unreachable", server)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for host in self.hosts:
            _delete(host.namespace)
        self.hosts = []

    def start(self, host: Host, argv: Sequence[str], log: str, timeout: float, cwd: Optional[str] = None,
              env: Optional[Dict[str, str]] = None, disk: Optional[str] = None,
              mount_at: Optional[str] = None) -> Node:
        """Run ``argv`` on ``host`` under its host name, output to ``log``; with ``disk``, the directory
        ``disk`` is this host's own view of the path ``mount_at``."""
        script = 'hostname "$1" && shift && '
        extra: List[str] = [host.hostname]
        if disk is not None:
            os.makedirs(disk, exist_ok=True)
            os.makedirs(mount_at, exist_ok=True)
            script += 'mount --bind "$1" "$2" && shift 2 && '
            extra += [disk, mount_at]
        script += 'exec "$@"'
        command = ["ip", "netns", "exec", host.namespace, "unshare", "--uts", "--mount", "--propagation", "private",
                   "sh", "-c", script, "sh", *extra, *argv]
        with open(log, "w") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       cwd=cwd, env=env)
        return Node(host, process, log, time.monotonic() + timeout)
