"""An executable SPECIFICATION of two torch_npu operators, in plain torch. Not hardware.

`npu_fusion_attention` and `npu_fusion_attention_grad` are written here as
their documentation describes them, so that the NPU adapter's translation
(layouts, masks, lse recovery, backward arguments) can be tested on any CPU.
Passing tests against this module shows the adapter agrees with our reading of
the documentation; it does not show that the Ascend kernels behave the same.
docs/ascend.md keeps the table of what has been checked on real hardware.

Sources (read for these facts; nothing is copied):

* Ascend/op-plugin ``docs/context/torch_npu-npu_fusion_attention.md``:
  signature, 7 outputs (attention_out; softmax_max and softmax_sum, float32;
  a reserved tensor; seed, offset, numels), dtypes float16/bfloat16/float32,
  layouts BSH/SBH/BSND/BNSD/TND, Dq = Dk >= Dv with D in 1..768, Nq in 1..256
  and Nq a multiple of Nkv, atten_mask True = "does not take part", sparse
  modes 0-8, modes 2/3/4 taking the compressed 2048x2048 upper-triangular
  mask, mode 3 = rightDownCausal (aligned to the bottom-right corner).
  Older documentation (CANN 7.0.0) lists only float16/bfloat16; MindSpeed's
  copy of the constraints gives D in 1..512.
* Ascend ops-transformer ``aclnnFlashAttentionScoreGrad.md``: the backward's
  softmaxMax/softmaxSum are "the forward's intermediate outputs", float32,
  shape fixed at [B, N, Sq, 8]; dq/dk/dv have the layouts and dtypes of
  query/key/value (so dk/dv have Nkv heads: summed over each query group).
* How the statistics are used: Ascend/pytorch
  ``test/distributed/tensor/test_attention_ops.py`` feeds the grad a row max
  of the scaled scores and the row sum of exp(scores - max), broadcast to
  [..., 8]; MindSpeed's ring attention feeds it (max, sum) pairs merged across
  blocks. Both only work if the backward forms P = exp(S - max) / sum, which
  is what this specification does. It follows that any pair with
  max + log(sum) = lse gives the same P.

What the documentation leaves open, and what this specification does there:

* A query row with no visible key (e.g. sparse_mode 3 with Sq > Skv): the
  docs only say "invalid rows" get special handling. Here such a row's
  attention_out and softmax_max are NaN, so an adapter that relies on them
  fails its tests instead of passing by luck.
* Which of the 8 replicated softmax columns the backward reads: here all 8
  must be equal, or the call is refused.
* Dropout (keep_prob < 1), pse, prefix, varlen (TND) and sparse modes other
  than 0-3 are outside what TokenRing uses: refused with NotImplementedError.
"""

from __future__ import annotations

import torch

SOFTMAX_STAT_COLUMNS = 8          # softmax_max / softmax_sum are [B, N, Sq, 8]
COMPRESSED_MASK_SIZE = 2048       # sparse modes 2, 3, 4 take a 2048x2048 mask
MAX_QUERY_HEADS = 256
MAX_HEAD_DIM = 768
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT_MAX = 2147483647


class SpecificationError(ValueError):
    """The call breaks a documented constraint of the operator."""


# -- layouts ------------------------------------------------------------------


