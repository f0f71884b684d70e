"""A packed, padding-free forward of BERT-family encoders for PLL scoring (exact math).

Why not ``model(input_ids)``: a PLL batch holds n masked copies of each text, and only one
hidden state per copy (the target's) is ever read. Three things make this forward cheaper than
the library one while computing the same function:

1. No padding. All copies of a text have the same length L, so the linear layers run on the
   copies' tokens packed into one [T, d] matrix (T = sum of copy lengths, one big GEMM per
   weight), and attention runs per group of equal-length copies, without an attention mask.
2. Query, key and value projections are fused into one [d, 3d] GEMM.
3. Layer 0's input and Q/K/V projection depend on a position's token alone, and a copy's token
   at p is either the text's own or [MASK]. They are computed once per text for both cases
   (2 L rows) and gathered for the copies, instead of once per copy token (c L rows): 6 d^2 of
   the 144 d^2 per token of MiniLM, exactly.
4. The last layer is evaluated only where it is read. Its keys and values are needed at every
   position, but the query, attention output, output projection and feed-forward block only at
   the target rows: for a 12 d^2-per-token layer that leaves 2 d^2 per non-target token.
   (For one target per copy that is 10 d^2 of 72 d^2 per token saved on a 6-layer model.)

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

# Rows per chunk of the row-local blocks (projections, LayerNorm, feed-forward) on CPU: 2048 x 4d
# float32 = 12 MB for MiniLM, cache-sized; at 8k rows the GELU/LayerNorm passes go to memory.
# On CUDA rows are not chunked: there every chunk costs kernel launches, and cache is not the limit.
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


@dataclass
class _Layer:
    w_qkv: torch.Tensor
    b_qkv: torch.Tensor
    w_q: torch.Tensor  # the query and key/value parts of w_qkv, for the last layer
    b_q: torch.Tensor
    w_kv: torch.Tensor
    b_kv: torch.Tensor
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


def supports_packed(model: nn.Module) -> bool:
    """BERT-layout encoders (BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA) with absolute positions."""
    cfg = getattr(model, "config", None)
    base = getattr(model, "base_model", None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if cfg is None or layers is None or len(layers) == 0 or getattr(base, "embeddings", None) is None:
        return False
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        return False
    if getattr(cfg, "position_embedding_type", "absolute") not in ("absolute", None):
        return False
    lay = layers[0]
    try:
        _ = (lay.attention.self.query, lay.attention.output.dense, lay.attention.output.LayerNorm)
        _ = (lay.intermediate.dense, lay.intermediate.intermediate_act_fn, lay.output.dense)
        _ = lay.output.LayerNorm
    except AttributeError:
        return False
    return True


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
        self.n_heads: int = cfg.num_attention_heads
        self.dtype = compute_dtype
        self.hidden_act = getattr(cfg, "hidden_act", None)
        self.onednn = (
            onednn and hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()
        )
        self.layers = [self._extract(lay) for lay in base.encoder.layer]
        self.mask_token_id = mask_token_id

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(self.dtype).contiguous()

    def _weight(self, w: torch.Tensor) -> torch.Tensor:
        """Cast, and on the oneDNN CPU path pre-reorder into oneDNN's blocked layout once: plain
        weights are reordered inside every GEMM call (measured 3-8% of GEMM time at 2k rows)."""
        w = self._cast(w)
        if self.onednn and w.device.type == "cpu" and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
            try:
                return torch.ops.mkldnn._reorder_linear_weight(w, ROW_CHUNK)
            except RuntimeError:  # a build without the reorder kernel for this dtype: plain weights
                return w
        return w

    def _extract(self, lay: Any) -> _Layer:
        sa, so = lay.attention.self, lay.attention.output
        w_qkv = torch.cat([sa.query.weight, sa.key.weight, sa.value.weight], 0)
        b_qkv = torch.cat([sa.query.bias, sa.key.bias, sa.value.bias], 0)
        d = sa.query.weight.shape[0]
        w = self._weight
        return _Layer(
            w(w_qkv), self._cast(b_qkv), w(w_qkv[:d]), self._cast(b_qkv[:d]), w(w_qkv[d:]), self._cast(b_qkv[d:]),
            w(so.dense.weight), self._cast(so.dense.bias), so.LayerNorm,
            w(lay.intermediate.dense.weight), self._cast(lay.intermediate.dense.bias),
            lay.intermediate.intermediate_act_fn,
            w(lay.output.dense.weight), self._cast(lay.output.dense.bias), lay.output.LayerNorm,
            self.hidden_act == "gelu",
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
        if self.onednn and x.device.type == "cpu":
            # oneDNN GEMM with the bias and the GELU or the float32 residual sum in its epilogue:
            # one pass over the output instead of two or three (GELU fusion measured 1.3-2x
            # faster than F.linear + gelu at 1-2k rows here).
            if resid is not None and resid.dtype == x.dtype:
                return torch.ops.mkldnn._linear_pointwise.binary(x, resid, w, b, "add")
            y = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu" if gelu else "none", [], "none")
        else:
            y = F.linear(x, w, b)
            y = F.gelu(y) if gelu else y
        return y if resid is None else y.float() + resid

    @staticmethod
    def _chunk(x: torch.Tensor) -> int:
        return ROW_CHUNK if x.device.type == "cpu" else max(1, x.shape[0])

    def _lin_rows(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``_lin`` over row chunks of ``x`` (a projection is row-local), into one output."""
        if x.shape[0] <= self._chunk(x):
            return self._lin(x, w, b)
        out = torch.empty(x.shape[0], w.shape[0], dtype=self.dtype, device=x.device)
        step = self._chunk(x)
        for a in range(0, x.shape[0], step):
            out[a : a + step] = self._lin(x[a : a + step], w, b)
        return out

    def _ffn(self, lay: _Layer, ctx: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        # BertSelfOutput, BertIntermediate, BertOutput; residual sums and LayerNorm in float32.
        # Row-local, so it runs in row chunks that keep the [rows, 4d] intermediate in cache.
        out = torch.empty_like(resid)
        step = self._chunk(resid)
        for a in range(0, resid.shape[0], step):
            h = lay.ln1(self._lin(ctx[a : a + step], lay.w_o, lay.b_o, resid=resid[a : a + step]))
            if lay.erf_gelu:
                inter = self._lin(h, lay.w_i, lay.b_i, gelu=True)
            else:
                inter = lay.act(self._lin(h, lay.w_i, lay.b_i))
            out[a : a + step] = lay.ln2(self._lin(inter, lay.w_o2, lay.b_o2, resid=h))
        return out

    def _heads(self, x: torch.Tensor, c: int, L: int, k: int) -> torch.Tensor:
        # [c*L, k*d] -> [k][c, h, L, dh] views (no copies: SDPA takes strided inputs)
        return x.view(c, L, k, self.n_heads, -1).permute(2, 0, 3, 1, 4)

    def forward(self, groups: Sequence[Group]) -> torch.Tensor:
        """Hidden states [N, d] (float32) at the valid targets, in group, copy, slot order."""
        shapes = [(g.input_ids.shape[0], g.input_ids.shape[1]) for g in groups]
        share = (
            self.mask_token_id is not None
            and len(self.layers) > 1
            and all(g.rows is not None for g in groups)
        )
        x, qkv0 = self._layer0_shared(groups) if share else (self._embed(groups, shapes), None)
        offsets = [0]
        for c, L in shapes:
            offsets.append(offsets[-1] + c * L)
        for i, lay in enumerate(self.layers[:-1]):
            qkv = qkv0 if i == 0 and qkv0 is not None else self._lin_rows(x, lay.w_qkv, lay.b_qkv)
            # SDPA's output [c, h, L, dh] lies in memory as [c, L, h, dh], so each group's rows
            # are a free view; only a batch of several groups pays one concatenation.
            parts = [
                F.scaled_dot_product_attention(*self._heads(qkv[a:b], c, L, 3)).transpose(1, 2).reshape(c * L, -1)
                for (c, L), a, b in zip(shapes, offsets[:-1], offsets[1:], strict=True)
            ]
            x = self._ffn(lay, parts[0] if len(parts) == 1 else torch.cat(parts), x)
        return self._last_layer(self.layers[-1], x, groups, shapes, offsets)

    def _embed(self, groups: Sequence[Group], shapes: list[tuple[int, int]]) -> torch.Tensor:
        parts = [
            self.embeddings(input_ids=g.input_ids, token_type_ids=g.token_type_ids).reshape(c * L, -1)
            for g, (c, L) in zip(groups, shapes, strict=True)
        ]
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).float()

    def _layer0_shared(self, groups: Sequence[Group]) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer-0 input rows and Q/K/V rows of every copy token, gathered from 2 L rows per text."""
        lay = self.layers[0]
        xs, qkvs = [], []
        for g in groups:
            assert g.base_ids is not None and g.rows is not None
            ids = torch.cat([g.base_ids, torch.full_like(g.base_ids, int(self.mask_token_id or 0))])
            tt = g.base_token_type_ids
            e = self.embeddings(input_ids=ids, token_type_ids=None if tt is None else torch.cat([tt, tt]))
            e = e.reshape(-1, e.shape[-1]).float()
            p = self._lin_rows(e, lay.w_qkv, lay.b_qkv)
            xs.append(e.index_select(0, g.rows))
            qkvs.append(p.index_select(0, g.rows))
        if len(groups) == 1:
            return xs[0], qkvs[0]
        return torch.cat(xs), torch.cat(qkvs)

    def _last_layer(
        self,
        lay: _Layer,
        x: torch.Tensor,
        groups: Sequence[Group],
        shapes: list[tuple[int, int]],
        offsets: list[int],
    ) -> torch.Tensor:
        d = x.shape[1]
        w_q, w_kv, b_q, b_kv = lay.w_q, lay.w_kv, lay.b_q, lay.b_kv
        kv = self._lin_rows(x, w_kv, b_kv)
        ctxs, resids = [], []
        for g, (c, L), a, b in zip(groups, shapes, offsets[:-1], offsets[1:], strict=True):
            tgt = g.targets
            xg = x[a:b].view(c, L, d)
            xq = xg.gather(1, tgt.clamp_min(0).unsqueeze(-1).expand(-1, -1, d))  # [c, m, d]
            q = self._lin(xq, w_q, b_q).view(c, tgt.shape[1], self.n_heads, -1).transpose(1, 2)
            k, v = self._heads(kv[a:b], c, L, 2)
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(c, tgt.shape[1], d)
            ctxs.append(o.reshape(-1, d).index_select(0, g.valid))
            resids.append(xq.reshape(-1, d).index_select(0, g.valid))
        return self._ffn(lay, torch.cat(ctxs), torch.cat(resids))
