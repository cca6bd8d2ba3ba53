"""Emulated interconnects on one Linux machine: one network namespace per rank.

Loopback on one host has no separate links, so it cannot show what TokenRing
is for (docs/design.md, "Where each schedule wins and why"). Here every rank gets its own network namespace and
traffic between ranks crosses rate-limited veth links:

* ``fullmesh``: one veth pair per pair of ranks, each end rate-limited
  (token bucket) in its own direction, and a host route per peer, so traffic
  to each peer takes its own link, like a direct full mesh (Ascend HCCS
  boards, xGMI, NVLink meshes without a switch).
* ``switch``: one veth "port" per rank into a bridge that lives in a
  namespace of its own; each port is rate-limited in both directions, so
  what limits a rank is its total injection (and reception) bandwidth, like
  NVSwitch or one PCIe switch.

Every address lives inside these namespaces (10.213.0.0/16); the host's own
namespace gets no interface, route or address. `Network.setup` needs root
and iproute2 (``ip``, ``tc``); when either is missing, or the kernel refuses,
it raises `NetworkUnavailable` saying why, and the caller may fall back to
loopback. Teardown deletes the namespaces (which deletes their links) and runs
from ``finally``, ``atexit`` and SIGTERM/SIGHUP, so neither a failed nor an
interrupted run leaves anything behind; namespaces left by a process that
was killed outright are removed by the next setup (their names carry the
creating process id).

Latency: ``--latency-us`` needs the kernel's netem qdisc (sch_netem). Where it
is missing, asking for latency is an error, never silently ignored.

In each rank's process, `enter_namespace` moves the calling thread (and every
thread and socket it creates afterwards) into the rank's namespace; a gloo
group made after that (`new_group`) talks over the emulated links, while the
world group made before keeps using loopback for control traffic.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field

TOPOLOGIES = ("loopback", "fullmesh", "switch")
PREFIX = "trnet"           # namespace names: trnet<pid>r<rank>, trnet<pid>sw
_CLONE_NEWNET = 0x40000000
_NETNS_DIR = "/var/run/netns"


class NetworkUnavailable(RuntimeError):
    """Namespaces or rate limits cannot be made here; the message says why."""


def _rank_address(topology: str, rank: int) -> str:
    return f"10.213.{0 if topology == 'fullmesh' else 1}.{rank + 1}"


def _tc_shape(rate_gbps: float, latency_us: float, netem: bool) -> list[str]:
    """The qdisc arguments that limit one direction of one link."""
    rate_bits = int(rate_gbps * 1e9)
    if netem:
        # netem's own rate and delay; a deep queue so that TCP is not made to drop.
        return ["netem", "delay", f"{latency_us}us", "rate", f"{rate_bits}bit", "limit", "100000"]
    # Token bucket: the bucket must hold several maximum-size (GSO) packets and
    # at least a millisecond of traffic, or the link runs below its rate. At low
    # rates the 256 KiB floor is much more than a millisecond (21 ms at
    # 0.1 Gbit/s): a link that was idle passes its first 256 KiB at veth speed.
    burst = max(rate_bits // 8 // 1000, 4 * 65536)
    limit = max(rate_bits // 8 // 20, 4 * burst)  # about 50 ms of queue
    return ["tbf", "rate", f"{rate_bits}bit", "burst", str(burst), "limit", str(limit)]


@dataclass(eq=False)
class Network:
    """The namespaces and links of one run; use as a context manager."""

    topology: str
    world_size: int
    link_gbps: float
    latency_us: float = 0.0
    namespaces: list[str] = field(default_factory=list)   # rank r's namespace is namespaces[r]
    _extra: list[str] = field(default_factory=list)       # the switch's namespace
    _shaped: list[tuple[str, str]] = field(default_factory=list)  # (namespace, device) of each limited link end
    _netem: bool = False

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGIES[1:]:
            raise ValueError(f"topology must be one of {TOPOLOGIES[1:]}, got {self.topology!r}")
        if self.world_size < 2:
            raise ValueError(f"an emulated network needs at least 2 ranks, got world_size={self.world_size}")
        if not self.link_gbps > 0:
            raise ValueError(f"link_gbps must be positive, got {self.link_gbps}")
        if self.latency_us < 0:
            raise ValueError(f"latency_us must be >= 0, got {self.latency_us}")

    # -- lifecycle -------------------------------------------------------------

    def __enter__(self) -> "Network":
        self.setup()
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def setup(self) -> None:
        _check_tools()
        remove_stale()
        _register_cleanup(self)
        tag = f"{PREFIX}{os.getpid()}"
        try:
            self.namespaces = [f"{tag}r{r}" for r in range(self.world_size)]
            for name in self.namespaces:
                _ip("netns", "add", name)
                # IPv6 off: every rank has exactly one address, the one gloo must use.
                # No TCP slow start after idle: the links of an accelerator interconnect
                # do not shrink their window between two steps' messages.
                _ip("netns", "exec", name, "sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6;"
                    " echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6;"
                    " echo 0 > /proc/sys/net/ipv4/tcp_slow_start_after_idle")
                _ip("-n", name, "link", "set", "lo", "up")
            if self.latency_us > 0:
                self._netem = _has_netem(self.namespaces[0])
                if not self._netem:
                    raise NetworkUnavailable(
                        "--latency-us needs the kernel's netem qdisc (sch_netem), which this kernel lacks; "
                        "rerun with --latency-us 0 (rates are limited with tbf, which is present)"
                    )
            if self.topology == "fullmesh":
                self._build_fullmesh()
            else:
                self._build_switch(f"{tag}sw")
        except BaseException:
            self.teardown()
            raise

    def _build_fullmesh(self) -> None:
        n = self.world_size
        for i in range(n):
            for j in range(i + 1, n):
                a, b = self.namespaces[i], self.namespaces[j]
                # p<j> in rank i's namespace is its link to rank j, and the other way round.
                _ip("link", "add", f"p{j}", "netns", a, "type", "veth", "peer", "name", f"p{i}", "netns", b)
        for i, name in enumerate(self.namespaces):
            mine = _rank_address("fullmesh", i)
            for j in range(n):
                if j == i:
                    continue
                # The same /32 on every link end: the rank has one address, whichever link a peer uses.
                _ip("-n", name, "addr", "add", f"{mine}/32", "dev", f"p{j}")
                _ip("-n", name, "link", "set", f"p{j}", "mtu", "9000", "up")
            for j in range(n):
                if j != i:
                    _ip("-n", name, "route", "add", f"{_rank_address('fullmesh', j)}/32", "dev", f"p{j}", "src", mine)
                    self._shape(name, f"p{j}")

    def _build_switch(self, switch_ns: str) -> None:
        _ip("netns", "add", switch_ns)
        self._extra.append(switch_ns)
        _ip("-n", switch_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch_ns, "link", "set", "br0", "mtu", "9000", "up")
        for r, name in enumerate(self.namespaces):
            _ip("link", "add", "eth0", "netns", name, "type", "veth", "peer", "name", f"port{r}", "netns", switch_ns)
            _ip("-n", switch_ns, "link", "set", f"port{r}", "mtu", "9000", "master", "br0", "up")
            _ip("-n", name, "addr", "add", f"{_rank_address('switch', r)}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "mtu", "9000", "up")
            self._shape(name, "eth0")              # what the rank injects
            self._shape(switch_ns, f"port{r}")     # what the rank receives

    def _shape(self, namespace: str, device: str) -> None:
        _tc("-n", namespace, "qdisc", "add", "dev", device, "root", *_tc_shape(self.link_gbps, self.latency_us, self._netem))
        self._shaped.append((namespace, device))

    def set_rate(self, link_gbps: float) -> None:
        """Change every link's rate in place (for sweeps; the ranks keep their connections)."""
        if not link_gbps > 0:
            raise ValueError(f"link_gbps must be positive, got {link_gbps}")
        for namespace, device in self._shaped:
            _tc("-n", namespace, "qdisc", "replace", "dev", device, "root", *_tc_shape(link_gbps, self.latency_us, self._netem))
        self.link_gbps = link_gbps

    def teardown(self) -> None:
        for name in self.namespaces + self._extra:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        self.namespaces, self._extra, self._shaped = [], [], []
        _cleanups.discard(self)

    # -- what each rank needs ---------------------------------------------------

    def rank_settings(self, rank: int) -> dict[str, str]:
        """The namespace and interface rank ``rank`` must use (see `enter_namespace`)."""
        return {
            "namespace": self.namespaces[rank],
            # Any of the rank's links carries its one address; gloo needs one interface name.
            "interface": f"p{1 if rank == 0 else 0}" if self.topology == "fullmesh" else "eth0",
            "address": _rank_address(self.topology, rank),
        }

    def describe(self) -> str:
        delay = f", {self.latency_us:g} us latency" if self.latency_us else ""
        links = (
            f"{self.world_size * (self.world_size - 1) // 2} veth pairs, one per pair of ranks"
            if self.topology == "fullmesh"
            else f"{self.world_size} ports into one bridge"
        )
        return f"{self.topology}: {links}, {self.link_gbps:g} Gbit/s per link direction{delay}"


