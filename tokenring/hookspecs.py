"""Hook specifications: the extension points of TokenRing.

Plugins are found through the entry-point group ``tokenring.backends``; each
entry point names a module (or object) that implements some of the hooks
below, marked with ``@tokenring.hookimpl``. First-party backends use exactly
this path.
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
