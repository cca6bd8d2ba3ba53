"""State shared by the attention function and `generate`, free of transformers imports."""

from __future__ import annotations

import threading
from typing import Any

# The attention implementations register() made, and their settings (group, backend, algorithm, ...).
registered_settings: dict[str, dict[str, Any]] = {}

# (cache, layer_idx) between a layer's TokenRingCache.update() and its attention call, per thread.
pending = threading.local()


def take_pending(module: Any) -> tuple[Any, int] | None:
    """The `TokenRingCache` whose update() this module's layer just called, and the layer (once)."""
    value = getattr(pending, "value", None)
    if value is None:
        return None
    pending.value = None
    cache, layer = value
    own = getattr(module, "layer_idx", layer)
    if own != layer:
        raise RuntimeError(f"TokenRingCache: layer {layer} updated the cache but layer {own} attends")
    return cache, layer
