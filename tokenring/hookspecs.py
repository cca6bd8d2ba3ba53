"""Hook specifications: the extension points of TokenRing.

Plugins are found through the entry-point group ``tokenring.backends``; each
entry point names a module (or object) that implements some of the hooks
below, marked with ``@tokenring.hookimpl``. First-party backends use exactly
this path; first-party schedules implement the same schedule hook from the
modules of `tokenring.schedules`, which are found by scanning that package.
"""

from __future__ import annotations

import pluggy

PROJECT = "tokenring"
ENTRY_POINT_GROUP = "tokenring.backends"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------


@hookspec
def tokenring_register_backends(register):
    """Register the backends this plugin provides.

    Called once per process, the first time TokenRing needs its backends
    (the first `token_ring_attn` call, or ``tokenring backends``).

    :param register: call ``register(backend)`` once per backend, where
        ``backend`` is an instance of `tokenring.Backend`. The host checks
        every registration in one place: a backend whose name is already
        taken, or which lacks a required attribute or method, is refused and
        reported (``tokenring backends`` shows the distribution and the
        reason); the plugin's other registrations still count.

    Return value: ignored. Every plugin's implementation is called.
    """


# ---------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------


@hookspec
def tokenring_register_schedules(register):
    """Register the schedules this plugin provides.

    Called once per process, the first time TokenRing needs its schedules.
    The first-party schedules (each module of `tokenring.schedules` that
    implements this hook) register first, through this same hook.

    :param register: call ``register(schedule)`` once per schedule, where
        ``schedule`` is a `tokenring.Schedule`: a name, a one-line summary and
        ``build(layout, causal, world_size) -> Plan``, the forward plan (the
        backward is derived from it). A name already taken or an invalid
        record is refused and reported (``tokenring plan --list`` shows the
        distribution and the reason); the plugin's other registrations count.
        Every plan a schedule builds is proven by `tokenring.proofs.plancheck` before
        it runs, the first time it is built.

    Return value: ignored. Every plugin's implementation is called.
    """


# ---------------------------------------------------------------------------
# Observation
# ---------------------------------------------------------------------------


@hookspec
def tokenring_timeline(timeline):
    """Receive what this rank did during one pass of one attention call.

    Called on every rank at the end of each forward pass and each backward
    pass that the executor runs, with the events of that pass only. Whether
    any plugin implements this hook is checked once per pass; when none does,
    the executor records no events at all, so an unused hook costs nothing.
    Implementations run inside the attention call: keep them short (append
    to a file or a list) and do not call collectives.

    :param timeline: a `tokenring.runtime.timeline.Timeline`: ``rank``,
        ``world_size``, ``algorithm`` (the schedule's name), ``backward``
        and ``events``, each a `tokenring.runtime.timeline.Event` with ``kind``
        ("post": the step's messages handed to the Comm; "compute": one block
        kernel; "wait": blocked on the step's messages; "merge": results
        folded into accumulators), ``step``, ``start_s`` and ``end_s`` (seconds
        on the host's monotonic clock, shared by the processes of one
        machine) and ``detail`` (a dict, e.g. bytes and peers of a post).

    Return value: ignored. Every plugin's implementation is called.
    """