def _to_bnsd(x: torch.Tensor, layout: str, heads: int | None, name: str) -> torch.Tensor:
    """The tensor as (B, N, S, D); ``heads`` is needed to split H = N*D."""
    if x.dim() != (3 if layout in ("BSH", "SBH") else 4):
        raise SpecificationError(f"{name}: layout {layout} needs {3 if layout in ('BSH', 'SBH') else 4} dims, got {x.dim()}")
    if layout == "BSND":
        return x.permute(0, 2, 1, 3)
    if layout == "BNSD":
        return x
    if layout in ("BSH", "SBH"):
        if layout == "SBH":
            x = x.transpose(0, 1)
        batch, seq, hidden = x.shape
        if heads is None or heads <= 0 or hidden % heads:
            raise SpecificationError(f"{name}: hidden size {hidden} is not a multiple of the head count {heads}")
        return x.reshape(batch, seq, heads, hidden // heads).permute(0, 2, 1, 3)
    if layout == "TND":
        raise NotImplementedError("specification: the varlen TND layout is not specified here")
    raise SpecificationError(f"input_layout must be one of BSH, SBH, BSND, BNSD, TND; got {layout!r}")


def _from_bnsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BSND":
        return x.permute(0, 2, 1, 3)
    if layout == "BNSD":
        return x
    batch, heads, seq, dim = x.shape
    x = x.permute(0, 2, 1, 3).reshape(batch, seq, heads * dim)
    return x.transpose(0, 1) if layout == "SBH" else x


def _kv_heads(key: torch.Tensor, query: torch.Tensor, layout: str, head_num: int) -> int:
    """Nkv; in BSH/SBH it follows from H_kv / D with D = H_q / head_num."""
    if layout in ("BSND",):
        return key.shape[2]
    if layout == "BNSD":
        return key.shape[1]
    head_dim = query.shape[-1] // head_num
    if head_dim == 0 or key.shape[-1] % head_dim:
        raise SpecificationError(f"key hidden size {key.shape[-1]} is not a multiple of D = {head_dim}")
    return key.shape[-1] // head_dim


# -- masks --------------------------------------------------------------------


def compressed_causal_mask(device: torch.device | str | None = None) -> torch.Tensor:
    """The 2048x2048 bool mask sparse modes 2, 3 and 4 take: True above the diagonal."""
    ones = torch.ones(COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE, dtype=torch.bool, device=device)
    return torch.triu(ones, diagonal=1)


def _hidden(atten_mask, sparse_mode, pre_tockens, next_tockens, batch, heads, q_len, k_len) -> torch.Tensor | None:
    """Bool (B|1, N|1, Sq, Skv), True where the score is masked out; None: nothing masked."""
    if atten_mask is None:
        # Documented: without atten_mask, sparse_mode and the token limits do not apply.
        return None
    if atten_mask.dtype not in (torch.bool, torch.uint8):
        raise SpecificationError(f"atten_mask must be bool or uint8, got {atten_mask.dtype}")
    mask = atten_mask.to(torch.bool)
    if sparse_mode in (0, 1):
        if mask.dim() == 2:
            mask = mask[None, None]
        if mask.dim() != 4 or mask.shape[-2:] != (q_len, k_len):
            raise SpecificationError(
                f"atten_mask for sparse_mode {sparse_mode} must be SS/11SS/B1SS/BNSS with SS = ({q_len}, {k_len}), "
                f"got {tuple(atten_mask.shape)}"
            )
        if mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, heads):
            raise SpecificationError(f"atten_mask shape {tuple(atten_mask.shape)} does not broadcast to B={batch}, N={heads}")
        if sparse_mode == 0 and (pre_tockens < q_len or next_tockens < k_len):
            # Band limits must agree with the mask; a full-range default is all we specify.
            raise NotImplementedError("specification: sparse_mode 0 with band pre/next_tockens is not specified here")
        return mask
    if sparse_mode in (2, 3):
        if tuple(mask.shape) != (COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE) or not torch.equal(
            mask.cpu(), compressed_causal_mask()
        ):
            raise SpecificationError(
                f"sparse_mode {sparse_mode} needs the compressed 2048x2048 upper-triangular bool mask "
                "(torch.triu(ones(2048, 2048), diagonal=1)), got something else"
            )
        i = torch.arange(q_len, device=mask.device).unsqueeze(1)
        j = torch.arange(k_len, device=mask.device).unsqueeze(0)
        shift = 0 if sparse_mode == 2 else k_len - q_len  # 2: top-left; 3: bottom-right
        return (j > i + shift)[None, None]
    raise NotImplementedError(f"specification: sparse_mode {sparse_mode} is not specified here")


# -- checks shared by both operators -------------------------------------------


