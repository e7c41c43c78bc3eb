"""Which network interface gloo listens on and advertises to its peers.

Left alone, gloo takes the address this host's name resolves to. Where that is a loopback address
(Debian's ``127.0.1.1 <host>`` line, many containers and cloud images) a run whose ranks span two
machines cannot connect: each rank tells the others to call it at 127.x. :func:`choose_gloo_interface`
picks the interface before the process group is created (gloo reads ``GLOO_SOCKET_IFNAME``):

- every rank on this machine: the loopback interface (nothing leaves the machine);
- ranks on several machines: the interface holding the local address the kernel would use to reach
  ``MASTER_ADDR`` (a UDP socket "connected" to it; no packet is sent), so gloo listens where the
  store's host, and with it the other machines, can reach it. On the store's own node, when
  ``MASTER_ADDR`` is a host name that resolves to loopback there (``--master-addr=$(hostname)`` on
  Debian), that address says nothing: the interface of the default route is taken instead.

A ``GLOO_SOCKET_IFNAME`` already set always wins. Pure Python (``socket``, ``fcntl`` ioctl, ``/proc``);
Linux only for the interface lookup, elsewhere the choice is left to gloo.
"""

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import Iterable, List, Mapping, MutableMapping, Optional, Tuple

from syncnorm.train.errors import ConfigError

_SIOCGIFADDR = 0x8915  # Linux: an interface's (primary) IPv4 address


class NetworkError(ConfigError):
    """This node cannot take part in a multi-machine gloo group as configured; the message says which
    setting fixes it. It concerns one node, so each node says it (not only rank 0's node)."""

    every_node = True


@dataclass(frozen=True)
class InterfaceChoice:
    """What :func:`choose_gloo_interface` decided: ``name`` goes to ``GLOO_SOCKET_IFNAME``; ``message``
    is the line to print once per node (empty when there is nothing worth saying)."""

    name: Optional[str]
    message: str = ""


def local_address_towards(host: str, port: int = 9) -> str:
    """The local IP address the kernel would use to reach ``host`` (routing table lookup; sends nothing)."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(sockaddr)
        return probe.getsockname()[0]


def interface_addresses() -> List[Tuple[str, str]]:
    """(interface, address) for every interface of this network namespace: each one's primary IPv4
    address (``SIOCGIFADDR``) and its IPv6 addresses (``/proc/net/if_inet6``). Empty where neither works."""
    pairs: List[Tuple[str, str]] = []
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (AttributeError, OSError):
        return pairs
    try:
        import fcntl
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for name in names:
                request = struct.pack("256s", name.encode()[:15])
                try:
                    reply = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)
                except OSError:  # no IPv4 address on this interface
                    continue
                pairs.append((name, socket.inet_ntoa(reply[20:24])))
    except (ImportError, OSError):
        pass
    try:
        with open("/proc/net/if_inet6") as table:
            for row in table:
                fields = row.split()
                if len(fields) == 6:
                    pairs.append((fields[5], str(ipaddress.IPv6Address(bytes.fromhex(fields[0])))))
    except (OSError, ValueError):
        pass
    return pairs


def interface_of(address: str, pairs: Optional[Iterable[Tuple[str, str]]] = None) -> Optional[str]:
    """The interface that holds ``address`` (``None`` when no interface does, as far as we can see)."""
    wanted = ipaddress.ip_address(address.split("%")[0])
    for name, held in interface_addresses() if pairs is None else pairs:
        if ipaddress.ip_address(held) == wanted:
            return name
    return None


def default_route_interface(table: str = "/proc/net/route") -> Optional[str]:
    """The interface of the IPv4 default route (``None`` when there is none or it cannot be read)."""
    try:
        with open(table) as rows:
            next(rows, None)  # header
            for row in rows:
                fields = row.split()
                if len(fields) >= 8 and fields[1] == "00000000" and fields[7] == "00000000":
                    return fields[0]
    except OSError:
        pass
    return None


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%")[0])
        return True
    except ValueError:
        return False


def loopback_interface(pairs: Iterable[Tuple[str, str]]) -> Optional[str]:
    """The interface holding 127.0.0.1 (``lo`` on Linux)."""
    return interface_of("127.0.0.1", pairs)


def hostname_address() -> Optional[str]:
    """The address this host's name resolves to: what gloo would use without ``GLOO_SOCKET_IFNAME``."""
    try:
        return socket.getaddrinfo(socket.gethostname(), None)[0][4][0]
    except (OSError, IndexError):
        return None


def is_loopback(address: Optional[str]) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def choose_gloo_interface(backend: str, world_size: int, local_world_size: int,
                          environ: Mapping[str, str] = os.environ) -> InterfaceChoice:
    """The interface gloo should use, or ``InterfaceChoice(None)`` to leave gloo's default alone.

    Raises :class:`NetworkError` when the ranks span machines, this host's name resolves to a loopback
    address (so gloo's default cannot work) and no interface reaching ``MASTER_ADDR`` can be found.
    """
    if backend != "gloo" or environ.get("GLOO_SOCKET_IFNAME") or world_size <= 1:
        return InterfaceChoice(None)
    pairs = interface_addresses()
    if local_world_size >= world_size:  # every rank on this machine
        return InterfaceChoice(loopback_interface(pairs))
    master = environ.get("MASTER_ADDR", "")
    local, name, why = None, None, ""
    try:
        local = local_address_towards(master)
        name = interface_of(local, pairs)
        if name is None:
            why = f"no interface holds {local}, the address that routes to it"
    except (OSError, UnicodeError, ValueError) as error:
        why = f"cannot route to it: {error}"
    if name is not None and is_loopback(local) and not _is_ip_literal(master):
        # This node hosts the store under a name that is loopback only here; the others reach it elsewhere.
        name = default_route_interface()
        if name is not None:
            return InterfaceChoice(name, f"gloo on {socket.gethostname()}: interface {name} (the default route's; "
                                         f"MASTER_ADDR={master} is a loopback address here); set "
                                         f"GLOO_SOCKET_IFNAME to choose another")
        why = "it is a loopback address here and there is no default route"
    if name is not None:
        return InterfaceChoice(name, f"gloo on {socket.gethostname()}: interface {name} ({local}, the address that "
                                     f"reaches MASTER_ADDR={master}); set GLOO_SOCKET_IFNAME to choose another")
    own = hostname_address()
    if is_loopback(own):
        raise NetworkError(
            f"ranks on several machines, but this host's name {socket.gethostname()!r} resolves to {own} "
            f"(loopback), which the other machines cannot reach, and no interface towards MASTER_ADDR="
            f"{master!r} was found ({why}): set GLOO_SOCKET_IFNAME=<the interface that reaches the other "
            f"nodes> on every node")
    return InterfaceChoice(None, f"gloo on {socket.gethostname()}: no interface towards MASTER_ADDR={master} found ({why}); "
                                 f"using gloo's default, {own} (this host's name)")


def apply_gloo_interface(backend: str, world_size: int, local_world_size: int, local_rank: int,
                         environ: MutableMapping[str, str] = os.environ, say=print) -> Optional[str]:
    """:func:`choose_gloo_interface`, then set ``GLOO_SOCKET_IFNAME`` and say the choice once per node
    (local rank 0). Returns the interface set (``None``: left alone). Call before ``init_process_group``."""
    choice = choose_gloo_interface(backend, world_size, local_world_size, environ)
    if choice.name is not None:
        environ["GLOO_SOCKET_IFNAME"] = choice.name
    if choice.message and local_rank == 0:
        say(choice.message)
    return choice.name
