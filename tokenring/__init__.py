"""TokenRing: exact sequence-parallel attention where keys and values stay put.

Public surface: `token_ring_attn`, `shard`/`unshard`, the backend interfaces,
the plan model and the schedules, and the error types. Everything else is private.
"""

from tokenring.hookspecs import hookimpl, hookspec
from tokenring.interfaces import (
    AttentionKernel,
    Backend,
    BackendError,
    Capabilities,
    Channel,
    Comm,
    CommTimeout,
    Handle,
    InputError,
    LinkTraffic,
    Mask,
    Probe,
    Recv,
    Send,
    TokenRingError,
)
from tokenring.placement.layout import Layout, shard, unshard
from tokenring.plan.model import Plan, ProblemShape, Schedule, Span
from tokenring.schedules.build import build_plan, schedule_names
from tokenring.api import last_choice, token_ring_attn
from tokenring.plan.traffic import record_traffic
from tokenring.reference import reference_attention
from tokenring.registry import registry
from tokenring import nn, sequence  # noqa: E402  (drop-in module and batch helpers: tokenring.nn, tokenring.sequence)

__version__ = "0.1.0"

__all__ = [
    "last_choice",
    "AttentionKernel",
    "Backend",
    "BackendError",
    "Capabilities",
    "Channel",
    "Comm",
    "CommTimeout",
    "Handle",
    "InputError",
    "Layout",
    "LinkTraffic",
    "Mask",
    "Plan",
    "Probe",
    "ProblemShape",
    "Schedule",
    "Span",
    "Recv",
    "Send",
    "TokenRingError",
    "build_plan",
    "hookimpl",
    "hookspec",
    "nn",
    "record_traffic",
    "reference_attention",
    "registry",
    "schedule_names",
    "sequence",
    "shard",
    "token_ring_attn",
    "unshard",
]
