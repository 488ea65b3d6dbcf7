"""Local and sparse attention whose time and memory grow linearly with the sequence length.

Full attention compares every query with every key: T^2 scores per head. A sliding window laid over it as a mask
costs even more (the T x T mask is built and read). Here each query meets only the keys its pattern can reach, and no
T x T tensor (scores, mask or bias) exists at any point, in the forward or the backward pass:

- on CPU (and on GPU with attention dropout), `block_sparse_attention`: the sequence is cut into blocks of B queries;
  a block's keys are the B + 2(W - 1) (causal: B + W - 1) positions its window reaches, an overlapping view of the
  keys, not a copy. Consecutive blocks go through one `scaled_dot_product_attention` call (the blocks as its second
  batch dimension) with one small mask that every inner block shares. The backward pass recomputes each piece and
  adds its gradients into one buffer per input, so that beyond the inputs, output and gradients (which full
  attention holds too) only one piece's temporaries exist at a time. Global queries (few) attend to every key in
  an online softmax over key chunks. Cost: time T x (B + 2W) per head; memory that of full SDPA plus one piece's
  temporaries (about 1 MB);
- on CUDA, `flex_sparse_attention`: torch's compiled flex_attention with a block mask of the same pattern.

The patterns, one meaning for every code path (block path, flex path, dense reference):

- window W: a query at position i sees the keys j with |i - j| < W (bidirectional: W - 1 on each side plus itself)
  or 0 <= i - j < W (causal: itself and the W - 1 before it), the sliding window of Mistral / transformers.
- dilation d (Longformer's dilated window; the strided pattern of Child et al., 2019, "Generating Long Sequences
  with Sparse Transformers"): the keys j with (i - j) % d == 0 and |i - j| / d < W, still W keys per side, spread
  over a span of W * d. The positions sharing a residue mod d form a subsequence on which this is a plain window.
- global tokens (Longformer, Beltagy et al., 2020; BigBird / ETC, Zaheer et al., 2020; Ainslie et al., 2020):
  `global_mask` (batch, seq), True = global. Bidirectional: a global token attends to every key and every query
  attends to every global key. Causal: every query attends to the global keys at or before it (like attention
  sinks) and a global query attends to every key at or before it, never to the future.
- `key_padding_mask` (batch, seq), True = real token: padded keys are never attended. A query that sees no key at
  all returns zeros and passes no gradient (a dense path serving the same pattern must agree: eager attention that
  fills masked scores with the dtype's minimum averages all keys on such a row instead).
- ALiBi (Press et al., 2022): `alibi_slopes` (heads,) adds -slope_h * |pos_i - pos_j| to the scores, computed per
  block. `positions` (batch or 1, seq) default to 0 .. seq - 1.
- grouped-query / multi-query attention: key and value may have fewer heads than the query.
- attention dropout on the probabilities, in training only.

Scope: self-attention with as many queries as keys (no key/value cache); a decoding step with a cache goes through
the dense path, with `SparseAttentionPattern.dense_mask()`.

This file is also shipped as Hub remote code: it may import only torch, transformers and its sibling files.
"""

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

try:  # torch >= 2.5; only used on GPU, where it runs compiled kernels of the block mask
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - depends on the installed torch
    create_block_mask = flex_attention = None

# Queries per block: at least this many (smaller blocks cost more in per-call overhead than they save in skipped
# keys), else a quarter of the window (the keys of a block, 2 * (window - 1) + block, are then mostly needed).
MIN_BLOCK_SIZE = 64
# Elements of the temporaries of one piece (consecutive blocks computed together): sizes the pieces.
PIECE_ELEMENTS = 2**18


# ---------------------------------------------------------------------------------------------------------------------
# The pattern, as the model hands it to the attention interface
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(eq=False)  # holds tensors: patterns compare by identity
class SparseAttentionPattern:
    """Which keys each query sees, passed as `attention_mask` to `sparse_attention_forward` instead of a dense mask.

    window: keys within |i - j| < window (causal: 0 <= i - j < window), in steps of `dilation` positions.
    causal: decoder (True) or encoder (False) attention.
    dilation: distance between the keys of the window (1 = contiguous window).
    global_mask: (batch, seq) bool, True for tokens that attend to and are attended by every position.
    key_padding_mask: (batch, seq) bool, True for real tokens; padded keys are never attended.
    positions: (batch or 1, seq) positions for the ALiBi distances; None means 0 .. seq - 1.
    alibi_slopes: (heads,) ALiBi slopes; None means no ALiBi bias.
    block_size: queries per block of the block path (None: max(window // 4, 64)); a tuning knob, not semantics.
    """

    window: int
    causal: bool
    dilation: int = 1
    global_mask: torch.Tensor | None = None
    key_padding_mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    alibi_slopes: torch.Tensor | None = None
    block_size: int | None = None
    # Per-forward memo shared by the layers that use this pattern (the flex block mask).
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        _check_pattern_arguments(
            self.window, self.dilation, self.global_mask, self.key_padding_mask, self.positions, self.block_size
        )

    def seq_len(self) -> int | None:
        """The sequence length the pattern's tensors were built for, or None if it holds none."""
        for tensor in (self.key_padding_mask, self.global_mask, self.positions):
            if tensor is not None:
                return tensor.shape[-1]
        return None

    def dense_mask(self, seq_len: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """The same pattern as a dense bool mask (batch or 1, 1, seq, seq), True = attend, for eager and sdpa.

        ALiBi is not part of the mask: the dense paths add their own position bias."""
        known = self.seq_len()
        if seq_len is None and known is None:
            raise ValueError("SparseAttentionPattern.dense_mask needs `seq_len`: the pattern holds no per-token tensor")
        if seq_len is not None and known is not None and seq_len != known:
            raise ValueError(f"dense_mask(seq_len={seq_len}) but the pattern's masks have {known} tokens")
        return dense_pattern_mask(
            seq_len if seq_len is not None else known,
            window=self.window,
            causal=self.causal,
            dilation=self.dilation,
            global_mask=self.global_mask,
            key_padding_mask=self.key_padding_mask,
            device=device,
        )


def _check_pattern_arguments(window, dilation, global_mask, key_padding_mask, positions, block_size):
    for name, value in (("window", window), ("dilation", dilation)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"`block_size` must be None or an integer >= 1, got {block_size!r}")
    for name, mask in (("global_mask", global_mask), ("key_padding_mask", key_padding_mask)):
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2):
            got = f"{mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask)
            raise ValueError(f"`{name}` must be a bool tensor of shape (batch, seq_len), got {got}")
    if positions is not None and (not isinstance(positions, torch.Tensor) or positions.dim() != 2):
        raise ValueError("`positions` must be a tensor of shape (batch or 1, seq_len)")


