"""Interconnect profiles: what a message between two ranks crosses, and how fast a device computes.

A `Topology` describes one group of devices for the plan simulator
(`tokenring.planner.simulate`): how the devices inside a node connect (``kind``),
how nodes connect, each link's bandwidth and latency, each device's
injection limit, and its attention compute rate. It is pure data; nothing
here measures anything (``tokenring calibrate`` writes profiles, the planner
reads them).

Kinds (inside one node; ``nodes`` > 1 makes it two-level, ``nodes x devices``):

* ``fullmesh``: a link each way between every pair of devices (NVLink / xGMI /
  HCCS meshes); a message crosses the one link of its pair.
* ``switch``: one port per device on a switch, each with ``link`` bandwidth
  per direction (NVSwitch, one PCIe switch); a message crosses its sender's
  port out and its receiver's port in, and the switch itself never blocks.
* ``ring``: a link each way between neighbours r and r+1 only; a message
  takes the shorter way round (ties go r -> r+1) and crosses every link on it.
* two-level: a message inside a node is routed as above; between nodes it
  crosses the sender's NIC out and the receiver's NIC in (``inter_node``
  bandwidth and latency), with one NIC per device (``nic="device"``) or one
  shared by the node (``nic="node"``); the fabric between NICs never blocks.

Rank r is device ``r % devices_per_node`` of node ``r // devices_per_node``.
``injection_bytes_per_s``, when set, caps what one device sends in total
(and, separately, what it receives), whatever links it uses.

Units: bandwidth in bytes per second per direction, latency in seconds,
compute in FLOP per second. The builders (`fullmesh`, `switch`, `ring`,
`two_level`, `parse_topology`) take Gbit/s (``gbps``; 1 Gbit/s = 1.25e8
bytes/s), microseconds and TFLOP/s, as the command line does.

Profiles on disk are JSON (`save_profile`, `load_profile`); the schema is in
docs/planner.md. A bad field raises `ProfileError` naming it. The default
profile is the file named by the environment variable ``TOKENRING_PROFILE``,
else ``$XDG_CONFIG_HOME/tokenring/profile.json`` (``XDG_CONFIG_HOME``
defaulting to ``~/.config``); see `default_profile_path`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROFILE_VERSION = 1
KINDS = ("fullmesh", "switch", "ring")
NIC_KINDS = ("device", "node")
PROFILE_ENV = "TOKENRING_PROFILE"

# A nominal accelerator's attention throughput when nothing better is known:
# about what FlashAttention-2 reaches on an A100 in 16-bit floats.
DEFAULT_TFLOPS = 150.0
# FlashAttention's backward does five matmuls to the forward's two: 2.5x the FLOPs.
BACKWARD_FLOP_RATIO = 2.5


class ProfileError(ValueError):
    """A profile that cannot be used; the message names the bad field."""


def gbps_to_bytes(gbps: float) -> float:
    return gbps * 1e9 / 8


@dataclass(frozen=True)
class Link:
    """One direction of one link, port or NIC."""

    bytes_per_s: float
    latency_s: float = 0.0


@dataclass(frozen=True)
class KernelRate:
    """A measured kernel throughput for blocks of ``q_rows`` x ``kv_rows`` (per head, per batch row)."""

    backward: bool
    q_rows: int
    kv_rows: int
    flop_per_s: float


@dataclass(frozen=True)
class Compute:
    """How fast one device runs the attention kernel.

    ``flop_per_s`` is the forward kernel's attention throughput; the backward
    does ``backward_ratio`` times the forward's FLOPs at the same rate.
    ``kernels``, when given, overrides the rate per block size: the rate for
    a block is interpolated (in log of its score entries) between the measured
    sizes of its pass, and clamped at the ends. ``call_overhead_s`` is added
    per kernel call (launch and merge). ``math.inf`` makes compute free.
    """

    flop_per_s: float = DEFAULT_TFLOPS * 1e12
    backward_ratio: float = BACKWARD_FLOP_RATIO
    call_overhead_s: float = 0.0
    # Host time a rank spends on each message it sends or receives (posting it, completing it, unpacking it),
    # added to the step's compute: the rank cannot compute meanwhile. 0: free (accelerators with copy engines).
    message_overhead_s: float = 0.0
    kernels: tuple[KernelRate, ...] = ()

    def rate(self, backward: bool, q_rows: int, kv_rows: int) -> float:
        """FLOP/s for one block of this size."""
        table = sorted((k.q_rows * k.kv_rows, k.flop_per_s) for k in self.kernels if k.backward == backward)
        if not table:
            return self.flop_per_s
        size = max(1, q_rows * kv_rows)
        if size <= table[0][0]:
            return table[0][1]
        if size >= table[-1][0]:
            return table[-1][1]
        for (size_a, rate_a), (size_b, rate_b) in zip(table, table[1:]):
            if size_a <= size <= size_b:
                if size_a == size_b:
                    return rate_b
                t = (math.log(size) - math.log(size_a)) / (math.log(size_b) - math.log(size_a))
                return rate_a + t * (rate_b - rate_a)
        return table[-1][1]  # unreachable: the table is sorted and size is inside it


@dataclass(frozen=True)
class Resource:
    """Something messages share: one direction of a link, a switch port, a NIC, a device's injection."""

    name: str
    bytes_per_s: float
    latency_s: float


