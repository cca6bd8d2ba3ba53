"""The README's program and every example run under torchrun, on one node and as two nodes joined by rendezvous.

The README's program is run exactly as the README prints it: the test takes
the code block out of README.md. The two "nodes" are two network namespaces
on this machine (tokenring.tools.netem, the mechanism of
`tokenring bench --network`), each with one address on a private range and
nothing in the host's own namespace; where namespaces cannot be made (not
root, no iproute2) that test is skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tokenring.tools import netem

ROOT = Path(__file__).resolve().parents[1]
SECTION = "### A complete program under torchrun"
TIMEOUT_S = 240           # a hang fails the test; a run takes well under a minute on two idle cores
ERROR_BOUND = 1e-4        # float32 TokenRing against the float64 reference (about 1e-6 seen)


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    lines, fenced = [], False
    for line in text[text.index(SECTION) + len(SECTION):].splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        elif line.startswith("#") and not fenced:   # the next heading; a '#' inside a code block is not one
            break
        lines.append(line)
    return "".join(lines)


def readme_program(tmp_path: Path) -> Path:
    """The README's complete program, written to a file exactly as printed."""
    code = re.search(r"```python\n(.*?)```", readme_section(), re.S)
    assert code, "no python block in the README's torchrun section"
    path = tmp_path / "program.py"
    path.write_text(code.group(1))
    return path


def run_group(argvs: list[list[str]], tmp_path: Path) -> list[tuple[int, str, str]]:
    """Run the commands side by side; (exit status, stdout, stderr) of each. A hang kills them all and fails."""
    procs, files = [], []
    try:
        for i, argv in enumerate(argvs):
            out, err = open(tmp_path / f"out{i}", "w+"), open(tmp_path / f"err{i}", "w+")
            files += [out, err]
            # A session of its own: a timeout ends torchrun and the ranks it started, nothing else.
            procs.append(subprocess.Popen(argv, stdout=out, stderr=err, text=True, cwd=tmp_path,
                                          start_new_session=True))
        deadline = time.monotonic() + TIMEOUT_S
        for proc in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"`{' '.join(proc.args)}` did not finish within {TIMEOUT_S} s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    results = []
    for i, proc in enumerate(procs):
        out, err = files[2 * i], files[2 * i + 1]
        out.seek(0), err.seek(0)
        results.append((proc.returncode, out.read(), err.read()))
        out.close(), err.close()
    return results


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def max_abs_error(stdout: str) -> float:
    found = re.findall(r"^max abs error (\S+)$", stdout, re.M)
    assert len(found) == 1, f"expected rank 0's one line 'max abs error X':\n{stdout}"
    return float(found[0])


# -- one node: torchrun --standalone --nproc-per-node 2 ------------------------------------


def test_the_readme_shows_the_torchrun_command_before_its_program():
    section = readme_section()
    first = re.search(r"```(\w+)\n(.*?)```", section, re.S)
    assert first.group(1) == "bash" and first.group(2).startswith("torchrun --nproc-per-node 2 program.py"), first.group(0)
    assert "mp.spawn" not in section and "init_method=" not in section  # env:// only, no port written in
    assert "--rdzv-backend c10d --rdzv-endpoint HOST:PORT" in section and "--node-rank" in section


def _example(name: str, *args: str) -> list[str]:
    return [str(ROOT / "examples" / name), *args]


# (what to run, a check of rank 0's stdout)
ONE_NODE = {
    "readme-program": (None, lambda out: max_abs_error(out) < ERROR_BOUND),
    "train_parity": (_example("train_parity.py", "--steps", "2"),
                     lambda out: re.search(r"^parity holds \(float32, 2 steps, N = 2\): largest", out, re.M)),
    "long_context_prefill": (_example("long_context_prefill.py", "--seq-len", "4096"),
                             lambda out: re.search(r"^OK: budget .* every one of 2 ranks", out, re.M)
                             and "2 ranks vs 1 process: relative error" in out),
    "generate": (_example("generate.py", "--prompt-len", "96", "--new-tokens", "6"),
                 lambda out: re.search(r"^OK: 2 ranks generated the same tokens as one process", out, re.M)),
}