def _check_common(query, key, value, head_num, input_layout, keep_prob, pse, padding_mask, prefix,
                  actual_seq_qlen, actual_seq_kvlen):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise SpecificationError(f"{name} must be a tensor")
        if t.dtype not in DTYPES:
            raise SpecificationError(f"{name}: dtype {t.dtype} is not one of float16, bfloat16, float32")
    if not (query.dtype == key.dtype == value.dtype):
        raise SpecificationError("query, key and value must have the same dtype")
    if key.shape != value.shape:
        raise SpecificationError(f"key and value must have the same shape, got {tuple(key.shape)} and {tuple(value.shape)}")
    if keep_prob != 1.0:
        raise NotImplementedError("specification: dropout (keep_prob < 1) is not specified here")
    if pse is not None or padding_mask is not None or prefix is not None:
        raise NotImplementedError("specification: pse, padding_mask and prefix are not specified here")
    if actual_seq_qlen is not None or actual_seq_kvlen is not None:
        raise NotImplementedError("specification: varlen (actual_seq_qlen/kvlen) is not specified here")
    if not isinstance(head_num, int) or not 1 <= head_num <= MAX_QUERY_HEADS:
        raise SpecificationError(f"head_num must be an int in 1..{MAX_QUERY_HEADS}, got {head_num!r}")
    q = _to_bnsd(query, input_layout, head_num, "query")
    kv_heads = _kv_heads(key, query, input_layout, head_num)
    k = _to_bnsd(key, input_layout, kv_heads, "key")
    v = _to_bnsd(value, input_layout, kv_heads, "value")
    batch, heads, q_len, dim = q.shape
    if heads != head_num:
        raise SpecificationError(f"head_num {head_num} differs from the N of query, {heads}")
    if k.shape[0] != batch:
        raise SpecificationError(f"key batch {k.shape[0]} differs from query batch {batch}")
    if k.shape[1] == 0 or heads % k.shape[1]:
        raise SpecificationError(f"Nq / Nkv must be a non-zero integer, got Nq={heads}, Nkv={k.shape[1]}")
    if k.shape[3] != dim or not 1 <= dim <= MAX_HEAD_DIM:
        raise SpecificationError(f"head dims must satisfy Dq == Dk in 1..{MAX_HEAD_DIM}, got Dq={dim}, Dk={k.shape[3]}")
    if v.shape[3] > k.shape[3]:
        raise SpecificationError("Dk >= Dv is required")
    if q_len < 1 or k.shape[2] < 1:
        raise SpecificationError(f"sequence lengths must be >= 1, got Sq={q_len}, Skv={k.shape[2]}")
    return q, k, v


def _scores(q, k, scale, hidden):
    """float64 scores (B, N, Sq, Skv), masked entries -inf; K heads repeated per group."""
    group = q.shape[1] // k.shape[1]
    k64 = k.to(torch.float64).repeat_interleave(group, dim=1)
    scores = torch.einsum("bnqd,bnkd->bnqk", q.to(torch.float64), k64) * scale
    if hidden is not None:
        scores = scores.masked_fill(hidden, float("-inf"))
    return scores


# -- the operators ------------------------------------------------------------


def npu_fusion_attention(
    query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None, scale=1.0,
    keep_prob=1.0, pre_tockens=_INT_MAX, next_tockens=_INT_MAX, inner_precise=0, prefix=None,
    actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False,
):
    """SPECIFICATION of torch_npu.npu_fusion_attention (see the module docstring).

    Returns (attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, numels):
    attention_out in query's layout and dtype; softmax_max and softmax_sum
    float32 (B, N, Sq, 8), the row max of the scaled, masked scores and the row
    sum of exp(score - max), each replicated over the last dimension;
    softmax_out an empty reserved tensor; seed, offset, numels 0 (no dropout).
    """
    q, k, v = _check_common(query, key, value, head_num, input_layout, keep_prob, pse, padding_mask, prefix,
                            actual_seq_qlen, actual_seq_kvlen)
    batch, heads, q_len, _ = q.shape
    hidden = _hidden(atten_mask, sparse_mode, pre_tockens, next_tockens, batch, heads, q_len, k.shape[2])
    scores = _scores(q, k, scale, hidden)
    row_max = scores.amax(dim=-1, keepdim=True)
    blind = torch.isneginf(row_max)  # a row that sees no key: undocumented, poisoned below
    weights = torch.exp(scores - torch.where(blind, torch.zeros_like(row_max), row_max))
    row_sum = weights.sum(dim=-1, keepdim=True)
    group = heads // v.shape[1]
    out = torch.einsum("bnqk,bnkd->bnqd", weights / torch.where(blind, 1.0, row_sum), v.to(torch.float64).repeat_interleave(group, dim=1))
    out = out.masked_fill(blind, float("nan"))
    row_max = row_max.masked_fill(blind, float("nan"))

    def stat(x):
        return x.to(torch.float32).expand(batch, heads, q_len, SOFTMAX_STAT_COLUMNS).contiguous()

    reserved = torch.empty(0, dtype=query.dtype, device=query.device)
    return _from_bnsd(out.to(query.dtype), input_layout), stat(row_max), stat(row_sum), reserved, 0, 0, 0


