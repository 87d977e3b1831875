"""Building blocks of the scene encoder: transformer blocks on scaled_dot_product_attention,
1-D neighbourhood attention in plain PyTorch, the agent history encoder (NAT + FPN) and the
lane PointNet. Shapes: B batch, N actors, M lanes, T time steps, L tokens, C/D channels."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from forecast_peft.models.choices import check_attention_kernel

_traced_forms = False  # set by traced_forms()


@contextmanager
def traced_forms() -> Iterator[None]:
    """Eager code in the forms torch.compile and torch.export trace: the windowed neighbourhood
    attention and the agent encoder's convolutions as products over their taps. Their values
    equal the eager forms' to float rounding, but in bfloat16 that rounding is centimetres: an
    exported program is checked against its network in these forms (``forecast_peft.deploy``)."""
    global _traced_forms  # noqa: PLW0603 - one switch for every layer, as torch.compile's own
    before, _traced_forms = _traced_forms, True
    try:
        yield
    finally:
        _traced_forms = before


def traced_form(explicit: bool | None) -> bool:
    """A layer's form: ``explicit`` where given, else the traced one when compiling or exporting,
    or inside ``traced_forms``."""
    return explicit if explicit is not None else _traced_forms or torch.compiler.is_compiling()


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability p."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor, packing: Packing | None = None) -> torch.Tensor:
        """x [B, ...], or the packed tokens [T, C] of ``packing``'s rows (one draw per row)."""
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty(x.shape[0] if packing is None else packing.rows).bernoulli_(keep)
        if packing is not None:
            mask = mask[packing.index // packing.length]
        return x * mask.view((-1,) + (1,) * (x.ndim - 1)) / keep


def head_output(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``head(x)`` outside autocast, in the dtype of the head's weights: float32 in bf16-mixed
    training and bf16 evaluation, bfloat16 in bf16-true. The heads give positions in metres and
    mode logits. bfloat16 keeps 8 significant bits, so under autocast a predicted endpoint 64-128 m
    away would land on a 0.5 m grid: for endpoints 80-160 m away and a 1.4 m error that adds
    0.4-1.7% to FDE and up to 6% to the miss rate. The heads are a small share of the work."""
    with torch.autocast(x.device.type, enabled=False):
        return head(x.to(next(head.parameters()).dtype))


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out or dim))


def take_tokens(x: torch.Tensor, queries: tuple[int, ...]) -> torch.Tensor:
    """The tokens at positions ``queries`` of x [B, L, D] as [B, Q, D]: slices and one cat, so no
    index tensor is built on the host and copied to the device. Slices, not ``x[:, i]``: under
    torch.compile a position that depends on the batch's shape (the focal future token's, after
    the N actor slots) stays symbolic in a slice, where ``x[:, i]`` would fix it, and with it N:
    every new number of actor slots would compile the model again."""
    return torch.cat([x[:, i : i + 1] for i in queries], dim=1)


def pair_tokens(prefix: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """Every (context, prefix) pair as one sequence: prefix [K, P, X] and ctx [B, L, X] ->
    [B * K, P + L, X], row b * K + k = cat[prefix[k], ctx[b]], in ctx's dtype."""
    k, p, _ = prefix.shape
    b, length, x = ctx.shape
    pairs = torch.cat([prefix[None].expand(b, -1, -1, -1).to(ctx.dtype), ctx[:, None].expand(-1, k, -1, -1)], dim=2)
    return pairs.reshape(b * k, p + length, x)


class Packing(NamedTuple):
    """The real tokens of a padded [R, L] token layout: their flat indices ``index`` [T] (into
    R * L, computed on the device; T is known on the host; in row-major order, so that each row's
    tokens lie together) and the layout's ``rows`` and ``length``. Per-token work (norms,
    projections, MLPs, adapters) runs on the packed [T, C] tokens only; attention unpacks them
    into the padded layout, padding rows zero (or, held to ``varlen``, runs on them as they are)."""

    index: torch.Tensor
    rows: int
    length: int

    def starts(self) -> torch.Tensor:
        """Where each row's tokens start among the packed ones, and their number at the end:
        [R + 1] int32 (the cumulative lengths of variable-length attention)."""
        bounds = torch.arange(self.rows + 1, device=self.index.device) * self.length
        return torch.searchsorted(self.index, bounds).to(torch.int32)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[R, L, ...] -> [T, ...]."""
        return x.reshape(self.rows * self.length, *x.shape[2:]).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [R, L, ...], zeros in the padding slots."""
        out = x.new_zeros(self.rows * self.length, *x.shape[1:]).index_copy(0, self.index, x)
        return out.view(self.rows, self.length, *x.shape[1:])

    def select(self, positions: tuple[int, ...], *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The tokens at layout ``positions`` of every row, from each packed x [T, ...] of ``xs``:
        [R, Q, ...] (zeros at padding slots), as ``take_tokens(unpack(x), positions)`` without the
        padded copy; the slot map is built once for all of them."""
        slot = torch.full((self.rows * self.length,), -1, dtype=self.index.dtype, device=self.index.device)
        slot.index_copy_(0, self.index, torch.arange(self.index.shape[0], device=self.index.device))
        where = take_tokens(slot.view(self.rows, self.length), positions).reshape(-1)  # [R * Q] packed rows
        found, real = where.clamp(min=0), where >= 0
        out = []
        for x in xs:
            picked = x.index_select(0, found) * real.to(x.dtype).view(-1, *(1,) * (x.ndim - 1))
            out.append(picked.view(self.rows, len(positions), *x.shape[1:]))
        return tuple(out)


def pick_tokens(positions: tuple[int, ...], packing: Packing | None, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tokens at ``positions`` of each x [B, L, D] of ``xs``, or of each packed x [T, D] of
    ``packing``: [B, Q, D] each."""
    return tuple(take_tokens(x, positions) for x in xs) if packing is None else packing.select(positions, *xs)


def varlen_attention(q, k, v, starts_q, starts_k, max_q: int, max_k: int) -> torch.Tensor:
    """Attention of packed queries q [Tq, H, d] over packed keys and values [Tk, H, d], row r
    being queries starts_q[r]:starts_q[r + 1] over keys starts_k[r]:starts_k[r + 1]; ``max_q``,
    ``max_k``: bounds on a row's lengths. On CUDA torch's ``varlen_attn`` (torch 2.10 on); on
    other devices the same values from one dense masked attention over all the tokens, which is
    quadratic in them (for tests, not for real batches)."""
    if q.is_cuda:
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, starts_q, starts_k, max_q, max_k)
    row_q = torch.searchsorted(starts_q, torch.arange(q.shape[0], device=q.device, dtype=starts_q.dtype), right=True)
    row_k = torch.searchsorted(starts_k, torch.arange(k.shape[0], device=k.device, dtype=starts_k.dtype), right=True)
    mask = row_q[:, None] == row_k[None, :]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
    return out.transpose(0, 1)


def set_attention_kernel(model: nn.Module, kernel: str) -> None:
    """Hold every transformer attention of ``model`` to ``kernel`` (``ATTENTION_KERNELS``): the
    same values, another GPU kernel (session 26: cuDNN's took a third of an H200's inference
    time). A setting of the run, not of the checkpoint."""
    check_attention_kernel(kernel)
    for module in model.modules():
        if isinstance(module, SelfAttention):
            module.kernel = kernel


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend: torch.Tensor | None, kernel: str):
    """Attention of q [B, H, Q, d] over k, v [B, H, L, d] where ``attend`` [B, L] (None: all keys),
    on ``kernel`` (``ATTENTION_KERNELS``): [B, H, Q, d]."""
    if kernel == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block_mask = None
        if attend is not None:

            def keep(b, h, query, key):
                return attend[b, key]

            block_mask = create_block_mask(keep, q.shape[0], None, q.shape[2], k.shape[2], device=q.device)
        return flex_attention(q, k, v, block_mask=block_mask)
    mask = None if attend is None else attend[:, None, None, :]  # [B, 1, 1, L]
    if kernel == "auto":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}.get(
        kernel, SDPBackend.MATH
    )
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def with_memory(kv: torch.Tensor, memory_kv: torch.Tensor | None, packing: Packing, starts: torch.Tensor):
    """Packed keys and values [T, 2D] with ``memory_kv`` [P, 2D] (keys and values every row attends
    to, such as the context prompts') after each row's own: ([T + R * P, 2D], their row starts
    [R + 1], a bound on a row's keys). Without memory, ``kv`` and ``starts`` as they are."""
    if memory_kv is None:
        return kv, starts, packing.length
    p, rows, device = memory_kv.shape[0], packing.rows, kv.device
    # row r's keys: its real tokens from starts[r] + r * P on, then the P memory tokens
    own = torch.arange(kv.shape[0], device=device) + p * (packing.index // packing.length)
    shared = (starts[1:].long() + p * torch.arange(rows, device=device))[:, None] + torch.arange(p, device=device)
    memory = memory_kv.to(kv.dtype).expand(rows, -1, -1).reshape(rows * p, -1)
    merged = kv.new_zeros(kv.shape[0] + rows * p, kv.shape[1]).index_copy(0, own, kv)
    merged = merged.index_copy(0, shared.reshape(-1), memory)
    return merged, starts + p * torch.arange(rows + 1, device=device, dtype=starts.dtype), packing.length + p


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused in-projection (with biases, like nn.MultiheadAttention).

    ``folded`` > 0: a parallel adapter (down, GELU, up) that reads the attention's input sits
    inside this module (``peft.fold.fold_adapters``): its down projection's rows follow the
    query rows of ``qkv`` ([queries, adapter, keys, values]) and its up projection's columns
    follow ``proj``'s, so the adapter costs no matrix product of its own."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.folded = 0
        self.kernel = "auto"  # ``set_attention_kernel``

    def project(self, x: torch.Tensor, part: slice) -> torch.Tensor:
        """A slice of the in-projection's output rows (``rows()``)."""
        bias = self.qkv.bias
        return F.linear(x, self.qkv.weight[part], None if bias is None else bias[part])

    def rows(self) -> tuple[slice, slice]:
        """The in-projection's rows that give the queries (with a folded adapter's hidden units
        after them) and those that give the keys and values."""
        d = self.proj.out_features
        return slice(None, d + self.folded), slice(d + self.folded, None)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The in-projection's output [..., 3D (+ folded)] as queries, the folded adapter's
        hidden units (None without one) and keys and values."""
        d = self.proj.out_features
        if not self.folded:  # no zero-width piece in the graph torch.compile traces
            q, kv = y.split([d, 2 * d], dim=-1)
            return q, None, kv
        q, hidden, kv = y.split([d, self.folded, 2 * d], dim=-1)
        return q, hidden, kv

    def output(self, out: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
        """The output projection of the attention's result (and of the folded adapter's GELU of
        its ``hidden`` units, in one matrix product)."""
        return self.proj(out if hidden is None else torch.cat([out, F.gelu(hidden)], dim=-1))

    def forward(
        self,
        x: torch.Tensor,
        attend: torch.Tensor | None = None,
        queries: torch.Tensor | None = None,
        memory_kv: torch.Tensor | None = None,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """x [B, L, D]; attend [B, L] True for tokens that may be attended to; ``queries``
        [B, Q, D] (some of x's tokens, picked by the caller) limits the outputs to those tokens:
        [B, Q, D]. ``memory_kv`` [P, 2D]: the keys and values of tokens shared by every sample
        that are always attended to but give no output (projected once, not once per sample).
        With ``packing``, x holds the real tokens [T, D] of the padded layout it describes, and
        so does the output (or [R, Q, D])."""
        query_rows, kv_rows = self.rows()
        if queries is None:
            y = self.qkv(x)
            q, hidden, kv = self.split(y)  # ``hidden`` stays packed like x, as the output is
            if self.runs_packed(packing, y):  # attention on the real tokens as they are
                starts = packing.starts()
                kv, starts_k, max_k = with_memory(kv, memory_kv, packing, starts)
                return self.output(self.mix_packed(q, kv, starts, starts_k, packing.length, max_k), hidden)
            if packing is not None:  # attention runs on the padded layout
                q, _, kv = self.split(packing.unpack(y))
        else:
            d = self.proj.out_features
            qh = self.project(queries, query_rows)
            q, hidden = qh[..., :d], (qh[..., d:] if self.folded else None)
            kv = self.project(x, kv_rows)
            if self.runs_packed(packing, kv):  # each row's Q queries over its real tokens
                r, n = q.shape[:2]
                starts_q = torch.arange(r + 1, device=q.device, dtype=torch.int32) * n
                kv, starts_k, max_k = with_memory(kv, memory_kv, packing, packing.starts())
                out = self.mix_packed(q.reshape(r * n, d), kv, starts_q, starts_k, n, max_k)
                return self.output(out.view(r, n, d), hidden)
            kv = kv if packing is None else packing.unpack(kv)
        b = kv.shape[0]
        if memory_kv is not None:
            kv = torch.cat([kv, memory_kv.expand(b, -1, -1).to(kv.dtype)], dim=1)
            if attend is not None:
                attend = torch.cat([attend, attend.new_ones(b, memory_kv.shape[0])], dim=1)
        out = self.mix(q, kv, attend)
        return self.output(out if packing is None or queries is not None else packing.pack(out), hidden)

    def mix(self, q: torch.Tensor, kv: torch.Tensor, attend: torch.Tensor | None) -> torch.Tensor:
        """Projected queries [B, Q, D] over projected keys and values [B, L, 2D] (attend [B, L]
        or None), before the output projection: [B, Q, D]."""
        b, length, d = kv.shape[0], kv.shape[1], q.shape[-1]
        h = self.num_heads
        q = q.reshape(b, -1, h, d // h).transpose(1, 2)  # [B, H, Q, d]
        k, v = kv.reshape(b, length, 2, h, d // h).permute(2, 0, 3, 1, 4)  # [B, H, L, d] each
        out = attention(q, k, v, attend, "auto" if self.kernel == "varlen" else self.kernel)
        return out.transpose(1, 2).reshape(b, -1, d)

    def runs_packed(self, packing: Packing | None, projected: torch.Tensor) -> bool:
        """Whether attention runs on the packed real tokens of ``packing`` as they are: held to
        ``varlen``, on projections its kernel takes (FlashAttention's wants bf16 or fp16 on a GPU;
        elsewhere the dense stand-in takes any)."""
        if packing is None or self.kernel != "varlen":
            return False
        return not projected.is_cuda or projected.dtype in (torch.bfloat16, torch.float16)

    def mix_packed(self, q, kv, starts_q, starts_k, max_q: int, max_k: int) -> torch.Tensor:
        """``mix`` on packed tokens: queries [Tq, D] over keys and values [Tk, 2D], rows delimited
        by ``starts_q`` and ``starts_k`` (``Packing.starts``): [Tq, D]."""
        d, h = q.shape[-1], self.num_heads
        k, v = kv.reshape(-1, 2, h, d // h).unbind(1)
        out = varlen_attention(q.reshape(-1, h, d // h), k, v, starts_q, starts_k, max_q, max_k)
        return out.reshape(-1, d)


class Block(nn.Module):
    """Pre-norm transformer block. PEFT may attach parallel adapters (``adapter_attn``,
    ``adapter_mlp``) that read the same normalised input as the branch they sit beside."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        self.adapter_attn: nn.Module | None = None
        self.adapter_mlp: nn.Module | None = None

    def forward(
        self,
        x: torch.Tensor,
        attend: torch.Tensor | None = None,
        queries: tuple[int, ...] | None = None,
        memory: torch.Tensor | None = None,
        packing: Packing | None = None,
        memory_kv: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, L, D] -> [B, L, D], or [B, Q, D] for the ``queries`` token positions only.
        ``memory`` [P, D]: tokens of every sample that are attended to but dropped afterwards
        (the result equals running the block on cat[x, memory] and keeping the first L tokens);
        or ``memory_kv``, their keys and values (``memory_keys_values``) computed before.
        ``packing``: x is the packed real tokens [T, D] of a padded layout, and so is the output
        (unless ``queries``); the real tokens' values are those of the padded form."""
        h = self.norm1(x)
        if memory is not None:
            memory_kv = self.memory_keys_values(memory)
        picked = None
        if queries is not None:  # the residual's tokens too, while the slot map is at hand
            x, picked = pick_tokens(queries, packing, x, h)
        a = self.attn(h, attend, picked, memory_kv, packing)
        if queries is not None:
            h, packing = picked, None
        if self.adapter_attn is not None:
            a = a + self.adapter_attn(h)
        return self.mlp_half(x, a, packing)

    def memory_keys_values(self, memory: torch.Tensor) -> torch.Tensor:
        """The keys and values [P, 2D] through which memory tokens [P, D] are attended to."""
        # functional: ``memory`` is usually a view of a parameter, which module hooks that track
        # autograd (torch.utils.flop_counter's) cannot take under no_grad
        n1 = self.norm1
        h = F.layer_norm(memory, n1.normalized_shape, n1.weight, n1.bias, n1.eps)
        return self.attn.project(h, self.attn.rows()[1])

    def prefix_projection(self, prefix: torch.Tensor) -> torch.Tensor:
        """The in-projection [K, P, 3D (+ folded)] of ``forward_pairs``' prefix tokens [K, P, D]."""
        return self.attn.qkv(self.norm1(prefix))

    def forward_pairs(
        self,
        prefix: torch.Tensor,
        ctx: torch.Tensor,
        attend: torch.Tensor,
        queries: tuple[int, ...] | None = None,
        packing: Packing | None = None,
        prefix_qkv: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``forward`` over every (context, prefix) pair: prefix [K, P, D], ctx [B, L, D], attend
        [B * K, P + L] -> [B * K, P + L, D] (or [B * K, Q, D]), row b * K + k being
        forward(cat[prefix[k], ctx[b]]). The per-token work before attention (LayerNorm, the
        in-projection, the attention adapter) runs once per prefix and once per context instead
        of once per pair. ``packing`` (of the pairs' [B * K, P + L] layout, without ``queries``):
        the work after attention runs on the real tokens only and the output is packed [T, D].
        ``prefix_qkv``: the prefix's ``prefix_projection``, computed before."""
        hc = self.norm1(ctx)
        hp = self.norm1(prefix) if prefix_qkv is None or self.adapter_attn is not None else None
        prefix_qkv = self.attn.qkv(hp) if prefix_qkv is None else prefix_qkv
        q, side, kv = self.attn.split(pair_tokens(prefix_qkv, self.attn.qkv(hc)))
        x = pair_tokens(prefix, ctx)
        # ``side``, per token: a folded adapter's hidden units, or the output of an adapter of its own
        if self.adapter_attn is not None:
            side = pair_tokens(self.adapter_attn(hp), self.adapter_attn(hc))
        if queries is not None:
            packing = None
            q, x = take_tokens(q, queries), take_tokens(x, queries)
            side = None if side is None else take_tokens(side, queries)
        if self.attn.runs_packed(packing, kv):
            starts = packing.starts()  # the pairs' real tokens, packed before attention
            q, kv, x = packing.pack(q), packing.pack(kv), packing.pack(x)
            side = None if side is None else packing.pack(side)
            out = self.attn.mix_packed(q, kv, starts, starts, packing.length, packing.length)
        else:
            out = self.attn.mix(q, kv, attend)
            if packing is not None:
                out, x = packing.pack(out), packing.pack(x)
                side = None if side is None else packing.pack(side)
        a = self.attn.output(out, side) if self.adapter_attn is None else self.attn.proj(out) + side
        return self.mlp_half(x, a, packing)

    def mlp_half(self, x: torch.Tensor, a: torch.Tensor, packing: Packing | None = None) -> torch.Tensor:
        """The attention branch's residual, then the MLP branch (with its adapter)."""
        x = x + self.drop_path(a, packing)
        h = self.norm2(x)
        m = self.mlp(h)
        if self.adapter_mlp is not None:
            m = m + self.adapter_mlp(h)
        return x + self.drop_path(m, packing)


def window_starts(length: int, kernel: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query step [T] and the first key step of its window of ``kernel`` steps, shifted
    inwards at the borders [T]."""
    q = torch.arange(length, device=device)
    return q, (q - kernel // 2).clamp(0, max(length - kernel, 0))


def neighbourhood_window(length: int, kernel: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """For 1-D neighbourhood attention over ``length`` steps: which keys each query sees
    ([T, T] bool; windows of ``kernel`` steps, shifted inwards at the borders) and the index of
    the relative-position bias of each pair ([T, T] long, key - query + kernel - 1)."""
    q, start = window_starts(length, kernel, device)
    k = torch.arange(length, device=device)
    inside = (k[None, :] >= start[:, None]) & (k[None, :] < start[:, None] + kernel)
    rel = (k[None, :] - q[:, None] + kernel - 1).clamp(0, 2 * kernel - 2)
    return inside, rel


def neighbourhood_keys(length: int, kernel: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same windows as ``neighbourhood_window``, listed: the key steps of each query's window
    ([T, W], W = min(kernel, T)) and the relative-position-bias index of each ([T, W])."""
    q, start = window_starts(length, kernel, device)
    keys = start[:, None] + torch.arange(min(kernel, length), device=device)
    return keys, keys - q[:, None] + kernel - 1


class NeighbourhoodAttention1D(nn.Module):
    """Each step attends to the ``kernel`` steps around it, with a learned relative-position
    bias per head (the NATTEN formulation).

    Two forms of the same values: uncompiled, all T x T query-key pairs as matrix products with
    the pairs outside the windows masked (the fastest eager form on a CPU); under torch.compile,
    each query with the W keys of its window only, gathered (no T x T logits: inductor fuses it
    into a few elementwise kernels where the matrix form launched batched products that cuBLAS
    ran with old WMMA kernels on an H200, 1.0 ms of a 13.1 ms inference step; compiled on this
    project's CPU, 2.3 and 1.7 times faster at T = 50 and 25, level at 13)."""

    def __init__(self, dim: int, num_heads: int, kernel: int):
        super().__init__()
        self.num_heads = num_heads
        self.kernel = kernel
        self.qkv = nn.Linear(dim, 3 * dim)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel - 1))
        nn.init.trunc_normal_(self.rpb, std=0.02)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, windowed: bool | None = None) -> torch.Tensor:
        """x [B, T, C] -> [B, T, C]. ``windowed``: the form (None: ``traced_form``)."""
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        scale = q.shape[-1] ** -0.5
        if traced_form(windowed):
            keys, rel = neighbourhood_keys(t, self.kernel, x.device)
            logits = (q[:, :, :, None, :] * k[:, :, keys]).sum(-1) * scale  # [B, H, T, W]
            out = ((logits + self.rpb[:, rel].to(q.dtype)).softmax(dim=-1)[..., None] * v[:, :, keys]).sum(-2)
        else:
            inside, rel = neighbourhood_window(t, self.kernel, x.device)
            bias = self.rpb[:, rel].masked_fill(~inside, float("-inf")).to(x.dtype)  # [H, T, T]
            # explicit attention: sequences are short (T <= 50), and an additive bias of a broadcast
            # shape trips the fused kernels' stride rules under torch.compile
            logits = (q @ k.transpose(-1, -2)) * scale + bias  # [B, H, T, T]
            out = logits.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


class NATLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, kernel: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = NeighbourhoodAttention1D(dim, num_heads, kernel)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Downsample(nn.Module):
    """Stride-2 convolution doubling the channels, then LayerNorm: [B, T, C] -> [B, ceil(T/2), 2C]."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Conv1d(dim, 2 * dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x: torch.Tensor, taps: bool = False) -> torch.Tensor:
        """``taps``: the convolution as a matrix product over its taps (``conv1d_taps``)."""
        if taps:
            return self.norm(conv1d_taps(x, self.reduction))
        return self.norm(self.reduction(x.transpose(1, 2)).transpose(1, 2))


def interpolation_taps(t_in: int, t_out: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear interpolation (align_corners=False) from t_in to t_out steps: each output step's two
    input steps and the second one's weight ([T_out] each)."""
    src = ((torch.arange(t_out, device=device, dtype=torch.float32) + 0.5) * (t_in / t_out) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=t_in - 1)
    i1 = (i0 + 1).clamp(max=t_in - 1)
    return i0, i1, src - i0


def upsample_steps(x: torch.Tensor, length: int, last: int | None = None) -> torch.Tensor:
    """Linear interpolation of channels-last x [B, T, C] to ``length`` steps (align_corners=False),
    or to its ``last`` steps only: [B, length or last, C], as a gather and a blend that inductor
    fuses with what follows."""
    i0, i1, w = interpolation_taps(x.shape[1], length, x.device)
    if last is not None:
        i0, i1, w = i0[-last:], i1[-last:], w[-last:]
    w = w.to(x.dtype)[:, None]
    return x[:, i0] * (1 - w) + x[:, i1] * w


def interpolation_matrix(t_in: int, t_out: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[T_in, T_out] weights of linear interpolation (align_corners=False) from t_in to t_out steps."""
    i0, i1, w = interpolation_taps(t_in, t_out, device)
    m = torch.zeros(t_in, t_out, device=device, dtype=torch.float32)  # whatever the default dtype (bf16-true)
    cols = torch.arange(t_out, device=device)
    m.index_put_((i0, cols), 1 - w, accumulate=True)
    m.index_put_((i1, cols), w, accumulate=True)
    return m.to(dtype)


def upsample_linear(x: torch.Tensor, length: int) -> torch.Tensor:
    """Linear interpolation along the last axis to ``length`` (align_corners=False) as one small
    matrix product: forward and backward are GEMMs, much faster on GPUs than F.interpolate's
    backward or a gather's scatter-add backward. x [B, C, T]."""
    return x @ interpolation_matrix(x.shape[-1], length, x.device, x.dtype)


def conv1d_taps(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """``conv`` (a Conv1d) on channels-last x [B, T, C] -> [B, T', C'] as one matrix product over
    the kernel's taps (its shifted, strided copies of x side by side): no change of layout around
    it, which cuDNN's bf16 convolutions on channels-first tokens made (0.35 ms of layout transposes
    beside 0.5 ms of convolution in an H200's 13.1 ms inference step)."""
    k, stride, pad = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    steps = (x.shape[1] + 2 * pad - k) // stride + 1
    padded = F.pad(x, (0, 0, pad, pad))
    taps = torch.cat([padded[:, j : j + stride * (steps - 1) + 1 : stride] for j in range(k)], dim=-1)
    return F.linear(taps, conv.weight.permute(0, 2, 1).reshape(conv.out_channels, -1), conv.bias)


class AgentEncoder(nn.Module):
    """Agent history encoder: conv tokenizer, three levels of neighbourhood-attention blocks with
    stride-2 downsampling, an FPN back to full resolution; the last step is the actor token (so
    the full-resolution FPN outputs are computed at the last steps only).

    Input [B, C_in, T] (per-step features over the history); output [B, widths[-1]].

    Two forms of the same values: uncompiled, channels-first convolutions (the eager form); under
    torch.compile, ``forward_taps``: every convolution a matrix product on channels-last tokens,
    the tokens' layout never changed.
    """

    def __init__(self, in_channels: int, widths, depths, heads, kernels, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.tokenizer = nn.Conv1d(in_channels, widths[0], kernel_size=3, padding=1)
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()
        self.levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        self.out_norms = nn.ModuleList()
        r = 0
        for i, (dim, depth, h, k) in enumerate(zip(widths, depths, heads, kernels)):
            self.levels.append(nn.ModuleList(NATLayer(dim, h, k, mlp_ratio, rates[r + j]) for j in range(depth)))
            r += depth
            if i < len(widths) - 1:
                self.downsamples.append(Downsample(dim))
            self.out_norms.append(nn.LayerNorm(dim))
        out = widths[-1]
        self.laterals = nn.ModuleList(nn.Conv1d(w, out, kernel_size=3, padding=1) for w in widths)
        self.fpn = nn.Conv1d(out, out, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, taps: bool | None = None) -> torch.Tensor:
        """x [B, C_in, T] -> [B, widths[-1]]; ``taps``: the form (None: ``traced_form``, whether
        ``forward_taps``)."""
        if traced_form(taps):
            return self.forward_taps(x)
        feats = [f.transpose(1, 2) for f in self.level_features(self.tokenizer(x).transpose(1, 2))]  # [B, Ci, Ti]
        # FPN top-down over the coarser levels, at their full (short) lengths
        lat = [conv(f) for conv, f in zip(self.laterals[1:], feats[1:])]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + upsample_linear(lat[i], lat[i - 1].shape[-1])
        # the finest level only where the output needs it: the last step's 3-tap convolution
        # reads steps T-2 and T-1 (and zero padding), and their lateral reads steps T-3..T-1
        t = feats[0].shape[-1]
        top = self.laterals[0](feats[0][..., -3:])[..., -2:]  # [B, C, 2]
        if lat:
            top = top + lat[0] @ interpolation_matrix(lat[0].shape[-1], t, top.device, lat[0].dtype)[:, -2:]
        return F.conv1d(F.pad(top, (0, 1)), self.fpn.weight, self.fpn.bias)[..., 0]

    def level_features(self, x: torch.Tensor, taps: bool = False) -> list[torch.Tensor]:
        """The levels' normalised outputs [B, Ti, Ci] from the tokenised steps x [B, T, C0], each
        level downsampled into the next (``taps``: as in ``forward_taps``)."""
        feats = []
        for i, level in enumerate(self.levels):
            for layer in level:
                x = layer(x)
            feats.append(self.out_norms[i](x))
            if i < len(self.downsamples):
                x = self.downsamples[i](x, taps)
        return feats

    def forward_taps(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` with the tokens channels-last throughout: the convolutions as matrix
        products over their taps (``conv1d_taps``), the FPN's upsampling a gather and blend
        (``upsample_steps``)."""
        feats = self.level_features(conv1d_taps(x.transpose(1, 2), self.tokenizer), taps=True)  # [B, Ti, Ci]
        lat = [conv1d_taps(f, conv) for conv, f in zip(self.laterals[1:], feats[1:])]  # [B, Ti, C]
        # upsampling over time as a gather and blend on channels-last tokens (a product over time
        # became a batched product per sample there)
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + upsample_steps(lat[i], lat[i - 1].shape[1])
        t = feats[0].shape[1]
        top = conv1d_taps(feats[0][:, -3:], self.laterals[0])[:, -2:]  # [B, 2, C]
        if lat:
            top = top + upsample_steps(lat[0], t, last=2)
        # the last step's 3-tap convolution reads steps T-2 and T-1, and the zero padding after them
        weight = self.fpn.weight[..., :2].permute(0, 2, 1).reshape(self.fpn.out_channels, -1)
        return F.linear(top.reshape(top.shape[0], -1), weight, self.fpn.bias)


class LanePointNet(nn.Module):
    """PointNet over lane points: shared MLP with BatchNorm, concat the max-pooled global feature,
    a second shared MLP, max-pool. Input [B, P, C_in], output [B, out]."""

    def __init__(self, in_channels: int, hidden, out_hidden: int, out: int):
        super().__init__()
        self.first = nn.Sequential(
            nn.Linear(in_channels, hidden[0]),
            _PointBatchNorm(hidden[0]),
            nn.ReLU(inplace=True),
            nn.Linear(hidden[0], hidden[1]),
        )
        self.second = nn.Sequential(
            nn.Linear(2 * hidden[1], out_hidden),
            _PointBatchNorm(out_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(out_hidden, out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)  # [B, P, H1]
        g = h.max(dim=1).values  # [B, H1]
        # second[0] on [g, h] per point, split by linearity: the global feature's half once per
        # lane, not once per point (about a tenth of the encoder's work, no [B, P, 2*H1] tensor)
        lin, width = self.second[0], h.shape[-1]
        y = F.linear(h, lin.weight[:, width:]) + F.linear(g, lin.weight[:, :width], lin.bias)[:, None]
        for layer in self.second[1:]:
            y = layer(y)
        return y.max(dim=1).values


class _PointBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the channel axis of point features [B, P, C]. When its scale is frozen
    (a frozen backbone in PEFT or target-parameter pre-training) it normalises with the running
    statistics and never updates them, whatever the module's train/eval mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.weight.requires_grad:
            return super().forward(flat).view_as(x)
        out = F.batch_norm(flat, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return out.view_as(x)
