"""The runtime: plans lowered into per-rank programs and run; buffers, merging, agreement, timeline, executors."""
