"""A packed, padding-free forward of BERT-family encoders for PLL scoring (exact math).

Why not ``model(input_ids)``: a PLL batch holds n masked copies of each text, and only one
hidden state per copy (the target's) is ever read. Five things make this forward cheaper than
the library one while computing the same function:

1. No padding. All copies of a text have the same length L, so the linear layers run on the
   copies' tokens packed into one [T, d] matrix (T = sum of copy lengths, one big GEMM per
   weight), and attention runs per group of equal-length copies, without an attention mask.
2. Query, key and value projections are fused into one [d, 3d] GEMM.
3. Layer 0's input and Q/K/V projection depend on a position's token alone, and a copy's token
   at p is either the text's own or [MASK]. They are computed once per text for both cases
   (2 L rows) and gathered for the copies, instead of once per copy token (c L rows): 6 d^2 of
   the 144 d^2 per token of MiniLM, exactly.
4. The last layer is evaluated only where it is read: the query, attention, output projection
   and feed-forward block at the target rows only, and its keys and values not at all — the
   attention is re-associated onto the layer input (``_last_layer``). A 24 d^2-per-token layer
   becomes O(h L d) per copy.
5. Copies are independent sequences, so on CPU a batch runs chunk by chunk (~2k rows of whole
   copies through every layer), each chunk's tensors made and consumed while cache-resident,
   never copied into batch-sized buffers.

Mixed precision follows autocast's rule (matmuls in the low dtype, residual stream, LayerNorm
and softmax statistics in float32) but with the weights cast once, not on every call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from l3m.scoring import onednn as onednn_ops

# Rows (whole masked copies) that go through all layers together on CPU: 2048 x 4d float32 = 12 MB
# for MiniLM stays cache-resident; 4096 measured ~5% slower, 1024 the same. On CUDA a batch is one
# chunk: there every chunk costs kernel launches, and cache is not the limit.
ROW_CHUNK = 2048


@dataclass
class Group:
    """``c`` masked copies of equal length ``L`` on the compute device."""

    input_ids: torch.Tensor  # long [c, L], masked
    token_type_ids: torch.Tensor | None  # long [c, L]
    targets: torch.Tensor  # long [c, m], -1 where a copy has fewer than m targets
    valid: torch.Tensor  # long [n]: flat indices into [c * m] of the targets >= 0 (host-computed: no sync)
    # Layer-0 sharing (optional): the u original texts of the group and, per copy token, its row in
    # [original rows of all u texts; all-[MASK] rows of all u texts], i.e. masked*u*L + text*L + p.
    base_ids: torch.Tensor | None = None  # long [u, L]
    base_token_type_ids: torch.Tensor | None = None  # long [u, L]
    rows: torch.Tensor | None = None  # long [c * L]


@dataclass(frozen=True)
class _Piece:
    """Copies ``c0:c1`` (each ``L`` tokens) of group ``group``: one part of a chunk."""

    group: int
    c0: int
    c1: int
    L: int

    @property
    def rows(self) -> int:
        return (self.c1 - self.c0) * self.L


@dataclass
class _Layer:
    w_qkv: torch.Tensor
    b_qkv: torch.Tensor
    w_o: torch.Tensor
    b_o: torch.Tensor
    ln1: nn.LayerNorm
    w_i: torch.Tensor
    b_i: torch.Tensor
    act: Callable[[torch.Tensor], torch.Tensor]
    w_o2: torch.Tensor
    b_o2: torch.Tensor
    ln2: nn.LayerNorm
    erf_gelu: bool  # the activation is exact GELU, so it can be fused into the GEMM


@dataclass
class _LastAttention:
    """What ``_last_layer`` uses instead of w_qkv: the query projection, and the key and value
    weights per head ``[h, dh, d]`` (never applied to rows: see ``_last_layer``)."""

    w_q: torch.Tensor
    b_q: torch.Tensor
    w_k_heads: torch.Tensor
    w_v_heads: torch.Tensor
    b_v: torch.Tensor


def supports_packed(model: nn.Module) -> bool:
    """BERT-layout encoders (BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA) with absolute positions."""
    return packed_unsupported(model) is None


def packed_unsupported(model: nn.Module) -> str | None:
    """Why the packed forward cannot run ``model`` (None when it can): the scorer reports it."""
    name = type(model).__name__
    cfg = getattr(model, "config", None)
    base = getattr(model, "base_model", None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if cfg is None or layers is None or len(layers) == 0 or getattr(base, "embeddings", None) is None:
        return f"{name}: not a BERT-layout encoder (no embeddings + encoder.layer)"
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        return f"{name}: a decoder or cross-attention"
    if getattr(cfg, "position_embedding_type", "absolute") not in ("absolute", None):
        return f"{name}: {cfg.position_embedding_type} positions"
    lay = layers[0]
    try:
        _ = (lay.attention.self.query, lay.attention.output.dense, lay.attention.output.LayerNorm)
        _ = (lay.intermediate.dense, lay.intermediate.intermediate_act_fn, lay.output.dense)
        _ = lay.output.LayerNorm
    except AttributeError:
        return f"{name}: its layers are not BERT's (attention.self.query ...)"
    return None


class PackedEncoder:
    """Runs ``model.base_model`` on packed groups and returns the hidden states of the targets."""

    def __init__(
        self,
        model: nn.Module,
        compute_dtype: torch.dtype,
        onednn: bool = True,
        mask_token_id: int | None = None,
    ) -> None:
        if not supports_packed(model):
            raise ValueError(f"{type(model).__name__} has no BERT-layout encoder")
        base: Any = model.base_model
        cfg: Any = model.config
        self.embeddings = base.embeddings
        # ELECTRA projects its embeddings to the hidden width (embedding_size != hidden_size).
        self.project: nn.Module | None = getattr(base, "embeddings_project", None)
        self.n_heads: int = cfg.num_attention_heads
        self.dtype = compute_dtype
        self.hidden_act = getattr(cfg, "hidden_act", None)
        self.onednn = onednn and onednn_ops.available(next(model.parameters()).device)
        self.layers = [self._extract(lay) for lay in base.encoder.layer]
        self.last_attention = self._extract_last_attention(base.encoder.layer[-1])
        self.mask_token_id = mask_token_id

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(self.dtype).contiguous()

    def _weight(self, w: torch.Tensor) -> torch.Tensor:
        """Cast, and on the oneDNN path reordered once into oneDNN's blocked layout."""
        w = self._cast(w)
        return onednn_ops.prepack(w, ROW_CHUNK) if self.onednn else w

    def _extract(self, lay: Any) -> _Layer:
        sa, so = lay.attention.self, lay.attention.output
        w_qkv = torch.cat([sa.query.weight, sa.key.weight, sa.value.weight], 0)
        b_qkv = torch.cat([sa.query.bias, sa.key.bias, sa.value.bias], 0)
        w = self._weight
        return _Layer(
            w(w_qkv), self._cast(b_qkv),
            w(so.dense.weight), self._cast(so.dense.bias), so.LayerNorm,
            w(lay.intermediate.dense.weight), self._cast(lay.intermediate.dense.bias),
            lay.intermediate.intermediate_act_fn,
            w(lay.output.dense.weight), self._cast(lay.output.dense.bias), lay.output.LayerNorm,
            self.hidden_act == "gelu",
        )  # fmt: skip

    def _extract_last_attention(self, lay: Any) -> _LastAttention:
        sa = lay.attention.self
        per_head = (self.n_heads, sa.query.weight.shape[0] // self.n_heads, -1)
        return _LastAttention(
            self._weight(sa.query.weight), self._cast(sa.query.bias),
            self._cast(sa.key.weight.view(per_head)), self._cast(sa.value.weight.view(per_head)),
            self._cast(sa.value.bias),
        )  # fmt: skip

    # -- pieces -------------------------------------------------------------------------------
    def _lin(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor,
        gelu: bool = False,
        resid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x @ w.T + b``, then erf-GELU, or ``+ resid`` (float32 result) for a residual branch."""
        x = x.to(self.dtype)
        fused = self.onednn and x.device.type == "cpu"
        if fused and resid is not None and resid.dtype == x.dtype:
            return onednn_ops.linear_add(x, resid, w, b)
        y = onednn_ops.linear(x, w, b, gelu=gelu, onednn=fused)
        return y if resid is None else y.float() + resid

    def _ffn(self, lay: _Layer, ctx: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        # BertSelfOutput, BertIntermediate, BertOutput; residual sums and LayerNorm in float32.
        h = lay.ln1(self._lin(ctx, lay.w_o, lay.b_o, resid=resid))
        inter = self._lin(h, lay.w_i, lay.b_i, gelu=True) if lay.erf_gelu else lay.act(self._lin(h, lay.w_i, lay.b_i))
        return lay.ln2(self._lin(inter, lay.w_o2, lay.b_o2, resid=h))

    def _heads(self, x: torch.Tensor, c: int, L: int, k: int) -> torch.Tensor:
        # [c*L, k*d] -> [k][c, h, L, dh] views (no copies: SDPA takes strided inputs)
        return x.view(c, L, k, self.n_heads, -1).permute(2, 0, 3, 1, 4)

    @staticmethod
    def _chunks(groups: Sequence[Group], device: torch.device) -> list[list[_Piece]]:
        """Whole copies packed into chunks of at most ROW_CHUNK rows (CPU) or one chunk (CUDA)."""
        sizes = [(g.input_ids.shape[0], g.input_ids.shape[1]) for g in groups]
        if device.type != "cpu":
            return [[_Piece(i, 0, c, L) for i, (c, L) in enumerate(sizes)]]
        chunks: list[list[_Piece]] = [[]]
        rows = 0
        for i, (c, L) in enumerate(sizes):
            c0 = 0
            while c0 < c:
                room = (ROW_CHUNK - rows) // L
                if room <= 0 and chunks[-1]:
                    chunks.append([])
                    rows = 0
                    continue
                c1 = min(c, c0 + max(1, room))
                chunks[-1].append(_Piece(i, c0, c1, L))
                rows += (c1 - c0) * L
                c0 = c1
        return chunks

    def forward(self, groups: Sequence[Group]) -> torch.Tensor:
        """Hidden states [N, d] (float32) at the valid targets, in group, copy, slot order.

        Copies are independent sequences, so the encoder runs chunk by chunk — all layers of a
        chunk of whole copies (about ROW_CHUNK rows on CPU) before the next chunk. Every tensor of
        a chunk is made and consumed in place: no batch-sized buffers, no copying of row blocks
        into them (that copying was ~9% of the forward when layers ran over the whole batch).
        """
        share = self.mask_token_id is not None and len(self.layers) > 1 and all(g.rows is not None for g in groups)
        tables = [self._layer0_tables(g) for g in groups] if share else None
        device = groups[0].input_ids.device
        out = []
        for chunk in self._chunks(groups, device):
            if tables is not None:
                x, qkv = self._gather0(chunk, tables)
            else:
                x, qkv = self._embed(chunk, groups), None
            for i, lay in enumerate(self.layers[:-1]):
                if i > 0 or qkv is None:
                    qkv = self._lin(x, lay.w_qkv, lay.b_qkv)
                x = self._ffn(lay, self._attention(qkv, chunk), x)
            out.append(self._last_layer(self.layers[-1], x, groups, chunk))
        return out[0] if len(out) == 1 else torch.cat(out)

    def _attention(self, qkv: torch.Tensor, chunk: list[_Piece]) -> torch.Tensor:
        # SDPA's output [c, h, L, dh] lies in memory as [c, L, h, dh], so each piece's rows are a
        # free view; only a chunk of several pieces pays one concatenation.
        parts, a = [], 0
        for p in chunk:
            b = a + p.rows
            o = F.scaled_dot_product_attention(*self._heads(qkv[a:b], p.c1 - p.c0, p.L, 3))
            parts.append(o.transpose(1, 2).reshape(p.rows, -1))
            a = b
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _embed(self, chunk: list[_Piece], groups: Sequence[Group]) -> torch.Tensor:
        parts = []
        for p in chunk:
            g = groups[p.group]
            tt = None if g.token_type_ids is None else g.token_type_ids[p.c0 : p.c1]
            parts.append(self._embeddings(g.input_ids[p.c0 : p.c1], tt).reshape(p.rows, -1))
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).float()

    def _embeddings(self, ids: torch.Tensor, tt: torch.Tensor | None) -> torch.Tensor:
        e = self.embeddings(input_ids=ids, token_type_ids=tt)
        return e if self.project is None else self.project(e)

    def _layer0_tables(self, g: Group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer-0 input and Q/K/V rows of a group's texts, original and all-[MASK] (2 u L rows),
        and each copy token's row in them."""
        assert g.base_ids is not None and g.rows is not None
        lay = self.layers[0]
        ids = torch.cat([g.base_ids, torch.full_like(g.base_ids, int(self.mask_token_id or 0))])
        tt = g.base_token_type_ids
        e = self._embeddings(ids, None if tt is None else torch.cat([tt, tt]))
        e = e.reshape(-1, e.shape[-1]).float()
        return e, self._lin(e, lay.w_qkv, lay.b_qkv), g.rows

    def _gather0(
        self, chunk: list[_Piece], tables: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer-0 input and Q/K/V of every copy token of a chunk, gathered from its texts' tables."""
        xs, qkvs = [], []
        for p in chunk:
            e, proj, all_rows = tables[p.group]
            rows = all_rows[p.c0 * p.L : p.c1 * p.L]
            xs.append(e.index_select(0, rows))
            qkvs.append(proj.index_select(0, rows))
        if len(chunk) == 1:
            return xs[0], qkvs[0]
        return torch.cat(xs), torch.cat(qkvs)

    def _last_layer(self, lay: _Layer, x: torch.Tensor, groups: Sequence[Group], chunk: list[_Piece]) -> torch.Tensor:
        """The last layer at the target rows only, without its key and value projections.

        Per head, q.k_j = (W_k^T q).x_j + q.b_k, and the q.b_k term is the same for every key, so
        softmax drops it; and sum_j p_j v_j = W_v (sum_j p_j x_j) + b_v since the p_j sum to 1.
        The scores and the context therefore come from the layer input x directly: 4 h L d + 4 d^2
        FLOPs per target instead of 4 d^2 L for keys and values at every position (~3% of all).
        """
        d, h, att = x.shape[1], self.n_heads, self.last_attention
        scale = (d // h) ** -0.5
        ctxs, resids, a = [], [], 0
        for p in chunk:
            g, c, b = groups[p.group], p.c1 - p.c0, a + p.rows
            tgt = g.targets[p.c0 : p.c1]
            m = tgt.shape[1]
            if c == g.targets.shape[0]:
                valid = g.valid
            else:  # part of a group (CPU only): its valid slots, found on the host-side tensor
                valid = torch.nonzero(tgt.reshape(-1) >= 0).squeeze(1)
            xg = x[a:b].view(c, p.L, d)
            xq = xg.gather(1, tgt.clamp_min(0).unsqueeze(-1).expand(-1, -1, d))  # [c, m, d]
            q = self._lin(xq, att.w_q, att.b_q).view(c, m, h, -1)
            u = torch.einsum("cmhe,hed->cmhd", q, att.w_k_heads).reshape(c, m * h, d)
            xl = xg.to(self.dtype)
            probs = torch.softmax((torch.bmm(u, xl.transpose(1, 2)) * scale).float(), dim=-1)
            y = torch.bmm(probs.to(self.dtype), xl).view(c, m, h, d)
            o = torch.einsum("cmhd,hed->cmhe", y, att.w_v_heads).reshape(c * m, d) + att.b_v
            ctxs.append(o.index_select(0, valid))
            resids.append(xq.reshape(-1, d).index_select(0, valid))
            a = b
        if len(chunk) == 1:
            return self._ffn(lay, ctxs[0], resids[0])
        return self._ffn(lay, torch.cat(ctxs), torch.cat(resids))
