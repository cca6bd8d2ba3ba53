"""Emulated links: argument checks everywhere; real namespaces only where root and iproute2 are."""

import os
import shutil
import subprocess
import sys

import pytest

from tokenring.tools import netem

needs_root = pytest.mark.skipif(
    os.name != "posix" or os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"),
    reason="network namespaces need root and iproute2",
)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="topology"):
        netem.Network("ring", 2, 1.0)
    with pytest.raises(ValueError, match="world_size"):
        netem.Network("fullmesh", 1, 1.0)
    with pytest.raises(ValueError, match="link_gbps"):
        netem.Network("switch", 2, 0.0)


def test_token_bucket_holds_a_millisecond_and_several_large_packets():
    args = netem._tc_shape(10.0, 0.0, netem=False)
    burst = int(args[args.index("burst") + 1])
    assert args[0] == "tbf" and args[args.index("rate") + 1] == "10000000000bit"
    assert burst >= 10e9 / 8 / 1000 and burst >= 4 * 65536


def _ip(*args):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


@needs_root
def test_fullmesh_routes_each_peer_over_its_own_link_and_tears_down():
    with netem.Network("fullmesh", 3, 1.0) as net:
        names = list(net.namespaces)
        assert set(names) <= set(netem.list_namespaces())
        for i, name in enumerate(names):
            for j in range(3):
                if j != i:
                    route = _ip("-n", name, "route", "get", f"10.213.0.{j + 1}")
                    assert f"dev p{j}" in route
            assert "tbf" in subprocess.run(["tc", "-n", name, "qdisc"], capture_output=True, text=True).stdout
    assert not set(names) & set(netem.list_namespaces())


@needs_root
def test_switch_has_one_shaped_port_per_rank_and_tears_down_after_an_error():
    with pytest.raises(RuntimeError, match="boom"):
        with netem.Network("switch", 2, 1.0) as net:
            names = net.namespaces + net._extra
            ports = _ip("-n", net._extra[0], "link", "show", "master", "br0")
            assert "port0" in ports and "port1" in ports
            assert len(net._shaped) == 4  # both directions of both ports
            raise RuntimeError("boom")
    assert not set(names) & set(netem.list_namespaces())


@needs_root
def test_namespaces_of_a_dead_process_are_removed():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = f"{netem.PREFIX}{dead.pid}r0"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in netem.remove_stale()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    assert name not in netem.list_namespaces()
