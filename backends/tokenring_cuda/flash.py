"""Block attention through flash-attn's private forward and backward functions.

flash-attn's public functions hide the lse we merge by and the backward we
call per block, so the adapter calls ``_flash_attn_forward`` and
``_flash_attn_backward``, whose signatures and return values changed between
releases. Each release family is one `Convention`, chosen once when the
backend loads (`load_flash2`, `load_flash3`) and checked against the
installed function's signature then; the step loop only calls through it.

What the adapter normalises for the kernel contract (`tokenring.interfaces`):
flash-attn marks a row that saw no key with lse = +inf (the contract says
-inf) and reads +inf in the backward as "probability 0"; an empty block is
answered without a kernel call. Its causal mask is already bottom-right
aligned and it handles grouped heads natively, summing dk/dv over each group.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from tokenring.interfaces import AttentionKernel, Mask, PositionMask

from tokenring.kit import lse_for_backward, no_gradients, nothing_seen, unit_stride

# Placeholders for the tensors a call passes positionally, for signature checks.
_TENSORS = ("q", "k", "v")
_BACKWARD_TENSORS = ("dout", "q", "k", "v", "out", "softmax_lse")


@dataclass(frozen=True)
class Convention:
    """How one family of releases spells the call and arranges the results."""

    label: str
    forward_results: int            # how many values the forward returns
    lse_index: int                  # where softmax_lse is among them
    forward_keywords: Callable[[float, bool], dict[str, Any]]
    backward_keywords: Callable[[float, bool], dict[str, Any]]
    grads_positional: bool          # dq, dk, dv follow the six tensors positionally
    backward_returns_grads: bool    # (dq, dk, dv, softmax_d) rather than softmax_d alone

    def check(self, forward: Callable, backward: Callable) -> None:
        """Raise TypeError when the installed functions would not accept our calls."""
        _bind(forward, _TENSORS, self.forward_keywords(1.0, False))
        grads = ("dq", "dk", "dv") if self.grads_positional else ()
        keywords = self.backward_keywords(1.0, False)
        if not self.grads_positional:
            keywords = {**keywords, "dq": None, "dk": None, "dv": None}
        _bind(backward, _BACKWARD_TENSORS + grads, keywords)


def _no_window_tuple(scale: float, causal: bool) -> dict[str, Any]:
    return {"dropout_p": 0.0, "softmax_scale": scale, "causal": causal, "window_size": (-1, -1)}


def _no_window_pair(scale: float, causal: bool) -> dict[str, Any]:
    return {"dropout_p": 0.0, "softmax_scale": scale, "causal": causal, "window_size_left": -1, "window_size_right": -1}


FLASH_2_5 = Convention(
    label="2.5",
    forward_results=8,  # out, q, k, v, out_padded, softmax_lse, S_dmask, rng_state
    lse_index=5,
    forward_keywords=lambda s, c: {**_no_window_tuple(s, c), "alibi_slopes": None, "return_softmax": False},
    backward_keywords=lambda s, c: {
        **_no_window_tuple(s, c), "alibi_slopes": None, "deterministic": False, "rng_state": None,
    },
    grads_positional=True,
    backward_returns_grads=True,
)

FLASH_2_6 = Convention(
    label="2.6",
    forward_results=8,
    lse_index=5,
    forward_keywords=lambda s, c: {
        **_no_window_tuple(s, c), "softcap": 0.0, "alibi_slopes": None, "return_softmax": False,
    },
    backward_keywords=lambda s, c: {
        **_no_window_tuple(s, c), "softcap": 0.0, "alibi_slopes": None, "deterministic": False, "rng_state": None,
    },
    grads_positional=True,
    backward_returns_grads=True,
)

FLASH_2_7 = Convention(  # 2.7 and 2.8: torch custom ops
    label="2.7",
    forward_results=4,  # out_padded, softmax_lse, S_dmask, rng_state
    lse_index=1,
    forward_keywords=lambda s, c: {
        **_no_window_pair(s, c), "softcap": 0.0, "alibi_slopes": None, "return_softmax": False,
    },
    backward_keywords=lambda s, c: {
        **_no_window_pair(s, c), "softcap": 0.0, "alibi_slopes": None, "deterministic": False, "rng_state": None,
    },
    grads_positional=True,
    backward_returns_grads=False,  # fills dq, dk, dv in place, returns softmax_d
)

FLASH_3 = Convention(
    label="3",
    forward_results=4,  # out, softmax_lse, out_accum, softmax_lse_accum
    lse_index=1,
    forward_keywords=lambda s, c: {"softmax_scale": s, "causal": c},
    backward_keywords=lambda s, c: {"softmax_scale": s, "is_causal": c},
    grads_positional=False,  # dq, dk, dv come after the varlen arguments: pass them by name
    backward_returns_grads=False,
)

# FA3's interface is not versioned and renamed the backward's mask flag once.
FLASH_3_CAUSAL_NAMED = Convention(
    label="3",
    forward_results=4,
    lse_index=1,
    forward_keywords=FLASH_3.forward_keywords,
    backward_keywords=lambda s, c: {"softmax_scale": s, "causal": c},
    grads_positional=False,
    backward_returns_grads=False,
)


def convention_for_flash2(version: str) -> Convention:
    """The convention of flash-attn ``version`` (2.5 or newer); ValueError for older or unparsable ones."""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        raise ValueError(f"cannot read flash-attn version {version!r}") from None
    if major != 2 or minor < 5:
        raise ValueError(f"flash-attn {version} is not supported (2.5 to 2.8 are)")
    return {5: FLASH_2_5, 6: FLASH_2_6}.get(minor, FLASH_2_7)


def _signature(fn: Callable) -> inspect.Signature | None:
    # A torch custom op (flash-attn >= 2.7, FA3) keeps the decorated function as _init_fn.
    target = getattr(fn, "_init_fn", fn)
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):
        return None  # a builtin without a signature: the first call will tell


def _bind(fn: Callable, positional: tuple[str, ...], keywords: dict[str, Any]) -> None:
    signature = _signature(fn)
    if signature is not None:
        signature.bind(*positional, **keywords)


@dataclass(frozen=True)
class FlashInterface:
    """The installed forward/backward pair and how to call them."""

    name: str                 # e.g. "flash-attn 2.6.3"
    forward: Callable
    backward: Callable
    convention: Convention

    def __post_init__(self) -> None:
        self.convention.check(self.forward, self.backward)


class FlashKernel(AttentionKernel):
    """fp16/bf16 blocks through flash-attn; causal is bottom-right, grouped heads native.

    Blocks masked from tokens (packed documents, windows, padding) go to
    ``masked`` (by default torch's SDPA efficient attention with an explicit
    mask, `tokenring_cuda.sdpa`): their rows are not one contiguous run of
    positions per document, which flash-attn's varlen convention needs.
    """

    def __init__(self, interface: FlashInterface, masked: AttentionKernel | None = None) -> None:
        self.interface = interface
        self._convention = interface.convention
        self._masked = masked

    def _masked_kernel(self) -> AttentionKernel:
        if self._masked is None:
            from .sdpa import SdpaEfficientKernel

            self._masked = SdpaEfficientKernel()
        return self._masked

    def forward(self, q, k, v, *, scale, mask):
        if isinstance(mask, PositionMask):
            return self._masked_kernel().forward(q, k, v, scale=scale, mask=mask)
        if q.shape[1] == 0 or k.shape[1] == 0:
            return nothing_seen(q, v)
        causal = Mask(mask) is Mask.CAUSAL
        convention = self._convention
        results = self.interface.forward(
            unit_stride(q), unit_stride(k), unit_stride(v), **convention.forward_keywords(scale, causal)
        )
        if len(results) != convention.forward_results:
            raise RuntimeError(
                f"{self.interface.name}: _flash_attn_forward returned {len(results)} values, "
                f"the {convention.label} interface returns {convention.forward_results}"
            )
        out = results[0]
        lse = results[convention.lse_index][..., : q.shape[1]]
        # flash-attn's mark for a row that saw no key is +inf; the contract's is -inf.
        lse = torch.where(torch.isposinf(lse), torch.full_like(lse, float("-inf")), lse)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, *, scale, mask):
        if isinstance(mask, PositionMask):
            return self._masked_kernel().backward(dout, q, k, v, out, lse, scale=scale, mask=mask)
        if q.shape[1] == 0 or k.shape[1] == 0:
            return no_gradients(q, k, v)
        causal = Mask(mask) is Mask.CAUSAL
        convention = self._convention
        q, k, v, out, dout = (unit_stride(x) for x in (q, k, v, out, dout))
        dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
        keywords = convention.backward_keywords(scale, causal)
        tensors = (dout, q, k, v, out, lse_for_backward(lse.to(torch.float32)).contiguous())
        if convention.grads_positional:
            results = self.interface.backward(*tensors, dq, dk, dv, **keywords)
        else:
            results = self.interface.backward(*tensors, dq=dq, dk=dk, dv=dv, **keywords)
        if convention.backward_returns_grads:
            dq, dk, dv = results[:3]
        return dq, dk, dv
