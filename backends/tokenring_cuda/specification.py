"""Executable specifications of the CUDA kernels this backend calls, in plain torch.

Each function here has the exact signature and return convention of one
vendor function (torch's efficient-attention ops, flash-attn's private
``_flash_attn_forward``/``_flash_attn_backward`` in each supported release,
FlashAttention-3's ``flash_attn_interface``), and computes what that function
computes, in float64 on any device. They are stand-ins: the CPU tests run
this backend's adapters against them to check the adapters' *translation*
(argument names, return positions, mask alignment, lse padding, head
grouping, +inf/-inf conventions) numerically; the GPU tests run the real
functions against them to check that the stand-ins tell the truth.

Where a vendor leaves behaviour undefined (a row with no visible key in
torch's op, lse = -inf passed back to flash-attn), the stand-in produces NaN
so that an adapter relying on it fails loudly.

Sources of each fact (read from the projects' public source):

* torch ``aten::_scaled_dot_product_efficient_attention``: (B, H, S, D)
  inputs with equal head counts; ``is_causal`` is ``CausalFromTopLeft``;
  ``log_sumexp`` is (B, H, ceil(Sq / 32) * 32) float32, padded with +inf
  ("to make the backward easier ... avoids a few bound checks"); the
  backward reads that padding. An ``attn_bias`` must be 4-D with the exact
  sizes, its last dimension contiguous, other strides aligned.
* flash-attn's causal mask is aligned to the bottom-right corner (since
  2.1); a row that sees no key gets out 0 and lse = +inf, which the backward
  reads as "probability 0".
* flash-attn 2.5: ``window_size`` tuple, no ``softcap``; forward returns 8
  values, backward returns (dq, dk, dv, softmax_d). 2.6 adds ``softcap``.
  2.7 and 2.8: ``window_size_left``/``window_size_right``, the forward
  returns 4 values, the backward returns softmax_d only and fills dq, dk,
  dv in place.
* FlashAttention-3 (``hopper/flash_attn_interface.py``): keyword-rich
  forward returning (out, softmax_lse, out_accum, softmax_lse_accum);
  backward takes ``is_causal``, fills dq, dk, dv and returns softmax_d.
"""

from __future__ import annotations

import math
import types
from typing import Optional, Sequence

import torch

