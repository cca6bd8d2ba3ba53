"""benchmarks/gpu_kernel_bench.py where it cannot measure anything: a clear message, a clean exit."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_kernel_bench.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: ci/gpu runs the benchmark itself")
def test_without_cuda_the_benchmark_says_so_and_exits_cleanly():
    result = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "needs an NVIDIA GPU, nothing was measured" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_bad_head_counts_are_refused_before_anything_runs():
    result = subprocess.run([sys.executable, str(BENCH), "--heads", "6", "--kv-heads", "4"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--heads (6) must be a multiple of --kv-heads (4)" in result.stderr
