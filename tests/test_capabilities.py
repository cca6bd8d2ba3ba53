"""A backend's declared Capabilities are enforced by the core before any work, naming backend and limit."""

import dataclasses

import torch

from tokenring.validation import local_problem
from tokenring_cpu import CpuBackend


class FewHeadsBackend(CpuBackend):
    name = "few-heads"
    capabilities = dataclasses.replace(CpuBackend.capabilities, max_q_heads=4, head_dims=(16, 32))


def problem_of(q_heads, head_dim=16, backend=FewHeadsBackend()):
    q = torch.randn(1, 8, q_heads, head_dim)
    k = torch.randn(1, 8, 1, head_dim)
    return local_problem(q, k, k, causal=False, softmax_scale=None, layout="contiguous", algorithm="tokenring", backend=backend)


def test_more_query_heads_than_the_backend_takes_are_refused():
    assert problem_of(4) is None
    assert problem_of(6) == "argument 'q': backend 'few-heads' supports at most 4 query heads, got 6"


def test_an_undeclared_head_dim_is_refused():
    assert problem_of(2, head_dim=24) == "argument 'q': backend 'few-heads' supports head dims [16, 32], got 24"


def test_capabilities_report_the_query_head_limit():
    assert FewHeadsBackend.capabilities.to_json()["max_q_heads"] == 4
    assert CpuBackend.capabilities.to_json()["max_q_heads"] is None