@pytest.mark.parametrize("name", sorted(ONE_NODE))
def test_runs_under_torchrun_standalone_with_two_processes(tmp_path, name):
    script, check = ONE_NODE[name]
    if script is None:
        script = [str(readme_program(tmp_path))]
    [(code, out, err)] = run_group([torchrun("--standalone", "--nproc-per-node", "2", *script)], tmp_path)
    assert code == 0, f"exit status {code}\n{out}\n{err[-4000:]}"
    assert check(out), f"rank 0's output fails its check:\n{out}"


def test_every_example_is_run_under_torchrun_by_some_test():
    """A new example joins ONE_NODE above, or another test runs it under torch.distributed.run."""
    here = {Path(script[0]).name for script, _ in ONE_NODE.values() if script}
    elsewhere = {path.name for path in (ROOT / "examples").glob("*.py")
                 for test in (ROOT / "tests").glob("test_*.py")
                 if test.name != Path(__file__).name and path.name in (text := test.read_text())
                 and "torch.distributed.run" in text}
    assert sorted(p.name for p in (ROOT / "examples").glob("*.py") if p.name not in here | elsewhere) == []


@pytest.mark.parametrize("name, option", [("train_parity.py", "--world-sizes"), ("long_context_prefill.py", "--world-size")])
def test_under_torchrun_a_world_size_other_than_torchrun_s_is_refused(monkeypatch, capsys, name, option):
    for var, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(var, value)
    spec = importlib.util.spec_from_file_location(f"example_{name[:-3]}", ROOT / "examples" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_:
        module.main([option, "3"])
    assert exit_.value.code == 2 and "under torchrun the world size is torchrun's (2)" in capsys.readouterr().err


# -- two nodes in two network namespaces, joined by torchrun's rendezvous ---------------------

RENDEZVOUS_PORT = 29400   # inside the namespaces, where nothing else listens


def _rx_bytes(namespace: str, interface: str) -> int:
    done = subprocess.run(["ip", "-n", namespace, "-j", "-s", "link", "show", "dev", interface],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)[0]["stats64"]["rx"]["bytes"]


@pytest.mark.parametrize("rendezvous", ["c10d", "static"])
def test_two_nodes_in_two_network_namespaces_run_the_readme_program_on_4_ranks(tmp_path, rendezvous):
    """node i: `torchrun --nnodes 2 --nproc-per-node 2 ...` in namespace i, gloo bound to that namespace's interface."""
    program = readme_program(tmp_path)
    network = netem.Network("switch", 2, link_gbps=10.0)
    try:
        try:
            network.setup()
        except netem.NetworkUnavailable as exc:
            pytest.skip(f"two namespaced nodes cannot be made here: {exc}")
        nodes = [network.rank_settings(i) for i in range(2)]
        host = nodes[0]["address"]
        received = [_rx_bytes(n["namespace"], n["interface"]) for n in nodes]
        argvs = []
        for i, node in enumerate(nodes):
            if rendezvous == "c10d":
                # The README's multi-node command. The namespaces share the host's name, which resolves
                # outside them: each node says its own address, and node 0 that it serves HOST.
                join = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{host}:{RENDEZVOUS_PORT}", "--rdzv-id", "job1",
                        "--local-addr", node["address"], "--rdzv-conf", f"is_host={int(i == 0)}"]
            else:
                join = ["--node-rank", str(i), "--master-addr", host, "--master-port", str(RENDEZVOUS_PORT)]
            argvs.append(["ip", "netns", "exec", node["namespace"], "env", f"GLOO_SOCKET_IFNAME={node['interface']}",
                          *torchrun("--nnodes", "2", "--nproc-per-node", "2", *join, str(program))])
        results = run_group(argvs, tmp_path)
        for i, (code, out, err) in enumerate(results):
            assert code == 0, f"node {i} exited {code}\n{out}\n{err[-4000:]}"
        assert max_abs_error(results[0][1]) < ERROR_BOUND   # global rank 0 is on node 0 (the lower address)
        assert "max abs error" not in results[1][1]
        # The ranks talked over the namespaces' links: each node received at least the other node's
        # two shards of the output (2 ranks x 256 tokens x 8 heads x 64 x 4 bytes), besides the queries.
        for node, before in zip(nodes, received):
            assert _rx_bytes(node["namespace"], node["interface"]) - before > 2 * 256 * 8 * 64 * 4
    finally:
        namespaces = list(network.namespaces)
        network.teardown()
        assert not set(namespaces) & set(netem.list_namespaces())