# -- inside a rank's process -----------------------------------------------------


def enter_namespace(namespace: str, interface: str) -> None:
    """Move the calling thread into ``namespace`` and point gloo at ``interface``.

    Sockets made before keep their namespace; threads and sockets made after
    this call are in the new one. Python 3.11 has no ``os.setns``, hence libc.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    path = os.path.join(_NETNS_DIR, namespace)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into network namespace {namespace!r} failed: {os.strerror(err)}")
    finally:
        os.close(fd)
    os.environ["GLOO_SOCKET_IFNAME"] = interface


# -- helpers -----------------------------------------------------------------------


def _check_tools() -> None:
    if not hasattr(os, "geteuid") or os.name != "posix":
        raise NetworkUnavailable("network namespaces exist only on Linux")
    if os.geteuid() != 0:
        raise NetworkUnavailable("making network namespaces needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise NetworkUnavailable(f"iproute2's {tool!r} is not on PATH")


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise NetworkUnavailable(f"`{' '.join(argv)}` failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def _ip(*args: str) -> str:
    return _run(["ip", *args])


def _tc(*args: str) -> str:
    return _run(["tc", *args])


def _has_netem(namespace: str) -> bool:
    probe = subprocess.run(
        ["tc", "-n", namespace, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1us"],
        capture_output=True, check=False,
    )
    subprocess.run(["tc", "-n", namespace, "qdisc", "del", "dev", "lo", "root"], capture_output=True, check=False)
    return probe.returncode == 0


def list_namespaces() -> list[str]:
    """Namespaces this module made (in any process) that still exist."""
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    names = [line.split()[0] for line in done.stdout.splitlines() if line.strip()]
    return [n for n in names if n.startswith(PREFIX)]


def _owner_pid(name: str) -> int | None:
    digits = name[len(PREFIX):].split("r")[0].split("sw")[0]
    return int(digits) if digits.isdigit() else None


def remove_stale() -> list[str]:
    """Delete namespaces left by processes of this module that no longer run; return their names."""
    removed = []
    for name in list_namespaces():
        pid = _owner_pid(name)
        if pid is None or pid == os.getpid() or os.path.exists(f"/proc/{pid}"):
            continue
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        removed.append(name)
    return removed


_cleanups: set[Network] = set()
_handlers_installed = False


def _cleanup_all() -> None:
    for network in list(_cleanups):
        network.teardown()


def _on_signal(signum, frame) -> None:
    _cleanup_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _register_cleanup(network: Network) -> None:
    global _handlers_installed
    _cleanups.add(network)
    if not _handlers_installed:
        atexit.register(_cleanup_all)
        # SIGINT already arrives as KeyboardInterrupt and unwinds through `finally`.
        for signum in (signal.SIGTERM, signal.SIGHUP):
            try:
                if signal.getsignal(signum) in (signal.SIG_DFL, None):
                    signal.signal(signum, _on_signal)
            except ValueError:  # not the main thread: atexit and finally still apply
                pass
        _handlers_installed = True