@dataclass(frozen=True)
class Topology:
    kind: str                 # fullmesh | switch | ring: how the devices of one node connect
    devices_per_node: int
    link: Link                # each link (fullmesh, ring) or port (switch) inside a node, per direction
    nodes: int = 1
    inter_node: Link | None = None  # each NIC, per direction; required when nodes > 1
    nic: str = "device"       # between nodes: one NIC per device, or one per node
    injection_bytes_per_s: float | None = None  # all a device sends (and, apart, receives), at most
    compute: Compute = field(default_factory=Compute)
    name: str = ""

    def __post_init__(self) -> None:
        _check_topology(self)

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    def describe(self) -> str:
        """One line: the kind, the sizes, the link speeds and the compute rate."""
        def speed(link: Link) -> str:
            return f"{link.bytes_per_s * 8 / 1e9:g} Gbit/s, {link.latency_s * 1e6:g} us"

        inside = f"{self.kind} of {self.devices_per_node}, {speed(self.link)} per direction"
        text = inside if self.nodes == 1 else (
            f"{self.nodes} nodes x ({inside}); between nodes one NIC per {self.nic}, {speed(self.inter_node)}")
        if self.injection_bytes_per_s is not None:
            text += f"; injection {self.injection_bytes_per_s * 8 / 1e9:g} Gbit/s per device"
        flops = self.compute.flop_per_s
        text += "; compute free" if math.isinf(flops) else f"; compute {flops / 1e12:g} TFLOP/s"
        return (self.name + ": " if self.name else "") + text

    def route(self, src: int, dst: int) -> tuple[Resource, ...]:
        """The resources a message from rank ``src`` to rank ``dst`` crosses, in order."""
        return tuple(Resource(resource_name(key), bw, latency) for key, bw, latency in self.route_keys(src, dst))

    def route_keys(self, src: int, dst: int) -> list[tuple[tuple, float, float]]:
        """`route` as (key, bytes/s, latency) with a tuple key per resource: cheap, for the simulator.

        Keys: ("link", a, b), ("port out", a), ("port in", b), ("nic out", "device"|"node", i),
        ("nic in", ...), ("injection", a), ("ejection", b); `resource_name` spells them.
        """
        n = self.world_size
        if not (0 <= src < n and 0 <= dst < n) or src == dst:
            raise ValueError(f"no route from rank {src} to rank {dst} in a group of {n}")
        injection = self.injection_bytes_per_s
        path: list[tuple[tuple, float, float]] = []
        if injection is not None:
            path.append((("injection", src), injection, 0.0))
        per_node = self.devices_per_node
        node_src, node_dst = src // per_node, dst // per_node
        if node_src == node_dst:
            bw, latency = self.link.bytes_per_s, self.link.latency_s
            if self.kind == "fullmesh":
                path.append((("link", src, dst), bw, latency))
            elif self.kind == "switch":
                path.append((("port out", src), bw, latency))
                path.append((("port in", dst), bw, 0.0))
            else:
                base = node_src * per_node
                a, b = src - base, dst - base
                up = (b - a) % per_node
                direction = 1 if up <= per_node - up else -1
                while a != b:
                    there = (a + direction) % per_node
                    path.append((("link", base + a, base + there), bw, latency))
                    a = there
        else:
            inter = self.inter_node
            assert inter is not None
            out, into = (node_src, node_dst) if self.nic == "node" else (src, dst)
            path.append((("nic out", self.nic, out), inter.bytes_per_s, inter.latency_s))
            path.append((("nic in", self.nic, into), inter.bytes_per_s, 0.0))
        if injection is not None:
            path.append((("ejection", dst), injection, 0.0))
        return path

    def receive_capacity(self, rank: int) -> float:
        """The most bytes per second that can arrive at ``rank``, over every resource a message into it crosses last.

        Every message into a rank crosses one of its incoming links (full mesh:
        N - 1 of them inside the node; ring: its two neighbours'), its switch
        port in, or its NIC in (from another node), and its ejection when there
        is an injection limit: a lower bound on any plan's time is the bytes a
        rank must receive over this (the planner's pruning, `tokenring.planner.choose`).
        """
        return self._capacity()

    def send_capacity(self, rank: int) -> float:
        """The most bytes per second ``rank`` can send, over every resource a message from it crosses first."""
        return self._capacity()

    def _capacity(self) -> float:
        # Symmetric for every kind: the links into a device mirror the links out of it.
        per_node = self.devices_per_node
        if self.kind == "fullmesh":
            inside = (per_node - 1) * self.link.bytes_per_s
        elif self.kind == "switch":
            inside = self.link.bytes_per_s if per_node > 1 else 0.0
        else:
            inside = min(per_node - 1, 2) * self.link.bytes_per_s
        between = self.inter_node.bytes_per_s if self.nodes > 1 and self.inter_node is not None else 0.0
        total = inside + between
        if self.injection_bytes_per_s is not None:
            total = min(total, self.injection_bytes_per_s)
        return total

    def to_json(self) -> dict[str, Any]:
        def link(value: Link) -> dict[str, float]:
            return {"bytes_per_s": value.bytes_per_s, "latency_s": value.latency_s}

        compute = self.compute
        data: dict[str, Any] = {
            "version": PROFILE_VERSION,
            "name": self.name,
            "kind": self.kind,
            "nodes": self.nodes,
            "devices_per_node": self.devices_per_node,
            "link": link(self.link),
            "injection_bytes_per_s": self.injection_bytes_per_s,
            "compute": {
                "flop_per_s": None if math.isinf(compute.flop_per_s) else compute.flop_per_s,
                "backward_ratio": compute.backward_ratio,
                "call_overhead_s": compute.call_overhead_s,
                "message_overhead_s": compute.message_overhead_s,
                "kernels": [
                    {"pass": "backward" if k.backward else "forward", "q_rows": k.q_rows, "kv_rows": k.kv_rows,
                     "flop_per_s": k.flop_per_s}
                    for k in compute.kernels
                ],
            },
        }
        if self.nodes > 1:
            assert self.inter_node is not None
            data["inter_node"] = {**link(self.inter_node), "nic": self.nic}
        return data


