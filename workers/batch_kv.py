"""One batched KV cache for every sequence of a worker: a row per sequence, ragged lengths, holes.

Layout: per layer one key and one value buffer [rows, kv_heads, columns, head_dim], preallocated
and written in place (no per-step concatenation). Row r holds one sequence; `valid[r, c]` says
whether column c holds one of its tokens, `pos[r, c]` at which position. RoPE bakes a token's
position into its K, so its column is free as long as the mask is right: a forward writes its new
tokens at columns [start, end) past every column in use (HF's causal rule compares the key column
with the query's), with explicit per-row positions and a 4-D mask over [0, end).

* Ragged rows: a row with fewer new tokens than the widest is padded; after the forward its pad
  columns are invalid (holes). During the forward every new column is visible to the queries at or
  after it, so a pad query always sees itself (no all-masked softmax row, hence no NaN in a pad's
  K/V); real queries never see a later pad.
* Rollback: the row's columns at positions >= length become holes. No recomputation.
* Join: a new sequence takes the lowest free row (rows grow by doubling when none is free). When
  every row of a forward is empty (joiners only), it is written into the last columns in use
  instead of new ones, so admitting a prompt does not widen the batch.
* Leave: the row is freed (its columns invalid).
* Compaction, amortized: columns are left-packed (one gather per buffer) when holes take as many
  columns as the longest row holds, or when the buffer is full and a quarter is holes; rows are
  squeezed when at least half of them are free.

KV budget: `max_kv_tokens` bounds the tokens *held* (the sum of live rows' lengths, `kv_tokens`),
the number a scheduler can reason about, checked when a sequence is admitted (`check_admit`): a
refusal raises KVBudgetExceeded and changes nothing. Extending an admitted sequence is never
refused (the caller reserves headroom for its growth). The buffers (`allocated`) are larger than
what is held: rows < 2 x (rows in use) < 4 x live sequences (doubling; squeezed at half free),
columns < 2 x (2 x longest row + slack + widest forward) (doubling; compacted when holes reach the
longest row). When the last sequence leaves, the buffers go back to their initial size.

Why not transformers' PagedAttentionCache (generation.continuous_batching, 5.24): it has no
per-request rollback (a request's length is its scheduler's RequestState.position_offset; only
whole requests are freed), and its forward needs that manager's packed varlen inputs (cu_seq_lens,
read/write indices per allocator) and a "paged|..." attention implementation swapped into the model.

No ray, no grpc.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from workers.errors import KVBudgetExceeded


@dataclass(slots=True)
class Step:
    """One forward: the view's buffer rows (`sel`: a slice, or an index tensor for a gathered
    sub-batch), new tokens at columns [start, end)."""

    rows: list[int]  # buffer row of each view row
    sel: slice | torch.Tensor
    start: int
    end: int
    counts: list[int]  # new real tokens per view row (0: padding only)
    position_ids: torch.Tensor  # [len(rows), end - start]
    mask: torch.Tensor | None  # [len(rows), 1, N, end] bool, or None: a plain causal block

    def place(self) -> dict[int, int]:
        """Buffer row -> view row."""
        return {r: i for i, r in enumerate(self.rows)}


class _Layer(CacheLayerMixin):
    """What HF's attention sees of one layer: writes go to the shared buffers, at the step's
    window."""

    is_sliding = False

    def __init__(self, kv: BatchedKV, index: int) -> None:
        super().__init__()
        self.kv = kv
        self.index = index

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return self.kv._write(self.index, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.kv._step.end, 0

    def get_seq_length(self) -> int:
        step = self.kv._step
        return step.start if step is not None else 0

    def get_max_length(self) -> int:
        return -1


class BatchedKV:
    """Rows, columns, masks and budget of one worker's batched cache. Not thread-safe."""

    def __init__(
        self,
        num_layers: int,
        *,
        device: torch.device | str = "cpu",
        additive_mask: bool = False,
        max_positions: int | None = None,
        max_kv_tokens: int | None = None,
        rows: int = 4,
        columns: int = 64,
        slack: int = 64,
    ) -> None:
        if max_kv_tokens is not None and max_kv_tokens < 1:
            raise ValueError(f"max_kv_tokens must be >= 1, got {max_kv_tokens}")
        self.device = torch.device(device)
        self.additive_mask = additive_mask  # eager attention adds the mask; sdpa takes bools
        self.max_positions = max_positions
        self.max_kv_tokens = max_kv_tokens
        self.slack = slack  # holes always tolerated before a column compaction
        self.cache = Cache(layers=[_Layer(self, i) for i in range(num_layers)])
        self._k: list[torch.Tensor | None] = [None] * num_layers
        self._v: list[torch.Tensor | None] = [None] * num_layers
        self._init_caps = (rows, columns)
        self._row: dict[str, int] = {}
        self._reset(self._init_caps)  # buffers come with the first forward (heads from its K)
        self._free: list[int]  # a heap of free rows below _nrows
        self._nrows: int  # rows [0, _nrows) are in use or free
        self._cols: int  # columns [0, _cols) may hold tokens
        self._held = 0
        self._step: Step | None = None
        self._tril: dict[int, torch.Tensor] = {}

    # -- sequences ----------------------------------------------------------------------------

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._row

    @property
    def live_sequences(self) -> int:
        return len(self._row)

    @property
    def kv_tokens(self) -> int:
        return self._held

    @property
    def allocated(self) -> tuple[int, int]:
        """(rows, columns) of the buffers: memory = rows x columns x layers x 2 x heads x dim."""
        return self._rcap, self._ccap

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) in use: what a forward over every row would attend over."""
        return self._nrows, self._cols

    def ids(self) -> list[str]:
        return list(self._row)

    def length(self, seq_id: str) -> int:
        return self._len[self._get(seq_id)]

    def row(self, seq_id: str) -> int:
        return self._get(seq_id)

    def held(self, seq_id: str) -> int:
        row = self._row.get(seq_id)
        return 0 if row is None else self._len[row]

    def check_admit(self, tokens: int, freed: int = 0, pending: int = 0) -> None:
        """Raise KVBudgetExceeded if holding `tokens` more (after `freed` fewer, with `pending`
        already promised to earlier rows of the same call) would pass the budget."""
        if self.max_kv_tokens is None:
            return
        after = self._held + pending - freed + tokens
        if after > self.max_kv_tokens:
            raise KVBudgetExceeded(
                f"KV budget: {tokens} more tokens would hold {after} of {self.max_kv_tokens}"
            )

    @torch.inference_mode()  # the buffers are inference tensors (written in forwards)
    def create(self, seq_id: str) -> None:
        if seq_id in self._row:
            raise ValueError(f"sequence {seq_id!r} already holds a row")
        if self._free:
            row = heapq.heappop(self._free)
        else:
            if self._nrows == self._rcap:
                self._grow(2 * self._rcap, self._ccap)
            row = self._nrows
            self._nrows += 1
        self._row[seq_id] = row
        self._len[row] = 0

    @torch.inference_mode()
    def fork(self, source: str, seq_id: str, length: int) -> None:
        """A new sequence holding a copy of `source`'s first `length` positions (n samples of
        one prompt: the prompt is computed once). The caller checks the budget."""
        src = self._get(source)
        if not 0 <= length <= self._len[src]:
            raise ValueError(f"cannot fork {length} of a {self._len[src]}-token cache")
        self.create(seq_id)
        dst, c = self._row[seq_id], self._cols
        for bufs in (self._k, self._v):
            for buf in bufs:
                if buf is not None:
                    buf[dst, :, :c] = buf[src, :, :c]
        self.pos[dst, :c] = self.pos[src, :c]
        self.valid[dst, :c] = self.valid[src, :c] & (self.pos[src, :c] < length)
        self._len[dst] = length
        self._held += length

    @torch.inference_mode()
    def rollback(self, seq_id: str, length: int) -> None:
        """Forget every position >= length (holes). Rolling forward is an error."""
        row = self._get(seq_id)
        held = self._len[row]
        if length < 0 or length > held:
            raise ValueError(f"cannot roll back a {held}-token cache to {length}")
        if length < held:
            c = self._cols
            self.valid[row, :c] &= self.pos[row, :c] < length
            self._len[row] = length
            self._held -= held - length

    @torch.inference_mode()
    def release(self, seq_id: str) -> bool:
        row = self._row.pop(seq_id, None)
        if row is None:
            return False
        self.valid[row, : self._cols] = False
        self._held -= self._len[row]
        self._len[row] = 0
        heapq.heappush(self._free, row)
        while self._free and self._nrows and self._free_top():
            pass
        if not self._row:  # idle: give the memory of a burst back
            self._reset(self._init_caps)
        return True

    def _reset(self, caps: tuple[int, int]) -> None:
        rows, cols = caps
        self._k = [None] * len(self._k)
        self._v = [None] * len(self._v)
        self._rcap, self._ccap = rows, cols
        self.valid = torch.zeros(rows, cols, dtype=torch.bool, device=self.device)
        self.pos = torch.zeros(rows, cols, dtype=torch.long, device=self.device)
        self._len = [0] * rows
        self._free, self._nrows, self._cols = [], 0, 0

    def _free_top(self) -> bool:
        """Drop the top row when it is free (keeps the used range tight); True if one went."""
        top = self._nrows - 1
        if top not in self._free:
            return False
        self._free.remove(top)
        heapq.heapify(self._free)
        self._nrows = top
        return True

    def _get(self, seq_id: str) -> int:
        try:
            return self._row[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}") from None

    # -- one forward ----------------------------------------------------------------------------

    @torch.inference_mode()
    def begin(self, items: list[tuple[str, int]]) -> Step:
        """Plan a forward of n_i >= 1 new tokens for each (live) seq_id.

        The view is the contiguous rows from the first to the last named one (rows in between
        ride along as padding: no copy), or, when that span is mostly rows not named, just the
        named rows, gathered (a copy of their KV, cheaper than the padding's compute)."""
        width = max(n for _, n in items)
        self._maybe_compact(width)
        named = sorted(self._row[s] for s, _ in items)
        lo, hi = named[0], named[-1] + 1
        if hi - lo >= 2 * len(named) + 2:
            rows: list[int] = named
            sel: slice | torch.Tensor = torch.tensor(named, device=self.device)
        else:
            rows, sel = list(range(lo, hi)), slice(lo, hi)
        lens = [self._len[r] for r in rows]
        if not any(lens):  # joiners only: reuse the last columns in use, do not widen
            end = max(self._cols, width)
            start = end - width
        else:
            start, end = self._cols, self._cols + width
        if end > self._ccap:
            cap = self._ccap
            while cap < end:
                cap *= 2
            self._grow(self._rcap, cap)
        place = {r: i for i, r in enumerate(rows)}
        counts = [0] * len(rows)
        for sid, n in items:
            counts[place[self._row[sid]]] = n
        ar = torch.arange(width, device=self.device)
        position_ids = torch.tensor(lens, device=self.device)[:, None] + ar
        if self.max_positions is not None:  # pads only: real tokens are checked by the caller
            position_ids.clamp_(max=self.max_positions - 1)
        plain = all(n == width for n in counts) and all(x == start for x in lens)
        mask = None if plain else self._mask(sel, len(rows), start, width)
        self._step = Step(rows, sel, start, end, counts, position_ids, mask)
        return self._step

    @torch.inference_mode()
    def finish(self, step: Step) -> None:
        """After the forward: real new columns valid, pads holes, lengths advanced."""
        sel, s, e = step.sel, step.start, step.end
        counts = torch.tensor(step.counts, device=self.device)
        self.valid[sel, s:e] = torch.arange(e - s, device=self.device)[None, :] < counts[:, None]
        self.pos[sel, s:e] = step.position_ids
        for r, n in zip(step.rows, step.counts, strict=True):
            self._len[r] += n
        self._held += sum(step.counts)
        self._cols = max(self._cols, e)
        self._step = None

    def abort(self) -> None:
        """The forward failed: whatever it wrote is in columns nobody marked valid."""
        self._step = None

    def _mask(self, sel: slice | torch.Tensor, b: int, start: int, width: int) -> torch.Tensor:
        old = self.valid[sel, :start][:, None, None, :].expand(b, 1, width, start)
        tril = self._tril.get(width)
        if tril is None:
            tril = torch.ones(width, width, dtype=torch.bool, device=self.device).tril_()
            if width <= 64:  # verify-sized blocks recur every step; prompts do not
                self._tril[width] = tril
        mask = torch.cat([old, tril.expand(b, 1, width, width)], dim=-1)
        if self.additive_mask:
            zero = torch.zeros((), dtype=torch.float32, device=self.device)
            mask = torch.where(mask, zero, torch.finfo(torch.float32).min)
        return mask

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        step = self._step
        if step is None:
            raise RuntimeError("BatchedKV: a forward ran outside begin()/finish()")
        kb, vb = self._k[layer], self._v[layer]
        if kb is None:
            kb = self._k[layer] = self._alloc(k, self._rcap, self._ccap)
            vb = self._v[layer] = self._alloc(v, self._rcap, self._ccap)
        sel, s, e = step.sel, step.start, step.end
        kb[sel, :, s:e] = k
        vb[sel, :, s:e] = v
        return kb[sel, :, :e], vb[sel, :, :e]  # a gathered view copies (after the write)

    def window(self, step: Step) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """Every layer's K and V buffers, for a forward that writes and reads them itself at the
        step's rows and columns (a compiled one: workers/lean_forward.KVWindow), or None where
        it cannot: the buffers come with the first forward, and a gathered row set is a copy."""
        if not isinstance(step.sel, slice) or any(b is None for b in self._k):
            return None
        return self._k, self._v  # type: ignore[return-value]

    @staticmethod
    def _alloc(like: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        _, heads, _, dim = like.shape
        return torch.zeros(rows, heads, cols, dim, dtype=like.dtype, device=like.device)

    # -- capacity and compaction --------------------------------------------------------------

    def _grow(self, rows: int, cols: int) -> None:
        r, c = self._nrows, self._cols
        for bufs in (self._k, self._v):
            for i, old in enumerate(bufs):
                if old is not None:
                    new = old.new_zeros(rows, old.shape[1], cols, old.shape[3])
                    new[:r, :, :c] = old[:r, :, :c]
                    bufs[i] = new
        valid = torch.zeros(rows, cols, dtype=torch.bool, device=self.device)
        pos = torch.zeros(rows, cols, dtype=torch.long, device=self.device)
        valid[:r, :c] = self.valid[:r, :c]
        pos[:r, :c] = self.pos[:r, :c]
        self.valid, self.pos = valid, pos
        self._len += [0] * (rows - self._rcap)
        self._rcap, self._ccap = rows, cols

    def _maybe_compact(self, width: int) -> None:
        if self._free and len(self._free) * 2 >= self._nrows:
            self.compact_rows()
        longest = max((self._len[r] for r in self._row.values()), default=0)
        holes = self._cols - longest
        full = self._cols + width > self._ccap
        if holes >= max(self.slack, longest) or (full and holes * 4 >= self._cols):
            self.compact_columns()

    @torch.inference_mode()
    def compact_rows(self) -> None:
        """Move the live rows to [0, live), in row order; free rows vanish."""
        order = sorted(self._row.items(), key=lambda kv: kv[1])
        src = [r for _, r in order]
        n, c = len(src), self._cols
        if src == list(range(n)):
            self._free, self._nrows = [], n
            return
        idx = torch.tensor(src, device=self.device)
        for bufs in (self._k, self._v):
            for buf in bufs:
                if buf is not None:
                    buf[:n, :, :c] = buf[:, :, :c].index_select(0, idx)
        self.valid[:n, :c] = self.valid[:, :c].index_select(0, idx)
        self.pos[:n, :c] = self.pos[:, :c].index_select(0, idx)
        self.valid[n : self._nrows] = False
        lens = [self._len[r] for r in src]
        self._len[: self._nrows] = [0] * self._nrows
        self._len[:n] = lens
        self._row = {sid: i for i, (sid, _) in enumerate(order)}
        self._free, self._nrows = [], n

    @torch.inference_mode()
    def compact_columns(self) -> None:
        """Left-pack every row's valid columns (in position order: columns only ever grow with
        positions); column j of a row then holds its position j."""
        r, c = self._nrows, self._cols
        width = max((self._len[i] for i in range(r)), default=0)
        if r == 0 or width == c:
            return
        keys = (~self.valid[:r, :c]).to(torch.uint8)
        idx = torch.sort(keys, dim=1, stable=True).indices[:, :width]  # valid columns first
        for bufs in (self._k, self._v):
            for buf in bufs:
                if buf is not None:
                    h, d = buf.shape[1], buf.shape[3]
                    at = idx[:, None, :, None].expand(r, h, width, d)
                    buf[:r, :, :width] = buf[:r, :, :c].gather(2, at)
        lens = torch.tensor(self._len[:r], device=self.device)
        ar = torch.arange(width, device=self.device)
        self.valid[:r, :c] = False
        self.valid[:r, :width] = ar[None, :] < lens[:, None]
        self.pos[:r, :width] = ar
        self._cols = width
