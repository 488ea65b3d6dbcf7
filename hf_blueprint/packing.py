"""Padding-free (packed) batches: several sequences end to end in one row, told apart by `position_ids` that restart
at 0 for each (transformers' `DataCollatorWithFlattening` convention), with no attention mask.

Attention stays within each sequence and pooling pools each sequence on its own, so a packed batch gives the
per-sequence results of a padded one without computing on padding.

Shipped as Hub remote code beside modeling_blueprint.py: it may import only torch, transformers and its siblings.
"""

import torch

try:  # internal to transformers: signatures move between minor versions (GUIDE section 2)
    from transformers.masking_utils import find_packed_sequence_indices
except ImportError as error:  # pragma: no cover - depends on the installed transformers
    raise ImportError("hf_blueprint needs transformers>=5.24,<6 (transformers.masking_utils); install it with: "
                      "pip install 'transformers>=5.24,<6'") from error


def find_packed_sequences(
    position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, batch_size: int
) -> torch.Tensor | None:
    """Which packed sequence each token belongs to, (batch, seq) numbered from 0 in each row, or None for an ordinary
    batch. A padding-free batch has no attention mask; only its `position_ids`, restarting at 0 for each sequence,
    tell the sequences apart."""
    if position_ids is None or attention_mask is not None:
        return None
    return find_packed_sequence_indices(position_ids.expand(batch_size, -1))


def number_sequences_across_rows(sequence_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seq) sequence ids numbered from 0 in each row (`find_packed_sequences`) -> flat (batch * seq,) ids in
    reading order: each row continues after the last sequence of the rows above it."""
    sequences_per_row = sequence_ids[:, -1] + 1
    row_offsets = sequences_per_row.cumsum(0) - sequences_per_row
    return (sequence_ids + row_offsets[:, None]).reshape(-1)


class PackedSequences:
    """A padding-free row as attention sees it: its sequences gathered into a padded (sequences, longest) batch.

    Over a packed row of T tokens, attention with a block-diagonal mask costs T^2 per head (with attention dropout
    the T x T probabilities are materialized). Gathered per sequence it costs sequences x longest^2, what a padded
    batch of the same sequences costs, while every other layer still runs on the T real tokens only. The gather and
    the scatter back are index operations: the result is exactly that of the block-diagonal mask."""

    def __init__(self, sequence_ids: torch.Tensor):
        sequence_ids = number_sequences_across_rows(sequence_ids)
        lengths = torch.bincount(sequence_ids)
        starts = lengths.cumsum(0) - lengths
        offsets = torch.arange(int(lengths.max()), device=sequence_ids.device)
        self.is_token = offsets < lengths[:, None]  # (sequences, longest); False on this layout's own padding
        self.token_index = (starts[:, None] + offsets).clamp(max=sequence_ids.numel() - 1)  # the token each slot reads
        self.positions = offsets.expand_as(self.is_token)  # each token's place in its sequence (ALiBi distances)
        self.attention_mask = None  # the padded layout's mask in the attention implementation's format (the model's)

    def pad(self, states: torch.Tensor) -> torch.Tensor:
        """(batch, heads, seq, head_dim) -> (sequences, heads, longest, head_dim)."""
        tokens = states.transpose(1, 2).reshape(-1, *states.shape[1:2], states.shape[-1])
        return tokens[self.token_index].transpose(1, 2)

    def unpad(self, attention_output: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Attention output (sequences, longest, heads, head_dim) -> (batch, seq, heads, head_dim)."""
        return attention_output[self.is_token].reshape(batch_size, -1, *attention_output.shape[2:])


def pool_segments(hidden_states: torch.Tensor, sequence_ids: torch.Tensor, strategy: str) -> torch.Tensor:
    """`pool_sequence` for a padding-free batch: reduce (batch, seq, hidden), whose rows hold several sequences end to
    end, to (number of sequences, hidden), one row per packed sequence in reading order (row by row, left to right).
    `sequence_ids` (from `find_packed_sequences`) number the sequences of each row from 0. A packed row has no
    padding, so every token of a sequence is real: `first`, `mean`, `last` and `max` pool exactly the tokens that
    `pool_sequence` pools in the padded row of the same sequence."""
    hidden_size = hidden_states.shape[-1]
    tokens = hidden_states.reshape(-1, hidden_size)
    sequence_ids = number_sequences_across_rows(sequence_ids)
    starts = torch.ones_like(sequence_ids, dtype=torch.bool)
    starts[1:] = sequence_ids[1:] != sequence_ids[:-1]
    if strategy == "first":
        return tokens[starts]
    if strategy == "last":  # a token is the last of its sequence when the next one starts a sequence (or it ends all)
        return tokens[starts.roll(-1)]
    num_sequences = int(sequence_ids[-1]) + 1
    if strategy == "mean":
        lengths = torch.bincount(sequence_ids, minlength=num_sequences).to(tokens.dtype)
        return tokens.new_zeros(num_sequences, hidden_size).index_add(0, sequence_ids, tokens) / lengths[:, None]
    by_sequence = sequence_ids[:, None].expand_as(tokens)
    return tokens.new_zeros(num_sequences, hidden_size).scatter_reduce(
        0, by_sequence, tokens, reduce="amax", include_self=False
    )