def resource_name(key: tuple) -> str:
    """How a resource key of `Topology.route_keys` reads: "link 0->1", "port 3 out", "node 1 nic in"."""
    what = key[0]
    if what == "link":
        return f"link {key[1]}->{key[2]}"
    if what in ("port out", "port in"):
        return f"port {key[1]} {what.split()[1]}"
    if what in ("nic out", "nic in"):
        return f"{key[1]} {key[2]} {what}"
    return f"device {key[1]} {what}"


# -- validation ------------------------------------------------------------------------------------


def _positive(value: Any, where: str, *, allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or (
        math.isinf(value) and not allow_inf) or math.isnan(value):
        raise ProfileError(f"{where} must be a positive finite number, got {value!r}")
    return float(value)


def _non_negative(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < math.inf):
        raise ProfileError(f"{where} must be a finite number >= 0, got {value!r}")
    return float(value)


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ProfileError(f"{where} must be an integer >= 1, got {value!r}")
    return value


def _check_topology(t: Topology) -> None:
    if t.kind not in KINDS:
        raise ProfileError(f"kind must be one of {', '.join(KINDS)}, got {t.kind!r}")
    _count(t.devices_per_node, "devices_per_node")
    _count(t.nodes, "nodes")
    _positive(t.link.bytes_per_s, "link.bytes_per_s")
    _non_negative(t.link.latency_s, "link.latency_s")
    if t.nodes > 1:
        if t.inter_node is None:
            raise ProfileError("inter_node is required when nodes > 1")
        _positive(t.inter_node.bytes_per_s, "inter_node.bytes_per_s")
        _non_negative(t.inter_node.latency_s, "inter_node.latency_s")
    if t.nic not in NIC_KINDS:
        raise ProfileError(f"inter_node.nic must be one of {', '.join(NIC_KINDS)}, got {t.nic!r}")
    if t.injection_bytes_per_s is not None:
        _positive(t.injection_bytes_per_s, "injection_bytes_per_s")
    _positive(t.compute.flop_per_s, "compute.flop_per_s", allow_inf=True)
    _positive(t.compute.backward_ratio, "compute.backward_ratio")
    _non_negative(t.compute.call_overhead_s, "compute.call_overhead_s")
    _non_negative(t.compute.message_overhead_s, "compute.message_overhead_s")
    for i, k in enumerate(t.compute.kernels):
        _count(k.q_rows, f"compute.kernels[{i}].q_rows")
        _count(k.kv_rows, f"compute.kernels[{i}].kv_rows")
        _positive(k.flop_per_s, f"compute.kernels[{i}].flop_per_s")


# -- builders --------------------------------------------------------------------------------------


def _compute(tflops: float | None) -> Compute:
    return Compute(flop_per_s=math.inf if tflops is None else tflops * 1e12)


def _single(kind: str, n: int, gbps: float, latency_us: float, injection_gbps: float | None,
            tflops: float | None, name: str) -> Topology:
    return Topology(
        kind=kind, devices_per_node=n, link=Link(gbps_to_bytes(gbps), latency_us * 1e-6),
        injection_bytes_per_s=None if injection_gbps is None else gbps_to_bytes(injection_gbps),
        compute=_compute(tflops), name=name,
    )


def fullmesh(n: int, gbps: float, latency_us: float = 0.0, *, injection_gbps: float | None = None,
             tflops: float | None = DEFAULT_TFLOPS, name: str = "") -> Topology:
    """``n`` devices with a ``gbps`` link each way between every pair. ``tflops=None``: compute is free."""
    return _single("fullmesh", n, gbps, latency_us, injection_gbps, tflops, name)


def switch(n: int, gbps: float, latency_us: float = 0.0, *, injection_gbps: float | None = None,
           tflops: float | None = DEFAULT_TFLOPS, name: str = "") -> Topology:
    """``n`` devices on one switch, a ``gbps`` port each, per direction."""
    return _single("switch", n, gbps, latency_us, injection_gbps, tflops, name)


def ring(n: int, gbps: float, latency_us: float = 0.0, *, injection_gbps: float | None = None,
         tflops: float | None = DEFAULT_TFLOPS, name: str = "") -> Topology:
    """``n`` devices in a physical ring, a ``gbps`` link each way between neighbours."""
    return _single("ring", n, gbps, latency_us, injection_gbps, tflops, name)


def two_level(nodes: int, devices: int, gbps: float, latency_us: float = 0.0, *, intra: str = "fullmesh",
              nic_gbps: float | None = None, nic_latency_us: float | None = None, nic: str = "device",
              injection_gbps: float | None = None, tflops: float | None = DEFAULT_TFLOPS,
              name: str = "") -> Topology:
    """``nodes`` x ``devices``: inside a node ``intra`` links of ``gbps``; between nodes NICs of ``nic_gbps``.

    The NICs default to the intra-node link's speed and latency.
    """
    return Topology(
        kind=intra, devices_per_node=devices, nodes=nodes, link=Link(gbps_to_bytes(gbps), latency_us * 1e-6),
        inter_node=Link(gbps_to_bytes(gbps if nic_gbps is None else nic_gbps),
                        (latency_us if nic_latency_us is None else nic_latency_us) * 1e-6),
        nic=nic, injection_bytes_per_s=None if injection_gbps is None else gbps_to_bytes(injection_gbps),
        compute=_compute(tflops), name=name,
    )


def parse_topology(spec: str, world_size: int | None, gbps: float, latency_us: float = 0.0, **options) -> Topology:
    """A topology from its command-line name.

    ``fullmesh``, ``switch`` or ``ring`` (``world_size`` devices), or
    ``NODESxDEVICES[:fullmesh|:switch][:device-nic|:node-nic]`` (default
    ``:fullmesh:device-nic``). ``options`` go to the builder (``tflops``,
    ``injection_gbps``, and for two levels ``nic_gbps``, ``nic_latency_us``).
    """
    if spec in KINDS:
        if world_size is None:
            raise ValueError(f"topology {spec!r} needs a world size")
        options = {k: v for k, v in options.items() if k not in ("nic_gbps", "nic_latency_us")}
        return {"fullmesh": fullmesh, "switch": switch, "ring": ring}[spec](world_size, gbps, latency_us, **options)
    head, *rest = spec.split(":")
    try:
        nodes_text, devices_text = head.lower().split("x")
        nodes, devices = int(nodes_text), int(devices_text)
    except ValueError:
        raise ValueError(f"unknown topology {spec!r}; expected fullmesh, switch, ring or NODESxDEVICES"
                         f"[:fullmesh|:switch][:device-nic|:node-nic]") from None
    if nodes < 1 or devices < 1:
        raise ValueError(f"topology {spec!r} needs at least one node and one device per node")
    intra, nic = "fullmesh", "device"
    for part in rest:
        if part in ("fullmesh", "switch"):
            intra = part
        elif part in ("device-nic", "node-nic"):
            nic = part.split("-")[0]
        else:
            raise ValueError(f"unknown option {part!r} in topology {spec!r}; expected fullmesh, switch, "
                             f"device-nic or node-nic")
    if world_size is not None and world_size != nodes * devices:
        raise ValueError(f"topology {spec!r} has {nodes * devices} devices, but the world size is {world_size}")
    return two_level(nodes, devices, gbps, latency_us, intra=intra, nic=nic, **options)


# -- profiles on disk ------------------------------------------------------------------------------


def default_profile_path() -> Path:
    """``$TOKENRING_PROFILE``, else ``$XDG_CONFIG_HOME/tokenring/profile.json`` (``~/.config`` by default)."""
    named = os.environ.get(PROFILE_ENV)
    if named:
        return Path(named).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "tokenring" / "profile.json"


def load_default_profile() -> Topology | None:
    """The profile at `default_profile_path`, or None when there is no file there."""
    path = default_profile_path()
    if not path.exists():
        return None
    return load_profile(path)


def save_profile(topology: Topology, path: "str | os.PathLike[str]") -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(topology.to_json(), indent=2) + "\n")


