"""Worlds the project starts itself listen on loopback only, whatever the hostname resolves to.

Inside a new mount and network namespace, /etc/hosts maps this machine's
hostname to a non-loopback address (on a veth interface): a plain gloo group
then listens on that address (the control), a `LocalWorld` (what the CLI,
bench, conformance runner and tests start) only on 127.0.0.1.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

OUTSIDE = "10.251.0.1"

LISTENERS = textwrap.dedent('''
    import os, socket, struct, sys, tempfile

    def listening():
        found = []
        for line in open("/proc/net/tcp").read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                address, port = fields[1].split(":")
                found.append(f"{socket.inet_ntoa(struct.pack('<I', int(address, 16)))}:{int(port, 16)}")
        return found

    if __name__ == "__main__" and sys.argv[1] == "world":
        from tokenring.testing.problems import Problem
        from tokenring.tools.launch import LocalWorld
        with LocalWorld(2, threads_per_rank=1) as world:
            problem = Problem(0, batch=1, seq_len=16, q_heads=2, kv_heads=2, head_dim=8)
            world.run_ok("tokenring.testing.tasks.call_with", problem, {})
            print("LISTEN", " ".join(listening()))
    elif __name__ == "__main__":
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
        print("LISTEN", " ".join(listening()))
''')

NAMESPACE = textwrap.dedent(f'''
    set -e
    ip link set lo up
    ip link add tr-outside type veth peer name tr-peer
    ip addr add {OUTSIDE}/24 dev tr-outside
    ip link set tr-outside up
    ip link set tr-peer up
    printf '127.0.0.1 localhost\\n{OUTSIDE} %s\\n' "$(hostname)" > "$WORK/hosts"
    mount --bind "$WORK/hosts" /etc/hosts
    exec "$PYTHON" "$WORK/listeners.py" "$1"
''')


def listening_in_namespace(tmp_path, what):
    (tmp_path / "listeners.py").write_text(LISTENERS)
    (tmp_path / "namespace.sh").write_text(NAMESPACE)
    env = {**os.environ, "WORK": str(tmp_path), "PYTHON": sys.executable}
    env.pop("GLOO_SOCKET_IFNAME", None)
    done = subprocess.run(["unshare", "--mount", "--net", "bash", str(tmp_path / "namespace.sh"), what],
                          capture_output=True, text=True, env=env, timeout=180)
    lines = [line for line in done.stdout.splitlines() if line.startswith("LISTEN")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return lines[-1].split()[1:]


@pytest.fixture
def namespaces():
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs root, unshare and ip to make mount and network namespaces")
    probe = subprocess.run(["unshare", "--mount", "--net", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make namespaces here: {probe.stderr.strip()}")


def test_a_local_world_listens_on_loopback_only_where_gloo_would_not(namespaces, tmp_path):
    control = listening_in_namespace(tmp_path, "plain")
    assert any(address.startswith(OUTSIDE + ":") for address in control), (
        f"the control did not reproduce the exposure (gloo listened on {control}); the test proves nothing")
    world = listening_in_namespace(tmp_path, "world")
    assert world and all(address.startswith("127.") for address in world), world