LSE_PAD = 32          # torch's efficient attention pads log_sumexp's last dim to a multiple of this
BIAS_ALIGNMENT = 16   # elements; the stricter of the op's alignments (torch itself pads masks to 16)
FLASH_DTYPES = (torch.float16, torch.bfloat16)
EFFICIENT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class SpecificationError(RuntimeError):
    """An argument the real function would refuse (or that the specification does not cover)."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SpecificationError(message)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _allowed(q_len: int, k_len: int, causal: bool, bottom_right: bool) -> torch.Tensor | None:
    """Which keys each query row may see, or None for all of them."""
    if not causal:
        return None
    i = torch.arange(q_len).unsqueeze(1)
    j = torch.arange(k_len).unsqueeze(0)
    return j <= i + (k_len - q_len if bottom_right else 0)


def _scores(q, k, scale, allowed, bias=None):
    """(B, H, Sq, Sk) float64 scaled scores of (B, S, H, D) inputs; k/v heads repeated for groups."""
    group = q.shape[2] // k.shape[2]
    k64 = k.to(torch.float64)
    if group > 1:
        k64 = k64.repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(torch.float64), k64) * scale
    if bias is not None:
        s = s + bias.to(torch.float64)
    if allowed is not None:
        s = s.masked_fill(~allowed.to(s.device), float("-inf"))
    return s


def _values(v, group):
    v64 = v.to(torch.float64)
    return v64.repeat_interleave(group, dim=2) if group > 1 else v64


def _grads(dout, q, k, v, out, lse, scale, allowed, bias=None):
    """(dq, dk, dv) in float64 from probabilities exp(score - lse), as every fused backward forms them.

    dk and dv are summed over each group of query heads. lse = +inf gives
    probability 0; lse = -inf over masked scores gives NaN, on purpose.
    """
    group = q.shape[2] // k.shape[2]
    s = _scores(q, k, scale, allowed, bias)
    p = torch.exp(s - lse.to(torch.float64).unsqueeze(-1))
    do = dout.to(torch.float64)
    delta = (do * out.to(torch.float64)).sum(-1).transpose(1, 2)  # (B, H, Sq)
    dp = torch.einsum("bqhd,bkhd->bhqk", do, _values(v, group))
    ds = p * (dp - delta.unsqueeze(-1))
    k64 = k.to(torch.float64).repeat_interleave(group, dim=2) if group > 1 else k.to(torch.float64)
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, k64) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.to(torch.float64)) * scale
    dv = torch.einsum("bhqk,bqhd->bkhd", p, do)
    if group > 1:
        b, sk, hq, d = dk.shape
        dk = dk.reshape(b, sk, hq // group, group, d).sum(3)
        dv = dv.reshape(b, sk, hq // group, group, dv.shape[-1]).sum(3)
    return dq, dk, dv


# -- torch: aten::_scaled_dot_product_efficient_attention ----------------------


def _check_efficient_inputs(query, key, value, attn_bias, dropout_p):
    _require(dropout_p == 0.0, "the specification covers dropout_p = 0 only")
    _require(query.dim() == key.dim() == value.dim() == 4, "query, key and value must be 4-D (B, H, S, D)")
    _require(query.dtype in EFFICIENT_DTYPES, f"efficient attention takes {EFFICIENT_DTYPES}, got {query.dtype}")
    _require(query.dtype == key.dtype == value.dtype, "query, key and value must share a dtype")
    _require(
        query.shape[0] == key.shape[0] == value.shape[0] and query.shape[1] == key.shape[1] == value.shape[1],
        f"batch and head counts must match (no grouped heads): query {tuple(query.shape)}, key {tuple(key.shape)}",
    )
    _require(key.shape[2] == value.shape[2], "key and value must have the same length")
    for name, x in (("query", query), ("key", key), ("value", value)):
        _require(x.stride(-1) == 1, f"{name} must have a contiguous last dimension")
    if attn_bias is not None:
        _check_bias(attn_bias, query.shape[0], query.shape[1], query.shape[2], key.shape[2], query.dtype)


def _check_bias(bias, batch, heads, q_len, k_len, dtype):
    _require(bias.dim() == 4, "attn_bias expected in 4-D (B, H, Sq, Sk) format")
    _require(tuple(bias.shape) == (batch, heads, q_len, k_len), f"attn_bias has shape {tuple(bias.shape)}")
    _require(bias.dtype == dtype, "invalid dtype for bias - should match query's dtype")
    _require(bias.stride(-1) == 1, "attn_bias: last dimension must be contiguous")
    for dim, stride in enumerate(bias.stride()[:3]):
        _require(
            bias.shape[dim] <= 1 or stride % BIAS_ALIGNMENT == 0,
            f"attn_bias is not correctly aligned: stride({dim}) = {stride}",
        )


def efficient_attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_bias: Optional[torch.Tensor],
    compute_log_sumexp: bool,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: Optional[float] = None,
):
    """``aten::_scaled_dot_product_efficient_attention`` -> (output, log_sumexp, philox_seed, philox_offset)."""
    _check_efficient_inputs(query, key, value, attn_bias, dropout_p)
    batch, heads, q_len, head_dim = query.shape
    k_len = key.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    s = _scores(q, k, scale, _allowed(q_len, k_len, is_causal, bottom_right=False), attn_bias)
    lse = torch.logsumexp(s, dim=-1)
    # A row with nothing to see divides 0 by 0 in the kernel: undefined, so NaN here.
    p = torch.exp(s - lse.unsqueeze(-1))
    out = torch.einsum("bhqk,bkhd->bqhd", p, v.to(torch.float64))
    output = out.to(query.dtype).contiguous().transpose(1, 2)  # (B, H, S, D) view of (B, S, H, D) memory
    if compute_log_sumexp:
        log_sumexp = torch.full((batch, heads, _round_up(q_len, LSE_PAD)), math.inf, dtype=torch.float32, device=query.device)
        log_sumexp[..., :q_len] = lse.to(torch.float32)
    else:
        log_sumexp = torch.empty((batch, heads, 0), dtype=torch.float32, device=query.device)
    return output, log_sumexp, torch.empty((), dtype=torch.int64), torch.empty((), dtype=torch.int64)


def efficient_attention_backward(
    grad_out_: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_bias: Optional[torch.Tensor],
    out: torch.Tensor,
    logsumexp: torch.Tensor,
    philox_seed: torch.Tensor,
    philox_offset: torch.Tensor,
    dropout_p: float,
    grad_input_mask: Sequence[bool],
    is_causal: bool = False,
    *,
    scale: Optional[float] = None,
):
    """``aten::_scaled_dot_product_efficient_attention_backward`` -> (grad_q, grad_k, grad_v, grad_bias)."""
    _check_efficient_inputs(query, key, value, attn_bias, dropout_p)
    batch, heads, q_len, head_dim = query.shape
    k_len = key.shape[2]
    _require(logsumexp.dtype == torch.float32, f"logsumexp must be float32, got {logsumexp.dtype}")
    padded = _round_up(q_len, LSE_PAD)
    # The kernel reads lse up to the padding the forward wrote, without bound checks.
    _require(
        logsumexp.dim() == 3 and tuple(logsumexp.shape[:2]) == (batch, heads) and logsumexp.shape[2] >= padded,
        f"logsumexp must be (B, H, >= {padded}) as the forward returns it, got {tuple(logsumexp.shape)}",
    )
    _require(
        bool(torch.all(logsumexp[..., q_len:padded] == math.inf)),
        "logsumexp's padding past Sq must hold +inf, as the forward wrote it",
    )
    scale = head_dim ** -0.5 if scale is None else scale
    q, k, v, o, do = (x.transpose(1, 2) for x in (query, key, value, out, grad_out_))
    allowed = _allowed(q_len, k_len, is_causal, bottom_right=False)
    dq, dk, dv = _grads(do, q, k, v, o, logsumexp[..., :q_len], scale, allowed, attn_bias)
    grads = tuple(g.to(query.dtype).contiguous().transpose(1, 2) for g in (dq, dk, dv))
    _require(not grad_input_mask[3] or attn_bias is not None, "no bias to differentiate")
    return (*grads, None)


# -- flash-attn 2.x -------------------------------------------------------------


def _flash_forward(q, k, v, dropout_p, softmax_scale, causal, window, softcap, alibi_slopes):
    _require(q.dtype in FLASH_DTYPES, f"FlashAttention only supports fp16 and bf16 data type, got {q.dtype}")
    _require(q.dtype == k.dtype == v.dtype, "query, key and value must have the same dtype")
    for name, x in (("q", q), ("k", k), ("v", v)):
        _require(x.stride(-1) == 1, f"{name}: input tensor must have contiguous last dimension")
    _require(q.shape[-1] <= 256, "FlashAttention forward only supports head dimension at most 256")
    _require(q.shape[2] % k.shape[2] == 0, "number of heads in key/value must divide number of heads in query")
    _require(dropout_p == 0.0 and softcap == 0.0 and alibi_slopes is None, "the specification covers plain attention only")
    _require(tuple(window) == (-1, -1), "the specification covers an unlimited window only")
    q_len, k_len = q.shape[1], k.shape[1]
    s = _scores(q, k, softmax_scale, _allowed(q_len, k_len, causal, bottom_right=True))
    lse = torch.logsumexp(s, dim=-1)
    seen = ~torch.isneginf(lse)
    p = torch.exp(s - torch.where(seen, lse, torch.zeros_like(lse)).unsqueeze(-1))
    out = torch.einsum("bhqk,bkhd->bqhd", p, _values(v, q.shape[2] // k.shape[2]))
    # flash-attn: a row that saw no key gets out 0 and lse = +inf.
    softmax_lse = torch.where(seen, lse, torch.full_like(lse, math.inf)).to(torch.float32)
    return out.to(q.dtype).contiguous(), softmax_lse.contiguous()


def _flash_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, window, softcap):
    _require(q.dtype in FLASH_DTYPES, f"FlashAttention only supports fp16 and bf16 data type, got {q.dtype}")
    _require(softmax_lse.dtype == torch.float32 and tuple(softmax_lse.shape) == (q.shape[0], q.shape[2], q.shape[1]),
             f"softmax_lse must be float32 (B, Hq, Sq), got {softmax_lse.dtype} {tuple(softmax_lse.shape)}")
    _require(out.dtype == q.dtype and dout.dtype == q.dtype, "out and dout must have the dtype of q")
    _require(dropout_p == 0.0 and softcap == 0.0 and tuple(window) == (-1, -1), "the specification covers plain attention only")
    for name, given, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        _require(given is None or (given.shape == like.shape and given.stride(-1) == 1), f"{name} has the wrong shape")
    allowed = _allowed(q.shape[1], k.shape[1], causal, bottom_right=True)
    grads = _grads(dout, q, k, v, out, softmax_lse, softmax_scale, allowed)
    filled = []
    for given, grad, like in zip((dq, dk, dv), grads, (q, k, v)):
        target = given if given is not None else torch.empty_like(like)
        target.copy_(grad.to(like.dtype))
        filled.append(target)
    softmax_d = torch.zeros(q.shape[0], q.shape[2], _round_up(q.shape[1], 128), dtype=torch.float32, device=q.device)
    return (*filled, softmax_d)


def _rng_state(q):
    return torch.zeros(2, dtype=torch.int64, device=q.device)


def _empty_dmask(q):
    return torch.empty((0,), dtype=q.dtype, device=q.device)


class flash_2_5:  # noqa: N801 - a stand-in namespace named after the release
    """flash_attn/flash_attn_interface.py of flash-attn 2.5.x."""

    @staticmethod
    def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes, return_softmax):
        out, lse = _flash_forward(q, k, v, dropout_p, softmax_scale, causal, window_size, 0.0, alibi_slopes)
        return out, q, k, v, out, lse, _empty_dmask(q), _rng_state(q)

    @staticmethod
    def _flash_attn_backward(
        dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, window_size,
        alibi_slopes, deterministic, rng_state=None,
    ):
        return _flash_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, window_size, 0.0)


class flash_2_6:  # noqa: N801
    """flash_attn/flash_attn_interface.py of flash-attn 2.6.x: ``softcap`` arrives."""

    @staticmethod
    def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_softmax):
        out, lse = _flash_forward(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes)
        return out, q, k, v, out, lse, _empty_dmask(q), _rng_state(q)

    @staticmethod
    def _flash_attn_backward(
        dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, window_size, softcap,
        alibi_slopes, deterministic, rng_state=None,
    ):
        return _flash_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, window_size, softcap)


class flash_2_7:  # noqa: N801
    """flash_attn/flash_attn_interface.py of flash-attn 2.7.x and 2.8.x (torch custom ops)."""

    @staticmethod
    def _flash_attn_forward(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        dropout_p: float,
        softmax_scale: float,
        causal: bool,
        window_size_left: int,
        window_size_right: int,
        softcap: float,
        alibi_slopes: Optional[torch.Tensor],
        return_softmax: bool,
    ):
        out, lse = _flash_forward(
            q, k, v, dropout_p, softmax_scale, causal, (window_size_left, window_size_right), softcap, alibi_slopes
        )
        return out, lse, _empty_dmask(q), _rng_state(q)

    @staticmethod
    def _flash_attn_backward(
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        softmax_lse: torch.Tensor,
        dq: Optional[torch.Tensor],
        dk: Optional[torch.Tensor],
        dv: Optional[torch.Tensor],
        dropout_p: float,
        softmax_scale: float,
        causal: bool,
        window_size_left: int,
        window_size_right: int,
        softcap: float,
        alibi_slopes: Optional[torch.Tensor],
        deterministic: bool,
        rng_state: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        *_, softmax_d = _flash_backward(
            dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
            (window_size_left, window_size_right), softcap,
        )
        return softmax_d  # dq, dk and dv were filled in place; whatever was None is lost


class flash_3:  # noqa: N801
    """hopper/flash_attn_interface.py of FlashAttention-3 (module ``flash_attn_interface``)."""

    @staticmethod
    def _flash_attn_forward(
        q, k, v, k_new=None, v_new=None, qv=None, out_=None, cu_seqlens_q=None, cu_seqlens_k=None,
        cu_seqlens_k_new=None, seqused_q=None, seqused_k=None, max_seqlen_q=None, max_seqlen_k=None,
        page_table=None, kv_batch_idx=None, leftpad_k=None, rotary_cos=None, rotary_sin=None,
        seqlens_rotary=None, q_descale=None, k_descale=None, v_descale=None, softmax_scale=None,
        causal=False, window_size_left=-1, window_size_right=-1, attention_chunk=0, softcap=0.0,
        rotary_interleaved=True, scheduler_metadata=None, num_splits=1, pack_gqa=None, sm_margin=0,
    ):
        extras = (k_new, v_new, qv, out_, cu_seqlens_q, cu_seqlens_k, cu_seqlens_k_new, seqused_q, seqused_k,
                  page_table, kv_batch_idx, leftpad_k, rotary_cos, rotary_sin, seqlens_rotary,
                  q_descale, k_descale, v_descale)
        _require(all(x is None for x in extras), "the specification covers dense batched inputs only")
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        out, lse = _flash_forward(q, k, v, 0.0, scale, causal, (window_size_left, window_size_right), softcap, None)
        empty = torch.empty((0,), dtype=torch.float32, device=q.device)
        return out, lse, empty, empty

    @staticmethod
    def _flash_attn_backward(
        dout, q, k, v, out, softmax_lse, cu_seqlens_q=None, cu_seqlens_k=None, sequed_q=None, sequed_k=None,
        max_seqlen_q=None, max_seqlen_k=None, dq=None, dk=None, dv=None, softmax_scale=None, is_causal=False,
        window_size_left=-1, window_size_right=-1, softcap=0.0, deterministic=False, sm_margin=0,
    ):
        _require(all(x is None for x in (cu_seqlens_q, cu_seqlens_k, sequed_q, sequed_k)), "dense inputs only")
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        *_, softmax_d = _flash_backward(
            dout, q, k, v, out, softmax_lse, dq, dk, dv, 0.0, scale, is_causal,
            (window_size_left, window_size_right), softcap,
        )
        return softmax_d


FLASH_RELEASES = {"2.5": flash_2_5, "2.6": flash_2_6, "2.7": flash_2_7, "2.8": flash_2_7}


def flash_attn_modules(version: str) -> dict[str, types.ModuleType]:
    """Stand-in ``sys.modules`` entries for flash-attn ``version`` ("2.6.3"), or FA3 for "3"."""
    if version.split(".")[0] == "3":
        interface = types.ModuleType("flash_attn_interface")
        interface._flash_attn_forward = flash_3._flash_attn_forward
        interface._flash_attn_backward = flash_3._flash_attn_backward
        return {"flash_attn_interface": interface}
    # Releases before 2.5 get 2.5's functions: only their version string matters to a loader.
    release = FLASH_RELEASES.get(".".join(version.split(".")[:2]), flash_2_5)
    package = types.ModuleType("flash_attn")
    package.__version__ = version
    package.__path__ = []  # a package, so that its submodule can be imported
    interface = types.ModuleType("flash_attn.flash_attn_interface")
    interface._flash_attn_forward = release._flash_attn_forward
    interface._flash_attn_backward = release._flash_attn_backward
    package.flash_attn_interface = interface
    return {"flash_attn": package, "flash_attn.flash_attn_interface": interface}
