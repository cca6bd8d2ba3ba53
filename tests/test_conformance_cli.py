"""`tokenring conformance` and `tokenring backends` against installed plugins, good, broken and wrong."""

from __future__ import annotations

import json

from test_cli import tokenring


def test_conformance_of_the_cpu_backend_passes_and_prints_pytest_summary():
    done = tokenring("conformance", "--backend", "cpu", "--", "-q", "-k", "square-mha-full or every_peer_distance")
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed" in done.stdout and "failed" not in done.stdout


def test_a_backend_with_a_known_defect_fails_its_conformance_run(plugin_path):
    # lse 0 instead of -inf for a row that sees no key: the suite must catch it.
    done = tokenring("conformance", "--backend", "lse-zero", "--", "-q", "-k", "blind_rows")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED" in done.stdout and "lse inf" in done.stdout  # relative error is inf where -inf was due


def test_conformance_of_a_broken_backend_fails_quoting_the_reason(plugin_path):
    done = tokenring("conformance", "--backend", "broken", "--", "-q", "-k", "square-mha-full")
    assert done.returncode != 0
    assert "CANN toolkit not found" in done.stdout + done.stderr


def test_backends_lists_broken_plugins_with_distribution_and_reason(plugin_path):
    done = tokenring("backends", "--json")
    assert done.returncode == 0, done.stderr
    entries = {(e["name"], e["distribution"]): e for e in json.loads(done.stdout)}
    assert entries[("cpu", next(d for n, d in entries if n == "cpu" and d.startswith("tokenring-attn")))]["available"]
    broken = entries[("broken", "broken_plugin 0.1")]
    assert not broken["available"] and "CANN toolkit not found" in broken["reason"]
    table = tokenring("backends")
    broken_rows = [line for line in table.stdout.splitlines() if line.startswith("broken ")]
    assert broken_rows and "broken_plugin 0.1" in broken_rows[0] and "CANN toolkit not found" in broken_rows[0]


def test_selecting_a_broken_backend_in_run_quotes_its_reason(plugin_path):
    done = tokenring("run", "--backend", "broken", "--world-size", "1", "--seq-len", "8", "--repeats", "1")
    assert done.returncode == 2
    assert "CANN toolkit not found" in done.stderr and "Traceback" not in done.stderr