# ---------------------------------------------------------------------------------------------------------------------
# Dense reference
# ---------------------------------------------------------------------------------------------------------------------


def pattern_mask_mod(
    *,
    window: int,
    causal: bool,
    dilation: int = 1,
    global_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
):
    """The pattern as a `mask_mod(batch, head, query_index, key_index) -> bool` (flex_attention's convention): the one
    definition the dense mask and the flex path evaluate (the block path is tested against it)."""

    def mask_mod(batch, head, query_index, key_index):
        distance = query_index - key_index
        steps = distance // dilation
        in_window = (steps >= 0) & (steps < window) if causal else steps.abs() < window
        allowed = (distance % dilation == 0) & in_window
        if global_mask is not None:
            allowed = allowed | global_mask[batch, query_index] | global_mask[batch, key_index]
            if causal:
                allowed = allowed & (distance >= 0)
        if key_padding_mask is not None:
            allowed = allowed & key_padding_mask[batch, key_index]
        return allowed

    return mask_mod


def dense_pattern_mask(
    seq_len: int,
    *,
    window: int,
    causal: bool,
    dilation: int = 1,
    global_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The pattern as a dense bool mask (batch or 1, 1, seq_len, seq_len), True where query i may attend to key j.

    This is the reference every fast path is tested against; it costs seq_len^2 and is meant for short sequences,
    eager attention and `output_attentions`."""
    _check_pattern_arguments(window, dilation, global_mask, key_padding_mask, None, None)
    for name, mask in (("global_mask", global_mask), ("key_padding_mask", key_padding_mask)):
        if mask is not None and mask.shape[1] != seq_len:
            raise ValueError(f"`{name}` has {mask.shape[1]} positions, expected seq_len={seq_len}")
    if device is None:
        device = next((m.device for m in (global_mask, key_padding_mask) if m is not None), None)
    global_mask = None if global_mask is None else global_mask.to(device)
    key_padding_mask = None if key_padding_mask is None else key_padding_mask.to(device)
    batch = next((m.shape[0] for m in (global_mask, key_padding_mask) if m is not None), 1)
    mask_mod = pattern_mask_mod(
        window=window, causal=causal, dilation=dilation, global_mask=global_mask, key_padding_mask=key_padding_mask
    )
    index = torch.arange(seq_len, device=device)
    batch_index = torch.arange(batch, device=device)[:, None, None]
    mask = torch.empty(batch, seq_len, seq_len, dtype=torch.bool, device=device)
    rows = max(1, 2**22 // max(1, batch * seq_len))  # query rows per evaluation: integer temporaries stay ~32 MB
    for first in range(0, seq_len, rows):
        queries = index[first : first + rows]
        mask[:, first : first + rows] = mask_mod(batch_index, None, queries[None, :, None], index[None, None, :])
    return mask[:, None]


# ---------------------------------------------------------------------------------------------------------------------
# The block path (pure PyTorch, any device)
# ---------------------------------------------------------------------------------------------------------------------
#
# With dilation d, row (b, r) is the strided view of sequence b at positions r, r + d, r + 2d, ...: on it the pattern is
# a plain window of W row steps. A row is cut into blocks of `block` queries; block n's keys are the row positions
# n * block - left .. (n + 1) * block + right - 1 (zeros outside the row), so query a of a block and key slot c of the
# same block are `a + left - c` row steps apart whatever n is, and every block shares one (block, span) band mask.
# Consecutive blocks are processed together as a piece: one `scaled_dot_product_attention` call with the blocks as its
# second batch dimension and the keys an overlapping (unfold) view of the row, not a copy.


@dataclass
class _Layout:
    window: int  # in row steps, at most the longest row
    causal: bool
    dilation: int
    block: int
    left: int  # row steps a block's keys reach before its first query
    right: int  # ... and after its last query

    @classmethod
    def plan(cls, seq_len: int, window: int, causal: bool, dilation: int, block_size: int | None) -> "_Layout":
        longest_row = -(-seq_len // dilation)
        window = min(window, longest_row)  # a window reaching past both ends of the row sees the whole row
        block = block_size or max(window // 4, MIN_BLOCK_SIZE)
        if block >= longest_row:  # one block per row: its keys are the row itself
            return cls(window, causal, dilation, longest_row, 0, 0)
        return cls(window, causal, dilation, block, window - 1, 0 if causal else window - 1)

    @property
    def span(self) -> int:
        return self.left + self.block + self.right

    def step_offsets(self, device) -> torch.Tensor:
        """(block, span): i - j in row steps between query a and key slot c of one block."""
        return torch.arange(self.block, device=device)[:, None] + self.left - torch.arange(self.span, device=device)

    def band(self, device) -> torch.Tensor:
        offsets = self.step_offsets(device)
        return (offsets >= 0) & (offsets < self.window) if self.causal else offsets.abs() < self.window


@dataclass
class _Piece:
    """One `scaled_dot_product_attention` call: blocks start..stop-1 of row (sequence, residue), or (global=True) the
    global queries of a sequence against all its keys."""

    sequence: int
    residue: int = 0
    start: int = 0
    stop: int = 0
    is_global: bool = False
    global_rows: tuple | None = None  # a global piece's (output rows, logsumexp), kept for its backward
    shared_mask: bool = False  # the mask every clean block shares (no padding, globals or custom positions in reach)
    dead: bool = False  # no key in reach: the output rows are zeros
    rng_state: torch.Tensor | None = None  # the generator's state before its dropout, to redraw it in the backward


def _pad_dim(x: torch.Tensor, dim: int, before: int, after: int) -> torch.Tensor:
    if before == 0 and after == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim) + [before, after]
    if x.dtype == torch.bool:
        return F.pad(x.to(torch.uint8), pad).bool()
    return F.pad(x, pad)


def _fold_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(heads, blocks, n, dim) -> (kv_heads, blocks, groups * n, dim): the query heads sharing a key/value head are
    stacked along the query axis, so they share its keys without a repeat_kv copy."""
    heads, blocks, n, dim = x.shape
    x = x.view(heads // groups, groups, blocks, n, dim).transpose(1, 2)
    return x.reshape(heads // groups, blocks, groups * n, dim)


def _unfold_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(kv_heads, blocks, groups * n, dim) -> (heads, blocks * n, dim)."""
    kv_heads, blocks, grouped, dim = x.shape
    x = x.view(kv_heads, blocks, groups, grouped // groups, dim).transpose(1, 2)
    return x.reshape(kv_heads * groups, blocks * (grouped // groups), dim)


class _BlockSparsePlan:
    """Everything about one call that is not a differentiable input: the layout, the masks' ingredients, the pieces."""

    def __init__(self, layout, query, key, global_mask, key_padding_mask, alibi_slopes, positions, scaling, dropout):
        self.layout, self.scaling, self.dropout = layout, scaling, dropout
        self.batch, self.num_heads, self.seq_len, self.head_dim = query.shape
        self.kv_heads = key.shape[1]
        self.groups = self.num_heads // self.kv_heads
        self.device, self.dtype = query.device, query.dtype
        # Softmax statistics and ALiBi biases in at least fp32 (fp64 inputs keep fp64).
        self.float_dtype = torch.promote_types(query.dtype, torch.float32)
        self.alibi_slopes = None
        if alibi_slopes is not None:
            self.alibi_slopes = alibi_slopes.to(device=self.device, dtype=self.float_dtype)
        self.positions = positions  # (batch or 1, seq), or None for 0 .. seq - 1
        self.real = key_padding_mask if key_padding_mask is not None else torch.ones(
            self.batch, self.seq_len, dtype=torch.bool, device=self.device
        )
        self.band = layout.band(self.device)
        self._shared_masks = {}

        # Global tokens, per sequence: the keys every query reaches (global and real) and the dense query rows.
        self.global_keys, self.global_queries = [], []
        self.global_mask = global_mask
        key_ok = self.real
        if global_mask is not None:
            key_ok = self.real & ~global_mask  # the window never reaches a global key a second time
            for sequence in range(self.batch):
                self.global_keys.append(torch.nonzero(global_mask[sequence] & self.real[sequence]).flatten())
                self.global_queries.append(torch.nonzero(global_mask[sequence]).flatten())
        last_global_key = [int(index.max()) if len(index) else -1 for index in self.global_keys]

        d, block = layout.dilation, layout.block
        self.rows = {}  # (sequence, residue) -> (row length, padded key_ok, padded positions)
        self.pieces: list[_Piece] = []
        for sequence in range(self.batch):
            num_globals = len(self.global_keys[sequence]) if self.global_keys else 0
            # A piece's temporaries (about a megabyte in fp32) are all this path holds beyond what full attention holds
            # too (inputs, output, gradients), so that its peak memory stays level with full attention's.
            blocks_per_piece = max(1, PIECE_ELEMENTS // self._elements_per_block(num_globals))
            for residue in range(min(d, self.seq_len)):
                row_len = (self.seq_len - residue + d - 1) // d
                num_blocks = -(-row_len // block)
                padded_len = layout.left + num_blocks * block + layout.right
                ok = _pad_dim(key_ok[sequence, residue::d], 0, layout.left, padded_len - layout.left - row_len)
                positions_row = None
                if positions is not None:
                    row = positions[0 if positions.shape[0] == 1 else sequence, residue::d]
                    positions_row = _pad_dim(row, 0, layout.left, padded_len - layout.left - row_len)
                self.rows[sequence, residue] = (row_len, ok, positions_row)
                ok_blocks = ok.unfold(0, layout.span, block)  # (blocks, span)
                all_ok, any_ok = ok_blocks.all(-1).tolist(), ok_blocks.any(-1).tolist()
                for start, stop in self._row_chunks(row_len, num_blocks, blocks_per_piece):
                    first_query = residue + d * start * block
                    globals_visible_to_all = num_globals == 0 or (
                        self.alibi_slopes is None and (not layout.causal or last_global_key[sequence] <= first_query)
                    )
                    self.pieces.append(_Piece(
                        sequence, residue, start, stop,
                        shared_mask=all(all_ok[start:stop]) and positions is None and globals_visible_to_all,
                        dead=num_globals == 0 and not any(any_ok[start:stop]),
                    ))
            if self.global_queries and len(self.global_queries[sequence]):
                self.pieces.append(_Piece(sequence, is_global=True))

    def _elements_per_block(self, num_globals: int) -> int:
        """What one block adds to a piece's temporaries (elements), to size the pieces."""
        layout = self.layout
        keys = layout.span + num_globals
        total = 2 * self.kv_heads * keys * self.head_dim  # gradients of the overlapping key/value view
        total += 3 * self.num_heads * layout.block * self.head_dim  # output, query and its gradient
        total += self.groups * layout.block * keys * (self.kv_heads if self.alibi_slopes is not None else 1)  # a mask
        if num_globals:
            total += 2 * self.kv_heads * keys * self.head_dim  # keys with the global keys prepended
        if self.dropout > 0:
            total += 3 * self.num_heads * layout.block * keys  # scores, probabilities, dropout mask
        return total

    def _row_chunks(self, row_len: int, num_blocks: int, blocks_per_piece: int) -> list[tuple[int, int]]:
        """Block ranges of a row. A block whose keys reach past the row's ends (the first, the last ones) is a piece of
        its own, with only the keys that exist (no padded copy); the inner blocks are grouped."""
        layout = self.layout
        inner = [
            n for n in range(num_blocks)
            if n * layout.block >= layout.left and (n + 1) * layout.block + layout.right <= row_len
        ]
        if not inner:
            return [(n, n + 1) for n in range(num_blocks)]
        first, stop = inner[0], inner[-1] + 1
        chunks = [(n, n + 1) for n in range(first)]
        chunks += [(n, min(n + blocks_per_piece, stop)) for n in range(first, stop, blocks_per_piece)]
        return chunks + [(n, n + 1) for n in range(stop, num_blocks)]

    # -- the pieces' inputs and outputs -------------------------------------------------------------------------------

    def _key_range(self, piece: _Piece) -> tuple[int, int, int, int]:
        """Row positions of the piece's keys that exist, and the zero slots before and after them."""
        row_len = self.rows[piece.sequence, piece.residue][0]
        first = piece.start * self.layout.block - self.layout.left
        last = piece.stop * self.layout.block + self.layout.right
        return max(first, 0), min(last, row_len), max(-first, 0), max(last - row_len, 0)

    def _query_range(self, piece: _Piece) -> tuple[int, int]:
        row_len = self.rows[piece.sequence, piece.residue][0]
        return piece.start * self.layout.block, min(piece.stop * self.layout.block, row_len)

    def leaves(self, piece: _Piece, query, key, value, needs_grad: tuple[bool, bool, bool]) -> list:
        """The piece's inputs, cut from the (detached) full tensors: [query (heads, n, head_dim), key and value
        (kv_heads, blocks, keys, head_dim), global key and value (kv_heads, globals, head_dim) or None]. The local
        keys are a view of the row: overlapping blocks of `span` keys, or a lone block's keys that exist."""
        b, d, layout = piece.sequence, self.layout.dilation, self.layout
        (q_first, q_last), (k_first, k_last, _, _) = self._query_range(piece), self._key_range(piece)
        leaves = [query[b, :, piece.residue :: d][:, q_first:q_last]]
        for x in (key, value):
            keys = x[b, :, piece.residue :: d][:, k_first:k_last]
            if piece.stop - piece.start == 1:
                leaves.append(keys[:, None])
            else:  # inner blocks: every key exists
                leaves.append(keys.unfold(1, layout.span, layout.block).transpose(-1, -2))
        if self.global_keys and len(self.global_keys[b]):
            # Indexing, not index_select: on a strided tensor index_select would first copy all of it.
            leaves += [key[b][:, self.global_keys[b]], value[b][:, self.global_keys[b]]]
        else:
            leaves += [None, None]
        flags = [needs_grad[0], needs_grad[1], needs_grad[2], needs_grad[1], needs_grad[2]]
        return [None if leaf is None else leaf.detach().requires_grad_(flag) for leaf, flag in zip(leaves, flags)]

    def write(self, output: torch.Tensor, piece: _Piece, rows: torch.Tensor | None) -> None:
        """Put a piece's rows (heads, n, head_dim) into output (batch, seq, heads, head_dim); None writes zeros."""
        if piece.is_global:
            output[piece.sequence].index_copy_(0, self.global_queries[piece.sequence], rows.transpose(0, 1))
            return
        first, last = self._query_range(piece)
        target = output[piece.sequence, piece.residue :: self.layout.dilation][first:last]
        target.zero_() if rows is None else target.copy_(rows.transpose(0, 1))

    def read(self, grad_output: torch.Tensor, piece: _Piece) -> torch.Tensor:
        if piece.is_global:
            return grad_output[piece.sequence][self.global_queries[piece.sequence]].transpose(0, 1)
        first, last = self._query_range(piece)
        grad = grad_output[piece.sequence, piece.residue :: self.layout.dilation][first:last].transpose(0, 1)
        if self.global_mask is not None:  # a global query's windowed row was overwritten: it passes no gradient
            overwritten = self.global_mask[piece.sequence, piece.residue :: self.layout.dilation][first:last]
            grad = grad.masked_fill(overwritten[None, :, None], 0.0)
        return grad

    def accumulate(self, grads, piece: _Piece, grad_query, grad_key, grad_value, grad_globals) -> None:
        """Add a piece's input gradients into the full gradient buffers, in place."""
        b, d = piece.sequence, self.layout.dilation
        grad_q, grad_k, grad_v, grad_gk, grad_gv = grads
        (q_first, q_last), (k_first, k_last, _, _) = self._query_range(piece), self._key_range(piece)
        if grad_q is not None:
            grad_query[b, :, piece.residue :: d][:, q_first:q_last].add_(grad_q)
        for buffer, grad in ((grad_key, grad_k), (grad_value, grad_v)):
            if grad is not None:
                _fold_blocks_(buffer[b, :, piece.residue :: d][:, k_first:k_last], grad, self.layout.block)
        for slot, grad in ((0, grad_gk), (1, grad_gv)):
            if grad is not None:
                grad_globals[b][slot] = grad if grad_globals[b][slot] is None else grad_globals[b][slot] + grad

    # -- the attention of one piece -----------------------------------------------------------------------------------

    def attend(self, piece: _Piece, query, key, value, global_key=None, global_value=None) -> torch.Tensor:
        """-> the piece's output rows (heads, n, head_dim)."""
        groups, num_blocks, rows = self.groups, piece.stop - piece.start, query.shape[1]
        query = _fold_groups(query.view(self.num_heads, num_blocks, rows // num_blocks, self.head_dim), groups)
        if global_key is not None:
            key = torch.cat([global_key[:, None].expand(-1, num_blocks, -1, -1), key], dim=2)
            value = torch.cat([global_value[:, None].expand(-1, num_blocks, -1, -1), value], dim=2)
        if piece.shared_mask:
            attn_mask, empty = self._shared_mask(0 if global_key is None else global_key.shape[1]), None
        else:
            attn_mask, empty = self._piece_mask(piece)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=self.dropout, scale=self.scaling
        )
        if empty is not None:
            out = out.masked_fill(empty, 0.0)
        return _unfold_groups(out, groups)

    # -- the global queries: every key of their sequence, chunk by chunk ----------------------------------------------
    #
    # A dense row per global query would cost (count, seq) per head, and its autograd gradients a full-size copy of the
    # keys and values. Instead the rows run as an online softmax over key chunks (what flash attention does inside),
    # and their backward pass, written out, adds its key and value gradients into the full buffers in place.

    def _global_chunks(self, piece: _Piece, query, key):
        """Yields (first, last, scores (kv_heads, groups * count, keys) with -inf where not attended) per key chunk."""
        b, groups = piece.sequence, self.groups
        index = self.global_queries[b]
        count = len(index)
        chunk = max(1, PIECE_ELEMENTS // (4 * self.num_heads * count))  # about four (heads, count, chunk) temporaries
        positions = None
        if self.alibi_slopes is not None:
            positions = self.positions[0 if self.positions.shape[0] == 1 else b] if self.positions is not None else None
            query_positions = (positions[index] if positions is not None else index).to(self.float_dtype)
        for first in range(0, self.seq_len, chunk):
            last = min(first + chunk, self.seq_len)
            scores = torch.matmul(query, key[:, first:last].transpose(-1, -2)).to(self.float_dtype) * self.scaling
            allowed = self.real[b, first:last][None, :].expand(count, -1)
            if self.layout.causal:
                allowed = allowed & (torch.arange(first, last, device=self.device)[None, :] <= index[:, None])
            if self.alibi_slopes is not None:
                key_positions = torch.arange(first, last, device=self.device)
                if positions is not None:
                    key_positions = positions[first:last]
                distance = (query_positions[:, None] - key_positions[None, :].to(self.float_dtype)).abs()
                slopes = self.alibi_slopes.view(self.kv_heads, groups, 1, 1)
                scores = scores - (slopes * distance).reshape(self.kv_heads, groups * count, last - first)
            yield first, last, scores.masked_fill(~allowed.repeat(groups, 1), float("-inf"))

    def _dropout_keep(self, probabilities: torch.Tensor) -> torch.Tensor | None:
        if self.dropout == 0:
            return None
        return torch.empty_like(probabilities).bernoulli_(1 - self.dropout) / (1 - self.dropout)

    def _global_forward(self, piece: _Piece, query, key, value, will_backward: bool) -> torch.Tensor:
        b = piece.sequence
        count = len(self.global_queries[b])
        folded = (self.kv_heads, self.groups * count)
        q = query[b][:, self.global_queries[b]].reshape(*folded, self.head_dim)
        if will_backward and self.dropout > 0:
            piece.rng_state = _get_rng_state(self.device)
        running_max = torch.full(folded, float("-inf"), device=self.device)
        normalizer = torch.zeros(folded, device=self.device)
        weighted = torch.zeros(*folded, self.head_dim, device=self.device)
        for first, last, scores in self._global_chunks(piece, q, key[b]):
            new_max = torch.maximum(running_max, scores.amax(-1))
            shift = new_max.masked_fill(new_max == float("-inf"), 0.0)  # rows that saw no key yet
            rescale = torch.exp(running_max - shift)
            probabilities = torch.exp(scores - shift[..., None])
            normalizer = normalizer * rescale + probabilities.sum(-1)
            keep = self._dropout_keep(probabilities)
            if keep is not None:
                probabilities = probabilities * keep
            update = torch.matmul(probabilities.to(value.dtype), value[b, :, first:last]).to(self.float_dtype)
            weighted = weighted * rescale[..., None] + update
            running_max = new_max
        rows = (weighted / normalizer.clamp_min(torch.finfo(self.float_dtype).tiny)[..., None]).to(self.dtype)
        if will_backward:
            piece.global_rows = (rows, running_max + normalizer.log())  # a row that saw no key: zeros, lse -inf
        return rows.reshape(self.num_heads, count, self.head_dim)

    def _global_backward(self, piece: _Piece, grad_output, query, key, value, grad_query, grad_key, grad_value):
        b = piece.sequence
        index = self.global_queries[b]
        count = len(index)
        folded = (self.kv_heads, self.groups * count, self.head_dim)
        rows, logsumexp = piece.global_rows
        piece.global_rows = None
        q = query[b][:, index].reshape(folded)
        grad_rows = self.read(grad_output, piece).reshape(folded)
        row_dot = (grad_rows.to(self.float_dtype) * rows.to(self.float_dtype)).sum(-1, keepdim=True)
        logsumexp = logsumexp.masked_fill(logsumexp == float("-inf"), float("inf"))[..., None]  # empty rows: p = 0
        grad_q = torch.zeros(folded, dtype=self.float_dtype, device=self.device)
        with _redrawing(self.device, piece.rng_state):
            for first, last, scores in self._global_chunks(piece, q, key[b]):
                probabilities = torch.exp(scores - logsumexp)
                keep = self._dropout_keep(probabilities)
                dropped = probabilities if keep is None else probabilities * keep
                grad_probabilities = torch.matmul(grad_rows, value[b, :, first:last].transpose(-1, -2))
                grad_probabilities = grad_probabilities.to(self.float_dtype)
                if keep is not None:
                    grad_probabilities = grad_probabilities * keep
                grad_scores = (probabilities * (grad_probabilities - row_dot) * self.scaling).to(self.dtype)
                if grad_value is not None:
                    grad_value[b, :, first:last].add_(torch.matmul(dropped.to(self.dtype).transpose(-1, -2), grad_rows))
                if grad_key is not None:
                    grad_key[b, :, first:last].add_(torch.matmul(grad_scores.transpose(-1, -2), q))
                grad_q += torch.matmul(grad_scores, key[b, :, first:last]).to(self.float_dtype)
        if grad_query is not None:
            grad_query[b].index_add_(1, index, grad_q.to(self.dtype).reshape(self.num_heads, count, self.head_dim))

    # -- masks, additive (0 or -slope * distance where attended, -inf elsewhere), as the kernel uses them ------------

    def _additive_mask(self, mask: torch.Tensor, distance: torch.Tensor | None) -> torch.Tensor:
        """bool mask (1, blocks, groups * n, keys), ALiBi distance (blocks, n, keys) or None -> float mask (1 or
        kv_heads, blocks, groups * n, keys)."""
        if distance is None:
            return torch.zeros(mask.shape, dtype=self.dtype, device=self.device).masked_fill_(~mask, float("-inf"))
        blocks, n, keys = distance.shape
        slopes = self.alibi_slopes.view(self.kv_heads, 1, self.groups, 1, 1)
        bias = -slopes * distance.to(self.float_dtype)[None, :, None]
        bias = bias.reshape(self.kv_heads, blocks, self.groups * n, keys)
        return bias.masked_fill_(~mask, float("-inf")).to(self.dtype)

    def _shared_mask(self, num_globals: int) -> torch.Tensor:
        """The mask of a clean piece, the same for every block: (1 or kv_heads, 1, groups * block, globals + span)."""
        if num_globals not in self._shared_masks:
            layout = self.layout
            mask = self.band
            if num_globals:  # visible to every query of the piece (checked when the piece was planned)
                mask = torch.cat([mask.new_ones(layout.block, num_globals), mask], dim=1)
            distance = None
            if self.alibi_slopes is not None:  # only without globals: distances are then the same in every block
                distance = (layout.dilation * layout.step_offsets(self.device).abs())[None]
            self._shared_masks[num_globals] = self._additive_mask(mask.repeat(self.groups, 1)[None, None], distance)
        return self._shared_masks[num_globals]

    def _piece_mask(self, piece: _Piece):
        """A piece's own mask and the rows that see no key (their output is zeroed): padding, row ends, globals."""
        layout, d = self.layout, self.layout.dilation
        b, num_blocks = piece.sequence, piece.stop - piece.start
        _, key_ok, positions_row = self.rows[b, piece.residue]
        q_first, q_last = self._query_range(piece)
        _, _, pad_before, pad_after = self._key_range(piece)
        rows, keys = slice(0, (q_last - q_first) // num_blocks), slice(pad_before, layout.span - pad_after)
        first_slot = piece.start * layout.block
        window_slots = slice(first_slot, first_slot + (num_blocks - 1) * layout.block + layout.span)
        mask = self.band[None] & key_ok[window_slots].unfold(0, layout.span, layout.block)[:, None, :]
        mask = mask[:, rows, keys]  # a lone block at a row's end: only its queries and the keys that exist
        query_index = piece.residue + d * (first_slot + torch.arange(num_blocks * layout.block, device=self.device))
        query_index = query_index.view(num_blocks, layout.block)[:, rows]  # sequence positions of the queries
        alibi = self.alibi_slopes is not None
        distance = query_positions = None
        if alibi and positions_row is not None:
            query_positions = positions_row[layout.left :][first_slot : first_slot + num_blocks * layout.block]
            query_positions = query_positions.view(num_blocks, layout.block)[:, rows]
            key_positions = positions_row[window_slots].unfold(0, layout.span, layout.block)[:, keys]
            distance = (query_positions[:, :, None] - key_positions[:, None, :]).abs()
        elif alibi:
            query_positions = query_index
            distance = (d * layout.step_offsets(self.device).abs())[None, rows, keys].expand(num_blocks, -1, -1)
        if self.global_keys and len(self.global_keys[b]):
            global_index = self.global_keys[b]
            visible = mask.new_ones(*mask.shape[:2], len(global_index))
            if layout.causal:
                visible = visible & (global_index[None, None, :] <= query_index[:, :, None])
            mask = torch.cat([visible, mask], dim=2)
            if alibi:
                global_positions = global_index
                if self.positions is not None:
                    global_positions = self.positions[0 if self.positions.shape[0] == 1 else b][global_index]
                global_distance = (query_positions[:, :, None] - global_positions[None, None, :]).abs()
                distance = torch.cat([global_distance, distance], dim=2)
        empty = ~mask.any(-1)  # (blocks, queries)
        # Empty rows attend anywhere (a finite softmax, not NaN); their output is zeroed afterwards.
        mask = (mask | empty[:, :, None]).repeat(1, self.groups, 1)[None]
        empty = empty.repeat(1, self.groups)[None, :, :, None]
        return self._additive_mask(mask, distance), empty

    # -- running ------------------------------------------------------------------------------------------------------

    def forward(self, query, key, value, will_backward: bool = False) -> torch.Tensor:
        """The output (batch, seq, heads, head_dim), piece by piece. Nothing is kept for the backward pass but the
        generator's state before each piece's dropout: the backward pass recomputes every piece (one more forward,
        about a third of the attention's time), so that, as in full attention's kernel, no score, probability or mask
        outlives its piece."""
        output = query.new_empty(self.batch, self.seq_len, self.num_heads, self.head_dim)
        no_grad = (False, False, False)
        with torch.no_grad():
            for piece in self.pieces:
                if piece.dead:
                    self.write(output, piece, None)
                    continue
                if piece.is_global:  # after the windowed rows, which it overwrites
                    self.write(output, piece, self._global_forward(piece, query, key, value, will_backward))
                    continue
                if will_backward and self.dropout > 0:
                    piece.rng_state = _get_rng_state(self.device)
                self.write(output, piece, self.attend(piece, *self.leaves(piece, query, key, value, no_grad)))
        return output

    def backward(self, grad_output, query, key, value, needs_grad):
        # Laid out like the inputs (often (batch, seq, heads, head_dim) transposed), so that no copy follows.
        grad_query = torch.zeros_like(query) if needs_grad[0] else None
        grad_key = torch.zeros_like(key) if needs_grad[1] else None
        grad_value = torch.zeros_like(value) if needs_grad[2] else None
        grad_globals = [[None, None] for _ in range(self.batch)]
        for piece in self.pieces:
            if piece.dead:
                continue
            if piece.is_global:
                self._global_backward(piece, grad_output, query, key, value, grad_query, grad_key, grad_value)
                continue
            leaves = self.leaves(piece, query, key, value, needs_grad)
            with torch.enable_grad(), _redrawing(self.device, piece.rng_state):
                rows = self.attend(piece, *leaves)
            inputs = [leaf for leaf in leaves if leaf is not None and leaf.requires_grad]
            grads = iter(torch.autograd.grad(rows, inputs, self.read(grad_output, piece)))
            grads = [next(grads) if leaf is not None and leaf.requires_grad else None for leaf in leaves]
            self.accumulate(grads, piece, grad_query, grad_key, grad_value, grad_globals)
        for sequence, (grad_gk, grad_gv) in enumerate(grad_globals):
            if grad_gk is not None:
                grad_key[sequence].index_add_(1, self.global_keys[sequence], grad_gk)
            if grad_gv is not None:
                grad_value[sequence].index_add_(1, self.global_keys[sequence], grad_gv)
        return grad_query, grad_key, grad_value


def _fold_blocks_(target: torch.Tensor, grad: torch.Tensor, block: int) -> None:
    """target[:, n * block + c] += grad[:, n, c]: the adjoint of the overlapping view `x.unfold(1, span, block)`, in
    at most three strided additions (slots first .. first + block - 1 of every block never overlap)."""
    num_blocks, span = grad.shape[1], grad.shape[2]
    if num_blocks == 1:  # a lone block
        target.add_(grad[:, 0])
        return
    for first in range(0, span, block):
        width = min(block, span - first)
        region = target[:, first : first + (num_blocks - 1) * block + width]
        region.unfold(1, width, block).transpose(-1, -2).add_(grad[:, :, first : first + width])


@contextlib.contextmanager
def _redrawing(device: torch.device, rng_state: torch.Tensor | None):
    """Runs the block with the generator at `rng_state` (the dropout draws of the forward pass), then puts the
    generator back where it was; does nothing without a state (no dropout)."""
    if rng_state is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type != "cpu" else [], device_type=device.type):
        _set_rng_state(device, rng_state)
        yield


def _get_rng_state(device: torch.device) -> torch.Tensor:
    return torch.get_rng_state() if device.type == "cpu" else torch.get_device_module(device.type).get_rng_state(device)


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.get_device_module(device.type).set_rng_state(state, device)


class _BlockSparseAttentionFunction(torch.autograd.Function):
    """Runs the pieces one after the other. The forward writes their rows into one output; the backward adds their
    gradients into one buffer per input, in place (autograd would give every piece's view a full-size gradient)."""

    @staticmethod
    def forward(ctx, plan: _BlockSparsePlan, query, key, value):
        ctx.plan = plan
        ctx.needs = ctx.needs_input_grad[1:4]
        ctx.save_for_backward(query, key, value)
        return plan.forward(query.detach(), key.detach(), value.detach(), will_backward=True)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        query, key, value = ctx.saved_tensors
        grads = ctx.plan.backward(grad_output, query.detach(), key.detach(), value.detach(), ctx.needs)
        return None, *grads


def block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    window: int,
    causal: bool,
    dilation: int = 1,
    global_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    scaling: float,
    dropout: float = 0.0,
    training: bool = False,
    block_size: int | None = None,
) -> torch.Tensor:
    """Attention under a local/sparse pattern (module docstring), block by block, in time and memory linear in seq.

    query (batch, heads, seq, head_dim), key and value (batch, kv_heads, seq, head_dim) -> (batch, seq, heads,
    head_dim). `alibi_slopes` are constants here (they get no gradient)."""
    _check_attention_inputs(
        query, key, value, window, dilation, global_mask, key_padding_mask, alibi_slopes, positions, block_size
    )
    dropout = dropout if training else 0.0
    if positions is not None and _are_default_positions(positions, query.shape[2]):
        positions = None  # distances then repeat from block to block: one ALiBi bias serves them all
    if global_mask is not None and not bool(global_mask.any()):
        global_mask = None
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    layout = _Layout.plan(query.shape[2], window, causal, dilation, block_size)
    plan = _BlockSparsePlan(
        layout, query, key, global_mask, key_padding_mask, alibi_slopes, positions, scaling, dropout
    )
    if needs_grad:
        return _BlockSparseAttentionFunction.apply(plan, query, key, value)
    return plan.forward(query, key, value)


def _check_attention_inputs(
    query, key, value, window, dilation, global_mask, key_padding_mask, alibi_slopes, positions, block_size
):
    _check_pattern_arguments(window, dilation, global_mask, key_padding_mask, positions, block_size)
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            "query, key and value must be (batch, heads, seq_len, head_dim); got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    batch, num_heads, seq_len, head_dim = query.shape
    if key.shape != value.shape or key.shape[0] != batch or key.shape[2] != seq_len or key.shape[3] != head_dim:
        raise ValueError(
            f"block-sparse attention is self-attention without a cache: key and value must both be (batch={batch}, "
            f"kv_heads, seq_len={seq_len}, head_dim={head_dim}); got key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    if num_heads % key.shape[1] != 0:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of key/value heads ({key.shape[1]})")
    for name, mask in (("global_mask", global_mask), ("key_padding_mask", key_padding_mask)):
        if mask is not None and tuple(mask.shape) != (batch, seq_len):
            raise ValueError(f"`{name}` must have shape (batch={batch}, seq_len={seq_len}), got {tuple(mask.shape)}")
        if mask is not None and mask.device != query.device:
            raise ValueError(f"`{name}` is on {mask.device}, the query on {query.device}")
    if alibi_slopes is not None and tuple(alibi_slopes.shape) != (num_heads,):
        raise ValueError(f"`alibi_slopes` must have shape (num_heads={num_heads},), got {tuple(alibi_slopes.shape)}")
    if positions is not None and (positions.shape[0] not in (1, batch) or positions.shape[1] != seq_len):
        raise ValueError(
            f"`positions` must have shape (1 or batch={batch}, seq_len={seq_len}), got {tuple(positions.shape)}"
        )


def _are_default_positions(positions: torch.Tensor, seq_len: int) -> bool:
    return bool((positions == torch.arange(seq_len, device=positions.device)).all())


# ---------------------------------------------------------------------------------------------------------------------
# The flex path (GPU): torch's flex_attention with a block mask of the same pattern
# ---------------------------------------------------------------------------------------------------------------------

_compiled_flex_attention = None


def flex_block_mask(pattern: SparseAttentionPattern, batch: int, seq_len: int, device):
    """The pattern's flex `BlockMask` (per sequence only if it holds per-sequence masks), built once per pattern."""
    if create_block_mask is None:
        raise RuntimeError("flex_attention needs torch >= 2.5 (torch.nn.attention.flex_attention)")
    key = ("flex_block_mask", batch, seq_len, str(device))
    if key not in pattern._cache:
        per_sequence = pattern.global_mask is not None or pattern.key_padding_mask is not None
        mask_mod = pattern_mask_mod(
            window=pattern.window,
            causal=pattern.causal,
            dilation=pattern.dilation,
            global_mask=None if pattern.global_mask is None else pattern.global_mask.to(device),
            key_padding_mask=None if pattern.key_padding_mask is None else pattern.key_padding_mask.to(device),
        )
        pattern._cache[key] = create_block_mask(
            mask_mod, batch if per_sequence else None, None, seq_len, seq_len, device=device
        )
    return pattern._cache[key]


def flex_sparse_attention(query, key, value, pattern: SparseAttentionPattern, *, scaling: float) -> torch.Tensor:
    """The pattern through compiled `flex_attention` (no dropout: flex has none). (batch, heads, seq, head_dim) in,
    (batch, seq, heads, head_dim) out; a query that sees no key gets zeros, as on the block path."""
    global _compiled_flex_attention
    if flex_attention is None:
        raise RuntimeError("flex_attention needs torch >= 2.5 (torch.nn.attention.flex_attention)")
    batch, num_heads, seq_len, _ = query.shape
    _check_attention_inputs(
        query, key, value, pattern.window, pattern.dilation, pattern.global_mask, pattern.key_padding_mask,
        pattern.alibi_slopes, pattern.positions, pattern.block_size,
    )
    block_mask = flex_block_mask(pattern, batch, seq_len, query.device)
    score_mod = None
    if pattern.alibi_slopes is not None:
        slopes = pattern.alibi_slopes.to(device=query.device, dtype=torch.float32)
        positions = pattern.positions
        if positions is None:
            positions = torch.arange(seq_len, device=query.device)[None]
        positions = positions.to(query.device)
        if positions.shape[0] == 1:
            row = positions[0]

            def score_mod(score, b, h, q_idx, kv_idx):
                return score - slopes[h] * (row[q_idx] - row[kv_idx]).abs()

        else:

            def score_mod(score, b, h, q_idx, kv_idx):
                return score - slopes[h] * (positions[b, q_idx] - positions[b, kv_idx]).abs()

    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention)
    out = _compiled_flex_attention(
        query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling,
        enable_gqa=num_heads != key.shape[1],
    )
    return out.transpose(1, 2).contiguous()


# ---------------------------------------------------------------------------------------------------------------------
# transformers' attention interface
# ---------------------------------------------------------------------------------------------------------------------


def sparse_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: SparseAttentionPattern,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """An attention-interface function (like transformers' `sdpa_attention_forward`) whose `attention_mask` is a
    `SparseAttentionPattern` instead of a dense mask. Returns ((batch, seq, heads, head_dim), None): no weights.

    On CUDA with flex_attention available and no attention dropout, the compiled flex kernels run the pattern's block
    mask; otherwise the pure-PyTorch block path. Other keyword arguments of the interface (sliding_window,
    is_causal, ...) are ignored: the pattern decides."""
    if not isinstance(attention_mask, SparseAttentionPattern):
        raise TypeError(
            "sparse_attention_forward expects `attention_mask` to be a SparseAttentionPattern (built by the model in "
            f"place of a dense mask), got {type(attention_mask).__name__}; use eager or sdpa with "
            "`SparseAttentionPattern.dense_mask()` for a dense mask"
        )
    if kwargs.get("position_bias") is not None:
        raise ValueError(
            "sparse attention adds ALiBi per block from SparseAttentionPattern.alibi_slopes/positions; a dense "
            "`position_bias` (batch, heads, seq, seq) would cost what the pattern saves"
        )
    pattern = attention_mask
    training = getattr(module, "training", False)
    if query.device.type == "cuda" and flex_attention is not None and not (training and dropout > 0):
        return flex_sparse_attention(query, key, value, pattern, scaling=scaling), None
    output = block_sparse_attention(
        query,
        key,
        value,
        window=pattern.window,
        causal=pattern.causal,
        dilation=pattern.dilation,
        global_mask=pattern.global_mask,
        key_padding_mask=pattern.key_padding_mask,
        alibi_slopes=pattern.alibi_slopes,
        positions=pattern.positions,
        scaling=scaling,
        dropout=dropout,
        training=training,
        block_size=pattern.block_size,
    )
    return output, None
