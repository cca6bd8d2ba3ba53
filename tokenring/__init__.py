"""TokenRing: exact sequence-parallel attention where keys and values stay put.

Public surface: `token_ring_attn`, `shard`/`unshard`, the backend interfaces,
the plan model and the schedules, and the error types. Everything else is private.
"""

from .hookspecs import hookimpl, hookspec
from .interfaces import (
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
from .layout import Layout, shard, unshard
from .plan import Plan, ProblemShape, Schedule, Span
from .plans import build_plan, schedule_names
from .api import last_choice, token_ring_attn
from .traffic import record_traffic
from .reference import reference_attention
from .registry import registry
from . import nn, sequence  # noqa: E402  (drop-in module and batch helpers: tokenring.nn, tokenring.sequence)

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
