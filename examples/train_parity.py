"""Training parity: a tiny Llama trained sequence-parallel matches the single-process model at every step.

The model (tokenring.testing.tiny_llama) is built from plain torch modules
with random weights from a fixed seed. The single-process run uses plain
attention on whole sequences; the sequence-parallel run is the same model
with every attention module a tokenring.nn.TokenRingAttention, trained on N
CPU ranks, each holding its shard of every sequence. Its training step
(tokenring.testing.model_tasks.sequence_parallel_training) differs from the
single-process one in these lines only:

    batch = sequence.shard_batch({"input_ids": ids, "labels": ids})   # shift labels, then shard
    logits = model(batch["input_ids"], batch["position_ids"])          # true positions for rotary
    loss = sequence.causal_lm_loss(logits, batch["shift_labels"])     # mean over all ranks' tokens
    loss.backward()
    sequence.all_reduce_gradients(model.parameters())                 # sum replicated parameters' grads

    python examples/train_parity.py                       # world sizes 1, 2, 4; float32
    python examples/train_parity.py --world-sizes 2 3 --steps 8 --dtype float64

Exit status 0 only when, at every step and world size, the loss and the
gradients match the single-process model within tolerance; the last line
states the largest differences seen.
"""

from __future__ import annotations

import argparse
import sys

from tokenring.plans import schedule_names
from tokenring.tools.launch import LocalWorld
from tokenring.testing.model_tasks import TrainingRun, compare_training, reference_training

TOLERANCE = {"float32": (1e-5, 1e-5), "float64": (1e-12, 1e-12)}  # (loss: absolute, gradient: relative to max|g|)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32, help="full sequence; divisible by 2N for zigzag")
    parser.add_argument("--dtype", default="float32", choices=sorted(TOLERANCE))
    parser.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    parser.add_argument("--algorithm", default="tokenring", choices=schedule_names())
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    run = TrainingRun(seed=args.seed, steps=args.steps, batch=args.batch, seq_len=args.seq_len, dtype=args.dtype,
                      layout=args.layout, algorithm=args.algorithm)
    loss_tolerance, grad_tolerance = TOLERANCE[args.dtype]
    reference = reference_training(run)
    print("single-process losses: " + ", ".join(f"{x:.6f}" for x in reference["losses"]))
    reports = []
    for world_size in args.world_sizes:
        with LocalWorld(world_size, tokenring_backend=args.backend, threads_per_rank=1,
                        env={"TOKENRING_BACKEND": args.backend}) as world:
            per_rank = world.run_ok("tokenring.testing.model_tasks.sequence_parallel_training", run)
        report = compare_training(world_size, reference, per_rank)
        reports.append(report)
        verdict = "ok" if report.holds(loss_tolerance, grad_tolerance) else "MISMATCH"
        print(f"N={world_size}: losses " + ", ".join(f"{x:.6f}" for x in per_rank[0]["losses"])
              + f"; max |loss diff| {report.max_loss_diff:.2e}, max grad diff {report.max_grad_diff:.2e} [{verdict}]")
    holds = all(r.holds(loss_tolerance, grad_tolerance) for r in reports)
    worst_loss = max(r.max_loss_diff for r in reports)
    worst_grad = max(r.max_grad_diff for r in reports)
    sizes = ", ".join(str(n) for n in args.world_sizes)
    print(f"{'parity holds' if holds else 'parity FAILED'} ({args.dtype}, {args.steps} steps, N = {sizes}): "
          f"largest |loss - single-process loss| = {worst_loss:.3e} (tolerance {loss_tolerance:g}), "
          f"largest gradient difference max|g - g_ref|/max|g_ref| = {worst_grad:.3e} (tolerance {grad_tolerance:g})")
    return 0 if holds else 1


if __name__ == "__main__":
    sys.exit(main())
