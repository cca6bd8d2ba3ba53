"""Messages and the tensors a rank holds while it runs a plan.

`Holdings` packs several tensors into one message and unpacks a received
one into views, keeps the spans of other ranks' travelling tensors that
arrived (queries, keys/values, gradient inputs) and the results this rank
computed for others until they are sent, and hands buffers back to a
`BufferPool` as soon as nothing can read them any more: a buffer that was
sent only after the step that sent it has been waited on, so a send in
flight never sees its data change.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .plan import ALL, Payload, ProblemShape, Span, Transfer

Key = tuple[Payload, int]  # (what, whose)

# Payloads a rank holds until it sends them home (or on), then drops.
RESULTS = (Payload.PARTIAL, Payload.GRAD_PARTIAL, Payload.GRAD_KEY_VALUE)


class BufferPool:
    """Receive and packing buffers reused across steps and calls of equal shapes."""

    def __init__(self) -> None:
        self._free: dict[tuple[tuple[int, ...], torch.dtype, torch.device], list[torch.Tensor]] = {}
        self._problem: object = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        free = self._free.get((tuple(shape), dtype, device))
        return free.pop() if free else torch.empty(shape, dtype=dtype, device=device)

    def give(self, tensor: torch.Tensor) -> None:
        self._free.setdefault((tuple(tensor.shape), tensor.dtype, tensor.device), []).append(tensor)

    def clear(self) -> None:
        self._free.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for free in self._free.values() for t in free)

    def keep_only_for(self, problem: object) -> None:
        """Drop the buffers of earlier problems when the problem changes, so memory stays bounded."""
        if problem != self._problem:
            self._free.clear()
            self._problem = problem


@dataclass
class Piece:
    """A span of one owner's tensors (the sections of one payload) held on this rank."""

    span: Span
    sections: dict[str, torch.Tensor]
    buffer: torch.Tensor | None = None  # the one message tensor behind the sections, if any
    pooled: bool = False                # the buffer came from the pool and goes back to it


