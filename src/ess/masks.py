"""Token roles -> 4D attention masks. The one place where ESS attention rules live.

Every mask in the project (both training phases, classification, and the decode steps of the
generator, where the query rows are new tokens and the key columns are cache slots) comes from
`attention_allowed`. Non-[CLS] tokens keep plain causal attention among themselves; only the
edges that touch [CLS] follow the phase rules of docs/METHOD.md §3:

| phase    | [CLS] reads                         | who reads [CLS] |
| -------- | ----------------------------------- | --------------- |
| pretrain | every text token (bidirectional)    | nobody          |
| align    | QUERY tokens (or a chosen span)     | RESPONSE tokens |

A packed training row (`ChatEncoder.pack`) holds several sequences: `segments` numbers them from 1,
and segment 0, a prefix they all share (a chat template's system turn), is read by every segment
as if it stood in front of each one. Segments see nothing of each other, so a packed row computes
what its sequences would compute one per row.
"""

from __future__ import annotations

from enum import IntEnum

import torch


class Role(IntEnum):
    CLS = 0
    QUERY = 1
    RESPONSE = 2
    PAD = 3


class Phase:
    PRETRAIN = "pretrain"
    ALIGN = "align"


def attention_allowed(
    query_roles: torch.Tensor,
    key_roles: torch.Tensor,
    phase: str,
    query_slots: torch.Tensor | None = None,
    key_slots: torch.Tensor | None = None,
    cls_reads: torch.Tensor | None = None,
    reads_cls: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean [batch, q, k]: may query row i attend to key column j?

    query_roles [b, q] and key_roles [b, k] are `Role` values; query_slots [q] and key_slots [k]
    are sequence (or cache-slot) indices that define causality (default: 0..q-1 and 0..k-1, the
    training case where queries and keys are the same tokens). `cls_reads` [b, k] or [b, q, k]
    overrides what a [CLS] row reads (the inference spans of strategic attention); [CLS] always
    reads itself. `reads_cls` [b, q, k] overrides which rows read which [CLS] entry (the reference
    decoder keeps several [CLS] versions, each read by the tokens fed while it was current).
    `segments` [b, n] (training, queries and keys the same tokens) confines each token to its own
    segment and the shared prefix, segment 0.
    """
    if phase not in (Phase.PRETRAIN, Phase.ALIGN):
        raise ValueError(f"unknown phase {phase!r}")
    device = query_roles.device
    if query_slots is None:
        query_slots = torch.arange(query_roles.shape[1], device=device)
    if key_slots is None:
        key_slots = torch.arange(key_roles.shape[1], device=device)

    q_cls = (query_roles == Role.CLS)[:, :, None]
    q_pad = (query_roles == Role.PAD)[:, :, None]
    k_cls = (key_roles == Role.CLS)[:, None, :]
    k_text = ((key_roles == Role.QUERY) | (key_roles == Role.RESPONSE))[:, None, :]
    causal = (key_slots[None, :] <= query_slots[:, None])[None]
    same_slot = (key_slots[None, :] == query_slots[:, None])[None]

    text_rows = ~q_cls & ~q_pad
    allowed = text_rows & k_text & causal

    if cls_reads is None:
        cls_reads = k_text[:, 0] if phase == Phase.PRETRAIN else key_roles == Role.QUERY
    if cls_reads.dim() == 2:
        cls_reads = cls_reads[:, None, :]
    allowed |= q_cls & (cls_reads | (k_cls & same_slot))

    if reads_cls is not None:
        allowed |= reads_cls & k_cls
    elif phase == Phase.ALIGN:
        allowed |= (query_roles == Role.RESPONSE)[:, :, None] & k_cls & causal
    if segments is not None:
        allowed &= (segments[:, :, None] == segments[:, None, :]) | (segments == 0)[:, None, :]
    # A padding row attends to itself only, so that softmax never sees an empty row.
    allowed |= q_pad & same_slot
    return allowed


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean [b, q, k] -> additive float [b, 1, q, k] (0 or the dtype's minimum).

    transformers passes a 4D mask through unchanged; the additive float form is what both its
    eager and sdpa attention accept.
    """
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def position_ids(
    roles: torch.Tensor, offset: torch.Tensor | None = None, segments: torch.Tensor | None = None
) -> torch.Tensor:
    """[CLS] and padding get position 0; text tokens count 0, 1, 2, ... in order.

    The text keeps the positions the base model would give it without [CLS] (a project choice:
    with no edge into [CLS] the LM is then exactly the base model, absolute position embeddings
    included). `offset` [b] continues the count for tokens that follow cached ones. With
    `segments` [b, n], each segment counts on from the end of the shared prefix (segment 0).
    """
    is_text = ((roles == Role.QUERY) | (roles == Role.RESPONSE)).long()
    pos = torch.cumsum(is_text, dim=1) - 1
    if segments is not None:
        starts = torch.ones_like(segments, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        # Text before the segment's first token; the count grows along the row, so cummax carries it.
        before = torch.where(starts, pos + 1 - is_text, torch.zeros_like(pos)).cummax(dim=1).values
        prefix = (is_text * (segments == 0)).sum(dim=1, keepdim=True)
        pos = pos - before + torch.where(segments > 0, prefix, torch.zeros_like(pos))
    if offset is not None:
        pos = pos + offset[:, None]
    return torch.where(is_text.bool(), pos, torch.zeros_like(pos))
