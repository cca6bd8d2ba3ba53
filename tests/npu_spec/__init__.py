"""Helpers for the NPU tests that run against the torch_npu specification (not hardware)."""