def load_profile(path: "str | os.PathLike[str]") -> Topology:
    """The profile in a JSON file; `ProfileError` naming the file and the bad field otherwise."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as error:
        raise ProfileError(f"{path}: cannot read the profile: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise ProfileError(f"{path}: not JSON: {error}") from None
    try:
        return profile_from_json(data)
    except ProfileError as error:
        raise ProfileError(f"{path}: {error}") from None


def profile_from_json(data: Any) -> Topology:
    """A `Topology` from the profile schema (docs/planner.md); `ProfileError` naming the bad field."""
    if not isinstance(data, dict):
        raise ProfileError(f"a profile must be a JSON object, got {type(data).__name__}")
    version = data.get("version")
    if version != PROFILE_VERSION:
        raise ProfileError(f"version must be {PROFILE_VERSION}, got {version!r}")
    known = {"version", "name", "kind", "nodes", "devices_per_node", "link", "inter_node", "injection_bytes_per_s",
             "compute", "measured"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ProfileError(f"unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})")
    for required in ("kind", "devices_per_node", "link"):
        if required not in data:
            raise ProfileError(f"{required} is missing")
    name = data.get("name", "")
    if not isinstance(name, str):
        raise ProfileError(f"name must be a string, got {name!r}")
    kind = data["kind"]
    if kind not in KINDS:
        raise ProfileError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    devices = _count(data["devices_per_node"], "devices_per_node")
    nodes = _count(data.get("nodes", 1), "nodes")
    link = _link(data["link"], "link")
    inter, nic = None, "device"
    if "inter_node" in data and data["inter_node"] is not None:
        raw = data["inter_node"]
        inter = _link(raw, "inter_node", extra=("nic",))
        nic = raw.get("nic", "device")
        if nic not in NIC_KINDS:
            raise ProfileError(f"inter_node.nic must be one of {', '.join(NIC_KINDS)}, got {nic!r}")
    elif nodes > 1:
        raise ProfileError("inter_node is required when nodes > 1")
    injection = data.get("injection_bytes_per_s")
    if injection is not None:
        injection = _positive(injection, "injection_bytes_per_s")
    return Topology(kind=kind, devices_per_node=devices, nodes=nodes, link=link, inter_node=inter, nic=nic,
                    injection_bytes_per_s=injection, compute=_compute_from_json(data.get("compute", {})), name=name)


def _link(raw: Any, where: str, extra: tuple[str, ...] = ()) -> Link:
    if not isinstance(raw, dict):
        raise ProfileError(f"{where} must be an object with bytes_per_s and latency_s, got {raw!r}")
    unknown = sorted(set(raw) - {"bytes_per_s", "latency_s", *extra})
    if unknown:
        raise ProfileError(f"unknown field {where}.{unknown[0]}")
    if "bytes_per_s" not in raw:
        raise ProfileError(f"{where}.bytes_per_s is missing")
    return Link(_positive(raw["bytes_per_s"], f"{where}.bytes_per_s"),
                _non_negative(raw.get("latency_s", 0.0), f"{where}.latency_s"))


def _compute_from_json(raw: Any) -> Compute:
    if not isinstance(raw, dict):
        raise ProfileError(f"compute must be an object, got {raw!r}")
    unknown = sorted(set(raw) - {"flop_per_s", "backward_ratio", "call_overhead_s", "message_overhead_s", "kernels"})
    if unknown:
        raise ProfileError(f"unknown field compute.{unknown[0]}")
    flops = raw.get("flop_per_s", DEFAULT_TFLOPS * 1e12)
    flops = math.inf if flops is None else _positive(flops, "compute.flop_per_s")
    kernels = raw.get("kernels", [])
    if not isinstance(kernels, list):
        raise ProfileError(f"compute.kernels must be a list, got {kernels!r}")
    rates = []
    for i, k in enumerate(kernels):
        where = f"compute.kernels[{i}]"
        if not isinstance(k, dict):
            raise ProfileError(f"{where} must be an object, got {k!r}")
        for required in ("pass", "q_rows", "kv_rows", "flop_per_s"):
            if required not in k:
                raise ProfileError(f"{where}.{required} is missing")
        if k["pass"] not in ("forward", "backward"):
            raise ProfileError(f"{where}.pass must be 'forward' or 'backward', got {k['pass']!r}")
        rates.append(KernelRate(k["pass"] == "backward", _count(k["q_rows"], f"{where}.q_rows"),
                                _count(k["kv_rows"], f"{where}.kv_rows"),
                                _positive(k["flop_per_s"], f"{where}.flop_per_s")))
    return Compute(
        flop_per_s=flops,
        backward_ratio=_positive(raw.get("backward_ratio", BACKWARD_FLOP_RATIO), "compute.backward_ratio"),
        call_overhead_s=_non_negative(raw.get("call_overhead_s", 0.0), "compute.call_overhead_s"),
        message_overhead_s=_non_negative(raw.get("message_overhead_s", 0.0), "compute.message_overhead_s"),
        kernels=tuple(rates),
    )
