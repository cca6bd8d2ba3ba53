"""What ``group=`` may be: a process group, None (the world), or a `DeviceMesh`.

Every public entry point that takes ``group`` (`tokenring.token_ring_attn`,
`tokenring.nn.TokenRingAttention` and `tokenring.nn.token_ring_attention`,
the `tokenring.sequence` helpers) passes it through `resolve_group` first, so
each of them accepts:

* ``None``: the default (world) group;
* a ``torch.distributed`` ProcessGroup: used as it is;
* a 1-D ``torch.distributed.device_mesh.DeviceMesh``: its only group,
  whatever the dimension is called (``mesh["cp"]`` of a larger mesh is one);
* a mesh of two or more dimensions with exactly one dimension named
  ``"cp"`` or ``"context_parallel"`` (`CONTEXT_PARALLEL_DIM_NAMES`): the
  group along that dimension, the ranks that share one sequence. The other
  dimensions (data parallel, say) are the caller's business.

Any other mesh (no such dimension, both names, no names at all) raises
`tokenring.InputError` naming the argument and listing the mesh's dimension
names. The mesh's device type is not checked: a mesh made with
``init_device_mesh("cpu", ...)`` over gloo serves the CPU backend.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch.distributed as dist

from tokenring.interfaces import InputError

__all__ = ["CONTEXT_PARALLEL_DIM_NAMES", "resolve_group"]

# The names a mesh dimension may carry to be the one TokenRing shards the sequence over.
CONTEXT_PARALLEL_DIM_NAMES = ("cp", "context_parallel")

# id(mesh) -> (weak reference to the mesh, its context-parallel group). Keyed by
# identity, not by DeviceMesh.__eq__: two meshes equal in shape and names
# made by separate init_device_mesh calls hold different process groups.
_resolved: dict[int, tuple[weakref.ref, Any]] = {}
_resolved_lock = threading.Lock()


def _mesh_class() -> type | None:
    if not dist.is_available():
        return None
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh


def resolve_group(group: Any) -> Any:
    """The process group ``group`` stands for: None (the world group) or a ProcessGroup.

    ``group`` may be None, a ProcessGroup (both returned unchanged), or a
    `DeviceMesh`: a 1-D mesh gives its only group; a larger mesh gives the
    group along its one dimension named ``"cp"`` or ``"context_parallel"``.
    Anything else is returned unchanged for the caller to judge. The group of
    a mesh is worked out once per mesh object and remembered.

    Raises `tokenring.InputError` (naming argument 'group' and the mesh's
    dimension names) when a mesh has no such dimension or more than one,
    when this rank is not part of the mesh, or when the mesh has no process
    groups.
    """
    if group is None:
        return None
    mesh_class = _mesh_class()
    if mesh_class is None or not isinstance(group, mesh_class):
        return group
    key = id(group)
    with _resolved_lock:
        hit = _resolved.get(key)
        if hit is not None and hit[0]() is group:
            return hit[1]
    resolved = _group_of_mesh(group)
    with _resolved_lock:
        _resolved[key] = (weakref.ref(group, lambda _, key=key: _forget(key)), resolved)
    return resolved


def _forget(key: int) -> None:
    with _resolved_lock:
        entry = _resolved.get(key)
        if entry is not None and entry[0]() is None:
            del _resolved[key]


def _describe(mesh: Any) -> str:
    names = mesh.mesh_dim_names
    listed = ", ".join(repr(n) for n in names) if names else "none"
    return f"a {mesh.ndim}-D DeviceMesh of shape {tuple(mesh.shape)} (dimension names: {listed})"


def _group_of_mesh(mesh: Any) -> Any:
    if mesh.ndim == 1:
        dim = 0
    else:
        names = tuple(mesh.mesh_dim_names or ())
        matches = [i for i, name in enumerate(names) if name in CONTEXT_PARALLEL_DIM_NAMES]
        wanted = " or ".join(repr(n) for n in CONTEXT_PARALLEL_DIM_NAMES)
        if not matches:
            raise InputError(
                f"argument 'group': {_describe(mesh)} has no context-parallel dimension; name the dimension "
                f"that shards the sequence {wanted} (init_device_mesh(..., mesh_dim_names=...)), or pass "
                f"the 1-D sub-mesh of that dimension, mesh[name]"
            )
        if len(matches) > 1:
            raise InputError(
                f"argument 'group': {_describe(mesh)} is ambiguous: more than one dimension is named {wanted}; "
                f"name exactly one, or pass the 1-D sub-mesh of the one to use, mesh[name]"
            )
        dim = matches[0]
    if mesh.get_coordinate() is None:
        raise InputError(
            f"argument 'group': this rank (global rank {dist.get_rank()}) is not part of {_describe(mesh)}"
        )
    try:
        return mesh.get_group(dim)
    except RuntimeError as error:
        raise InputError(f"argument 'group': {_describe(mesh)}: {error}") from error
