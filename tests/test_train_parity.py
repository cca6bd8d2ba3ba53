"""Training a tiny Llama sequence-parallel gives the single-process losses and gradients at every step."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokenring.testing import model_tasks
from tokenring.testing.model_tasks import TrainingRun

TOLERANCE = {  # (loss: absolute, gradient: max |g - g_ref| / max |g_ref|)
    "float32": (1e-5, 1e-5),
    "float64": (1e-12, 1e-12),
}


def check_parity(worlds, run: TrainingRun, world_size: int) -> model_tasks.ParityReport:
    reference = model_tasks.reference_training(run)
    per_rank = worlds.get(world_size).run_ok("tokenring.testing.model_tasks.sequence_parallel_training", run)
    assert all(len(r["losses"]) == run.steps for r in per_rank)
    return model_tasks.compare_training(world_size, reference, per_rank)


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_losses_and_gradients_match_the_single_process_model_at_every_step(worlds, seed, world_size, dtype):
    run = TrainingRun(seed=seed, steps=4, batch=2, seq_len=32, dtype=dtype)
    report = check_parity(worlds, run, world_size)
    loss_tolerance, grad_tolerance = TOLERANCE[dtype]
    assert report.holds(loss_tolerance, grad_tolerance), f"seed {seed}: {report}"


@pytest.mark.parametrize("layout, algorithm", [("contiguous", "tokenring"), ("zigzag", "ring")])
def test_parity_with_the_other_layout_and_the_ring_baseline(worlds, seed, layout, algorithm):
    run = TrainingRun(seed=seed, steps=2, seq_len=24, layout=layout, algorithm=algorithm)
    report = check_parity(worlds, run, 3)
    assert report.holds(*TOLERANCE["float32"]), f"seed {seed}: {report}"


def test_a_batch_sharded_with_another_layout_than_the_attention_breaks_parity(worlds, seed):
    """The check is sensitive: tokens at the wrong positions change the loss far beyond rounding."""
    run = TrainingRun(seed=seed, steps=1, layout="zigzag", batch_layout="contiguous")
    report = check_parity(worlds, run, 2)
    loss_tolerance, grad_tolerance = TOLERANCE["float32"]
    # A random-init model's predictions are nearly uniform, so its loss moves little; its gradients do.
    assert report.max_loss_diff > 5 * loss_tolerance and report.max_grad_diff > 1000 * grad_tolerance, (
        f"seed {seed}: {report}")


def test_the_example_script_exits_0_and_states_the_largest_differences():
    script = Path(__file__).resolve().parents[1] / "examples" / "train_parity.py"
    done = subprocess.run([sys.executable, str(script), "--world-sizes", "2", "--steps", "2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("parity holds") and "largest |loss - single-process loss|" in last, last


def test_the_sequence_parallel_model_refuses_to_number_a_shard_from_zero():
    from tokenring.testing.tiny_llama import TinyLlamaConfig, build_reference, sequence_parallel_copy

    model = sequence_parallel_copy(build_reference(TinyLlamaConfig(), seed=0))
    with pytest.raises(ValueError, match="argument 'position_ids'"):
        model(torch.zeros(1, 8, dtype=torch.long))  # no positions: a shard's own arange would be wrong