def npu_fusion_attention_grad(
    query, key, value, dy, head_num, input_layout, *, pse=None, padding_mask=None, atten_mask=None,
    softmax_max=None, softmax_sum=None, softmax_in=None, attention_in=None, scale_value=1.0, keep_prob=1.0,
    pre_tockens=_INT_MAX, next_tockens=_INT_MAX, inner_precise=0, seed=0, offset=0, numels=0, prefix=None,
    actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False,
):
    """SPECIFICATION of torch_npu.npu_fusion_attention_grad (see the module docstring).

    Recomputes P = exp(S - softmax_max) / softmax_sum from the given
    statistics (masked entries 0), then dV = P^T dY, dS = P * (dY V^T - rowsum(dY * attention_in)),
    dQ = scale dS K, dK = scale dS^T Q; dK and dV summed over each query-head
    group. Returns (dq, dk, dv, dpse) in the inputs' layouts and dtypes; dpse is
    an empty tensor (pse is not used).
    """
    q, k, v = _check_common(query, key, value, head_num, input_layout, keep_prob, pse, padding_mask, prefix,
                            actual_seq_qlen, actual_seq_kvlen)
    batch, heads, q_len, _ = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    for name, t in (("dy", dy), ("attention_in", attention_in)):
        if not isinstance(t, torch.Tensor) or t.shape != query.shape or t.dtype != query.dtype:
            raise SpecificationError(f"{name} must be a tensor with query's shape and dtype")
    stats = []
    for name, t in (("softmax_max", softmax_max), ("softmax_sum", softmax_sum)):
        expected = (batch, heads, q_len, SOFTMAX_STAT_COLUMNS)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != expected or t.dtype != torch.float32:
            raise SpecificationError(
                f"{name} must be float32 of shape {list(expected)}, got "
                f"{getattr(t, 'dtype', None)} {list(getattr(t, 'shape', []))}"
            )
        if not torch.equal(t, t[..., :1].expand_as(t)):
            raise SpecificationError(f"{name}: its {SOFTMAX_STAT_COLUMNS} columns must be equal (replicated)")
        stats.append(t[..., :1].to(torch.float64))
    row_max, row_sum = stats
    hidden = _hidden(atten_mask, sparse_mode, pre_tockens, next_tockens, batch, heads, q_len, k_len)
    scores = _scores(q, k, scale_value, hidden)
    probs = torch.exp(scores - row_max) / row_sum
    if hidden is not None:
        probs = probs.masked_fill(hidden, 0.0)
    dy64 = _to_bnsd(dy, input_layout, heads, "dy").to(torch.float64)
    out64 = _to_bnsd(attention_in, input_layout, heads, "attention_in").to(torch.float64)
    k64 = k.to(torch.float64).repeat_interleave(group, dim=1)
    v64 = v.to(torch.float64).repeat_interleave(group, dim=1)
    delta = (dy64 * out64).sum(dim=-1, keepdim=True)
    dprobs = torch.einsum("bnqd,bnkd->bnqk", dy64, v64)
    dscores = probs * (dprobs - delta)
    dq = torch.einsum("bnqk,bnkd->bnqd", dscores, k64) * scale_value
    dk = torch.einsum("bnqk,bnqd->bnkd", dscores, q.to(torch.float64)) * scale_value
    dv = torch.einsum("bnqk,bnqd->bnkd", probs, dy64)
    dk = dk.reshape(batch, kv_heads, group, k_len, -1).sum(2)
    dv = dv.reshape(batch, kv_heads, group, k_len, -1).sum(2)
    dpse = torch.empty(0, dtype=query.dtype, device=query.device)
    return (
        _from_bnsd(dq.to(query.dtype), input_layout),
        _from_bnsd(dk.to(key.dtype), input_layout),
        _from_bnsd(dv.to(value.dtype), input_layout),
        dpse,
    )
