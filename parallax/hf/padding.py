"""Padded and packed batches without a dense mask, as FlashAttention's transformers integration does.

transformers describes a batch of unequal sequences with a 2D `attention_mask`
(1: token, 0: padding) and packed sequences with `position_ids` that restart.
Parallax attention takes neither: it is causal by itself. So the tokens are
rearranged instead.

- Without a KV cache (training, scoring), `PackedTokens` gathers the real
  tokens of the batch into one row of sequences, for `parallax_attn(...,
  cu_seqlens=...)`; outputs go back to their places, zeros at padding. A
  sequence starts at every batch row and where `position_ids` mark one:
  without a mask, wherever a position does not continue the previous one
  (transformers' rule for packed sequences); with a mask (where transformers
  looks at positions for RoPE only, so a gap left by padding is no boundary),
  wherever they restart, going back.
- Through a KV cache, `LeftPaddedChunk` moves each row's padding tokens to
  the front of the new chunk (a stable sort); the cache then holds every
  sequence as [padding, tokens], and `cache_leftpad` hides the padding. A row
  can only gain padding before its first token: padding after cached tokens
  raises.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _chunk_mask(attention_mask, batch: int, length: int) -> torch.Tensor | None:
    """The bool [batch, length] part of a 2D mask (over past + new tokens) for the new tokens; None: no padding."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2:
        raise ValueError("Parallax attention takes a 2D attention_mask [batch, seq] of 1 (token) and 0 (padding); "
                         f"got {_describe(attention_mask)}: it cannot apply an arbitrary attention pattern")
    if attention_mask.shape[0] != batch or attention_mask.shape[1] < length:
        raise ValueError(f"attention_mask must be [batch={batch}, at least {length}] (past and new tokens), "
                         f"got {tuple(attention_mask.shape)}")
    return attention_mask[:, -length:].bool()


def _describe(x) -> str:
    return f"a {x.ndim}D tensor" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"


def _sequence_starts(pos: torch.Tensor, masked: bool) -> torch.Tensor:
    """Whether each position after the first (along the last dim) starts a new sequence (see above)."""
    return pos[..., 1:] <= pos[..., :-1] if masked else pos[..., 1:] != pos[..., :-1] + 1


def padding_mask_or_none(attention_mask):
    """What transformers hands the Parallax layers as their attention mask: the 2D padding mask, or
    None when it has no padding (checked on the host except while torch.compile traces)."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2 and not torch.compiler.is_compiling():
        if bool(attention_mask.all()):
            return None
    return attention_mask


@dataclass
class PackedTokens:
    """The real tokens of a [B, T] batch as one row of sequences (FlashAttention's `unpad_input`)."""

    indices: torch.Tensor  # [N] flat indices into B * T
    cu_seqlens: torch.Tensor  # int32 [num_seqs + 1]
    batch: int
    length: int

    @classmethod
    def of(cls, attention_mask, position_ids, batch: int, length: int) -> PackedTokens | None:
        """None when every row is one unpadded sequence (nothing to rearrange)."""
        mask = _chunk_mask(attention_mask, batch, length)
        masked = mask is not None
        if not masked:
            if position_ids is None:
                return None
            packed = _sequence_starts(position_ids, masked=False).any()
            if torch.compiler.is_compiling():
                # Gathering packed sequences has data-dependent shapes: a compiled graph checks on the device.
                torch._assert_async(~packed, "packed sequences (position_ids that restart, no attention_mask) "
                                             "are not supported under torch.compile; run them without it")
                return None
            if not bool(packed):
                return None
            mask = torch.ones(batch, length, dtype=torch.bool, device=position_ids.device)
        indices = mask.reshape(-1).nonzero().squeeze(1)
        row = indices // length
        starts = torch.ones_like(indices, dtype=torch.bool)
        starts[1:] = row[1:] != row[:-1]
        if position_ids is not None:
            pos = position_ids.expand(batch, length).reshape(-1)[indices.to(position_ids.device)].to(indices.device)
            starts[1:] |= _sequence_starts(pos, masked)
        if indices.numel() == batch * length and int(starts.sum()) == batch:
            return None
        total = torch.tensor([indices.numel()], device=indices.device)
        first = starts.nonzero().squeeze(1) if indices.numel() else total  # all padding: one empty sequence
        return cls(indices, torch.cat((first, total)).to(torch.int32), batch, length)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] (or [1, T, ...], broadcast over the batch) -> [1, N, ...]."""
        x = x.expand(self.batch, *x.shape[1:])
        return x.reshape(self.batch * self.length, *x.shape[2:])[self.indices].unsqueeze(0)

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        """[1, N, ...] -> [B, T, ...], zeros at padding."""
        out = y.new_zeros(self.batch * self.length, *y.shape[2:])
        return out.index_copy(0, self.indices, y[0]).view(self.batch, self.length, *y.shape[2:])


@dataclass
class LeftPaddedChunk:
    """New tokens for a KV cache with each row's padding moved to the front of the chunk."""

    pads: torch.Tensor  # int32 [B]: padding tokens per row
    order: torch.Tensor | None  # [B, T]: the chunk's tokens, padding first; None when T == 1

    @classmethod
    def of(cls, attention_mask, batch: int, length: int) -> LeftPaddedChunk | None:
        mask = _chunk_mask(attention_mask, batch, length)
        if mask is None:
            return None
        pads = (length - mask.sum(-1)).to(torch.int32)
        order = None if length == 1 else torch.sort(mask.to(torch.int8), dim=1, stable=True).indices
        return cls(pads, order)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] (or [1, T, ...], broadcast) in the chunk's new order."""
        if self.order is None:
            return x
        x = x.expand(self.order.shape[0], *x.shape[1:])
        index = self.order.view(*self.order.shape, *(1,) * (x.ndim - 2)).expand(x.shape)
        return x.gather(1, index)

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        """Back to the caller's order."""
        if self.order is None:
            return y
        index = self.order.view(*self.order.shape, *(1,) * (y.ndim - 2)).expand(y.shape)
        return torch.empty_like(y).scatter_(1, index, y)


def check_one_sequence_per_row(position_ids, chunk: LeftPaddedChunk | None) -> None:
    """Packed sequences cannot share a KV cache row: the positions of a row's new tokens must not restart."""
    if position_ids is None or position_ids.shape[-1] < 2 or torch.compiler.is_compiling():
        return
    starts = _sequence_starts(position_ids if chunk is None else chunk.pack(position_ids), masked=True)
    if chunk is not None:  # padding (now at the front of each row) has no position to check
        starts &= torch.arange(1, starts.shape[1] + 1, device=starts.device) > chunk.pads[:, None].to(starts.device)
    if bool(starts.any()):
        raise ValueError("position_ids restart inside a row (packed sequences); a KV cache holds one sequence "
                         "per row: pass packed sequences without a cache (use_cache=False)")