class Holdings:
    def __init__(self, pool: BufferPool, shape: ProblemShape, dtype: torch.dtype, acc_dtype: torch.dtype,
                 device: torch.device) -> None:
        self.pool, self.shape, self.dtype, self.acc_dtype, self.device = pool, shape, dtype, acc_dtype, device
        self._pieces: dict[Key, list[Piece]] = {}
        self._in_flight: list[torch.Tensor] = []  # pooled buffers of sends posted this step
        self._sent_results: list[Piece] = []       # results handed to the Comm this step, no longer held
        self._seq_dims = _seq_dims(shape)

    # -- messages --------------------------------------------------------------

    def _dtype_of(self, accumulator: bool) -> torch.dtype:
        return self.acc_dtype if accumulator else self.dtype

    def message_buffer(self, payload: Payload, span: Span) -> torch.Tensor:
        """A pooled tensor to receive (or pack) one message into."""
        sections = self.shape.sections(payload, span)
        if len(sections) == 1:
            return self.pool.take(sections[0].shape, self._dtype_of(sections[0].accumulator), self.device)
        return self.pool.take((self.shape.payload_bytes(payload, span),), torch.uint8, self.device)

    def unpack(self, payload: Payload, span: Span, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        spans = self.shape.section_spans(payload, span)
        if len(spans) == 1:
            return {spans[0][0].name: buffer}
        return {
            section.name: buffer[offset : offset + nbytes].view(self._dtype_of(section.accumulator)).view(section.shape)
            for section, offset, nbytes in spans
        }

    def pack(self, payload: Payload, span: Span, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """One message holding ``tensors``; a single tensor is sent as it is."""
        if len(tensors) == 1:
            (tensor,) = tensors.values()
            return tensor.contiguous()
        buffer = self.message_buffer(payload, span)
        for name, view in self.unpack(payload, span, buffer).items():
            view.copy_(tensors[name])
        return buffer

    def outgoing(self, t: Transfer) -> torch.Tensor:
        """The message tensor of transfer ``t``, which this rank sends."""
        key = (t.payload, t.owner)
        piece = self._piece(key, t.span, exact=t.payload in RESULTS and t.payload is not Payload.GRAD_KEY_VALUE)
        if t.payload in RESULTS:
            # A result leaves as it is now: a block of this same step for the same rows starts a new one.
            self._pieces[key].remove(piece)
            self._sent_results.append(piece)
        if piece.span == t.span and piece.buffer is not None:
            return piece.buffer  # already one packed message
        message = self.pack(t.payload, t.span, self._narrowed(t.payload, piece, t.span))
        if len(piece.sections) > 1:
            self._in_flight.append(message)
        return message

    def send_packed(self, payload: Payload, span: Span, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """A message packed from tensors this rank does not hold as pieces (its accumulator), freed after the wait."""
        message = self.pack(payload, span, tensors)
        if len(tensors) > 1:
            self._in_flight.append(message)
        return message

    def step_waited(self) -> None:
        """The step's sends are complete: their packing buffers and the results they carried are free."""
        for buffer in self._in_flight:
            self.pool.give(buffer)
        self._in_flight.clear()
        for piece in self._sent_results:
            self._give_back(piece)
        self._sent_results.clear()

    # -- what this rank holds ---------------------------------------------------

    def hold(self, payload: Payload, owner: int, span: Span, sections: dict[str, torch.Tensor],
             buffer: torch.Tensor | None = None, pooled: bool = False) -> None:
        self._drop((payload, owner), span)
        self._pieces.setdefault((payload, owner), []).append(Piece(span, sections, buffer, pooled))

    def hold_message(self, payload: Payload, owner: int, span: Span, buffer: torch.Tensor) -> None:
        """Keep a received (or locally packed) pooled message."""
        self.hold(payload, owner, span, self.unpack(payload, span, buffer), buffer, pooled=True)

    def get(self, payload: Payload, owner: int, span: Span) -> dict[str, torch.Tensor]:
        """The sections of ``span`` of ``owner``'s ``payload``, narrowed from a held piece that contains it."""
        return self._narrowed(payload, self._piece((payload, owner), span), span)

    def result(self, payload: Payload, owner: int, span: Span) -> dict[str, torch.Tensor] | None:
        """The held result for exactly ``span`` of ``owner``, or None."""
        for piece in self._pieces.get((payload, owner), ()):
            if piece.span == span:
                return piece.sections
        return None

    def holds(self, payload: Payload, owner: int) -> bool:
        return bool(self._pieces.get((payload, owner)))

    def release(self, key: Key) -> None:
        for piece in self._pieces.pop(key, ()):
            self._give_back(piece)

    def release_all(self, failed: bool = False) -> None:
        """Drop everything at the end of a pass. After a failure a send may still be reading any
        buffer, so none goes back to the pool and the pool starts afresh."""
        if failed:
            self._pieces.clear()
            self._in_flight.clear()
            self._sent_results.clear()
            self.pool.clear()
            return
        for key in list(self._pieces):
            self.release(key)
        self.step_waited()

    def _piece(self, key: Key, span: Span, exact: bool = False) -> Piece:
        for piece in self._pieces.get(key, ()):
            if piece.span == span or (not exact and piece.span.contains(span)):
                return piece
        held = ", ".join(str(p.span) for p in self._pieces.get(key, ())) or "nothing"
        raise RuntimeError(f"plan error: needs {key[0].value}[{key[1]}].{span} but holds {held}")

    def _narrowed(self, payload: Payload, piece: Piece, span: Span) -> dict[str, torch.Tensor]:
        if piece.span == span:
            return piece.sections
        inner = span.within(piece.span)
        dims = self._seq_dims[payload]
        narrowed = {}
        for name, tensor in piece.sections.items():
            offset, count = inner.rows(tensor.shape[dims[name]])
            narrowed[name] = tensor.narrow(dims[name], offset, count)
        return narrowed

    def _drop(self, key: Key, span: Span) -> None:
        pieces = self._pieces.get(key)
        if not pieces:
            return
        for piece in [p for p in pieces if p.span == span]:
            pieces.remove(piece)
            self._give_back(piece)

    def _give_back(self, piece: Piece) -> None:
        if piece.pooled and piece.buffer is not None:
            self.pool.give(piece.buffer)


@functools.lru_cache(maxsize=64)
def _seq_dims(shape: ProblemShape) -> dict[Payload, dict[str, int]]:
    """The sequence dimension of each section of each payload (read-only: shared by every call of ``shape``)."""
    return {payload: {s.name: s.seq_dim for s in shape.sections(payload, ALL)} for payload in Payload}


def narrow(tensor: torch.Tensor, span: Span, seq_dim: int) -> torch.Tensor:
    """``span`` of a whole shard ``tensor`` (sequence along ``seq_dim``)."""
    offset, count = span.rows(tensor.shape[seq_dim])
    return tensor if count == tensor.shape[seq_dim] else tensor.narrow(seq_dim, offset, count)
