"""DINO's deformable transformer: encoder, two-stage query selection, decoder with box refinement.

Shapes: ``N`` images, ``C`` channels, ``L`` feature levels, ``S = sum_l H_l W_l`` encoder tokens,
``Q`` matching queries, ``pad`` denoising queries (prepended), ``K`` classes of the unified label
space, ``D`` decoder layers. Boxes are normalised ``(cx, cy, w, h)``; "unact" means before the sigmoid.

Every encoder/decoder FFN is built by :func:`gem_d2.modeling.moe.layer.build_ffn` and called as
``ffn(x, ctx)`` with a :class:`~gem_d2.modeling.moe.context.RoutingContext` that this module keeps up to
date: the encoder sets ``ctx.key_padding_mask`` (and clears the decoder fields); the decoder sets
``ctx.segments`` and ``ctx.query_labels`` before each layer (and clears the padding mask).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from gem_d2.layers.blockwise_linear import BlockwiseLinear
from gem_d2.layers.box_ops import inverse_sigmoid
from gem_d2.layers.mlp import FFN, MLP
from gem_d2.layers.ms_deform_attn import MSDeformAttn, set_msda_impl
from gem_d2.layers.position_encoding import box_sine_embedding
from gem_d2.modeling.dino.query_selection import (
    encoder_proposals,
    encoder_reference_points,
    masked_class_argmax,
    select_topk_in_blocks,
    valid_ratios,
)
from gem_d2.modeling.moe.context import MoESpec, RoutingContext
from gem_d2.modeling.moe.layer import build_ffn

__all__ = ["DeformableEncoderLayer", "DeformableEncoder", "DeformableDecoderLayer", "DeformableDecoder",
           "DINOTransformer", "build_dino_transformer"]

_PRIOR_PROB = 0.01  # focal-loss prior: class logits start at sigmoid^-1(0.01)


def _class_head(d_model: int, num_classes: int, class_blocks: Sequence[Sequence[int]]) -> BlockwiseLinear:
    head = BlockwiseLinear(d_model, num_classes, class_blocks)
    nn.init.constant_(head.bias, -math.log((1 - _PRIOR_PROB) / _PRIOR_PROB))
    return head


def _box_head(d_model: int) -> MLP:
    head = MLP(d_model, d_model, 4, 3)
    nn.init.zeros_(head.layers[-1].weight)
    nn.init.zeros_(head.layers[-1].bias)
    return head


def _xavier_(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention -> add & LN -> FFN(x, ctx) -> add & LN."""

    def __init__(self, d_model: int, n_heads: int, n_levels: int, n_points: int, ffn: nn.Module,
                 dropout: float = 0.0):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = ffn
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Optional[Tensor], ctx: RoutingContext) -> Tensor:
        """``src, pos (N, S, C)``, ``reference_points (N, S, L, 2)``, ``padding_mask (N, S)`` -> ``(N, S, C)``."""
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(attn))
        return self.norm2(src + self.dropout2(self.ffn(src, ctx)))


class DeformableEncoder(nn.Module):
    """A stack of :class:`DeformableEncoderLayer`; sets ``ctx.key_padding_mask`` for the FFN routers."""

    def __init__(self, layers: Sequence[DeformableEncoderLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, src: Tensor, pos: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                ratios: Tensor, padding_mask: Tensor, ctx: RoutingContext) -> Tensor:
        """``src, pos (N, S, C)``, ``ratios (N, L, 2)``, ``padding_mask (N, S)`` -> memory ``(N, S, C)``."""
        reference_points = encoder_reference_points(spatial_shapes, ratios).to(src.dtype)
        ctx.key_padding_mask = padding_mask
        ctx.segments = None
        ctx.query_labels = None
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask, ctx)
        return src


# ----------------------------------------------------------------------------------------------
# decoder
# ----------------------------------------------------------------------------------------------

class DeformableDecoderLayer(nn.Module):
    """Post-norm layer: self-attention (DN mask) -> add & LN -> deformable cross-attention -> add & LN
    -> FFN(x, ctx) -> add & LN. The query position is added to queries/keys of self-attention and to
    the query of cross-attention."""

    def __init__(self, d_model: int, n_heads: int, n_levels: int, n_points: int, ffn: nn.Module,
                 dropout: float = 0.0):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = ffn
        self.dropout3 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor, memory_padding_mask: Optional[Tensor],
                self_attn_mask: Optional[Tensor], ctx: RoutingContext) -> Tensor:
        """``tgt, query_pos (N, T, C)``, ``reference_points (N, T, L, 4)``, ``memory (N, S, C)``,
        ``self_attn_mask (T, T)`` bool True = blocked or None -> ``(N, T, C)``."""
        q = tgt + query_pos
        attn = self.self_attn(q, q, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(attn))
        attn = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index,
                               memory_padding_mask)
        tgt = self.norm2(tgt + self.dropout2(attn))
        return self.norm3(tgt + self.dropout3(self.ffn(tgt, ctx)))


class DeformableDecoder(nn.Module):
    """Decoder layers with class/box heads and look-forward-twice box refinement, as DINO's reference code.

    With ``o_i`` layer ``i``'s raw output, ``h_i = norm(o_i)`` (one final LayerNorm shared by all
    layers), ``b_0`` the initial reference (detached) and ``logit`` = :func:`inverse_sigmoid`:

    - refinement, from the RAW output: ``r_i = sigmoid(box_head_i(o_i) + logit(b_i))``; layer ``i+1``'s
      reference is ``b_{i+1} = detach(r_i)``;
    - prediction, from the NORMED output: ``logits_i = class_head_i(h_i)`` and
      ``box_i = sigmoid(box_head_i(h_i) + logit(p_i))`` with ``p_0 = b_0`` and, for ``i > 0``,
      ``p_i = r_{i-1}`` *un-detached* (look forward twice: layer ``i``'s box loss also trains layer
      ``i-1``'s box head through ``r_{i-1}``, and no earlier one) or ``p_i = b_i`` with
      ``look_forward_twice=False``.

    The same box head gives two deltas per layer, so ``box_i`` and the next reference ``r_i`` differ.
    (IDEA-Research/DINO: the decoder refines with ``bbox_embed[i](output)`` and the detector predicts
    with ``bbox_embed[i](hs[i])`` on ``references[i]``; detrex's DINO the same.) The last layer's
    refinement feeds nothing and is skipped.

    Args:
        layers: the decoder layers.
        d_model: ``C``; num_classes: ``K``.
        query_pe_temperature: temperature of the reference-box sine embedding of the queries
            (``MODEL.DINO.QUERY_PE_TEMPERATURE``; both references fix it at 10000).
        look_forward_twice: see above.
        class_blocks: the label space's ``(start, stop)`` blocks (see ``BlockwiseLinear``).
        share_class_head, share_box_head: one class (box) head for every layer (IDEA-Research/DINO's
            ``dec_pred_class_embed_share``/``dec_pred_bbox_embed_share``) instead of one per layer (detrex).
            Shared heads appear under every layer's index in ``class_heads``/``box_heads``.
    """

    def __init__(self, layers: Sequence[DeformableDecoderLayer], d_model: int, num_classes: int,
                 query_pe_temperature: float = 10000.0, look_forward_twice: bool = True,
                 class_blocks: Sequence[Sequence[int]] = (), share_class_head: bool = False,
                 share_box_head: bool = False):
        super().__init__()
        if d_model % 2:
            raise ValueError(f"MODEL.DINO.HIDDEN_DIM={d_model} must be even (sine embedding uses C/2 per coordinate)")
        self.layers = nn.ModuleList(layers)
        self.d_model = d_model
        if not query_pe_temperature > 0:
            raise ValueError(f"MODEL.DINO.QUERY_PE_TEMPERATURE must be > 0, got {query_pe_temperature!r}")
        self.query_pe_temperature = float(query_pe_temperature)
        self.look_forward_twice = look_forward_twice
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.norm = nn.LayerNorm(d_model)
        n = len(self.layers)
        self.share_class_head, self.share_box_head = bool(share_class_head), bool(share_box_head)
        self.class_heads = nn.ModuleList([_class_head(d_model, num_classes, class_blocks)] * n if share_class_head
                                         else [_class_head(d_model, num_classes, class_blocks) for _ in range(n)])
        self.box_heads = nn.ModuleList([_box_head(d_model)] * n if share_box_head
                                       else [_box_head(d_model) for _ in range(n)])

    def forward(self, tgt: Tensor, reference: Tensor, memory: Tensor, memory_padding_mask: Optional[Tensor],
                spatial_shapes: Tensor, level_start_index: Tensor, ratios: Tensor, self_attn_mask: Optional[Tensor],
                class_masks: Tensor, ctx: RoutingContext, initial_labels: Tensor, segments: Tensor,
                fixed_labels: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Run all layers.

        Args:
            tgt: ``(N, T, C)`` content queries (``T = pad + Q``).
            reference: ``(N, T, 4)`` initial boxes in [0, 1] (no gradient is taken through them).
            memory, memory_padding_mask: ``(N, S, C)``, ``(N, S)``.
            spatial_shapes, level_start_index: ``(L, 2)``, ``(L,)``; ratios: ``(N, L, 2)``.
            self_attn_mask: ``(T, T)`` bool True = blocked, or None.
            class_masks: ``(N, K)`` bool, each image's class block.
            ctx: routing context; ``ctx.segments = segments`` and ``ctx.query_labels`` are set per layer.
            initial_labels: ``(N, T)`` long, ``ctx.query_labels`` for layer 0.
            segments: ``(T,)`` long.
            fixed_labels: ``(N, T)`` long or None; entries ``>= 0`` (the DN queries' noised labels) are
                kept at every layer, the others follow the previous layer's class argmax in the block.
        Returns:
            ``(logits (D, N, T, K), boxes (D, N, T, 4))``.
        """
        ratios4 = torch.cat([ratios, ratios], -1)[:, None]  # (N, 1, L, 4)
        reference = reference.detach()
        prev_refined = None
        last = len(self.layers) - 1
        labels = initial_labels
        ctx.key_padding_mask = None
        ctx.segments = segments
        all_logits, all_boxes = [], []
        for i, layer in enumerate(self.layers):
            ref_input = reference[:, :, None] * ratios4
            query_pos = self.ref_point_head(
                box_sine_embedding(ref_input[:, :, 0], self.d_model // 2, self.query_pe_temperature))
            ctx.query_labels = labels
            tgt = layer(tgt, query_pos, ref_input, memory, spatial_shapes, level_start_index, memory_padding_mask,
                        self_attn_mask, ctx)
            hs = self.norm(tgt)
            logits = self.class_heads[i](hs)
            # prediction: delta from the normed output on the previous layer's un-detached refined box
            base = prev_refined if (self.look_forward_twice and prev_refined is not None) else reference
            box = (self.box_heads[i](hs) + inverse_sigmoid(base)).sigmoid()
            all_logits.append(logits)
            all_boxes.append(box)
            if i < last:
                # refinement: delta from the raw output on the detached reference (gradient into this head only)
                prev_refined = (self.box_heads[i](tgt) + inverse_sigmoid(reference)).sigmoid()
                reference = prev_refined.detach()
            labels = masked_class_argmax(logits, class_masks)
            if fixed_labels is not None:
                labels = torch.where(fixed_labels >= 0, fixed_labels, labels)
        return torch.stack(all_logits), torch.stack(all_boxes)


# ----------------------------------------------------------------------------------------------
# the transformer with two-stage query selection
# ----------------------------------------------------------------------------------------------

class DINOTransformer(nn.Module):
    """Encoder, two-stage top-K query selection within class blocks, mixed query selection, decoder.

    Args:
        encoder, decoder: the stacks.
        d_model: ``C``; num_levels: ``L``; num_queries: ``Q``; num_classes: ``K``.
    """

    def __init__(self, encoder: DeformableEncoder, decoder: DeformableDecoder, d_model: int, num_levels: int,
                 num_queries: int, num_classes: int, class_blocks: Sequence[Sequence[int]] = ()):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.d_model = d_model
        self.num_levels = num_levels
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.level_embed = nn.Parameter(torch.empty(num_levels, d_model))
        self.tgt_embed = nn.Embedding(num_queries, d_model)
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.enc_class_head = _class_head(d_model, num_classes, class_blocks)
        self.enc_box_head = _box_head(d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Xavier on every >1-d weight as the references. MoE FFNs are skipped: their experts are already
        # Xavier-initialised per expert matrix by ExpertBank (the dense FFN's distribution), and routers keep
        # the initialisation of their own method (e.g. MoE++'s zero gating residual).
        for layer in list(self.encoder.layers) + list(self.decoder.layers):
            for name, child in layer.named_children():
                if name != "ffn" or isinstance(child, FFN):
                    _xavier_(child)
        for module in (self.decoder.ref_point_head, self.tgt_embed, self.enc_output):
            _xavier_(module)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, feats: Sequence[Tensor], masks: Sequence[Tensor], pos_embeds: Sequence[Tensor],
                class_masks: Tensor, ctx: RoutingContext, dn_query_label: Optional[Tensor] = None,
                dn_query_bbox: Optional[Tensor] = None, dn_attn_mask: Optional[Tensor] = None,
                dn_meta: Optional[Dict] = None) -> Dict[str, Tensor]:
        """Encode, select queries and decode.

        Args:
            feats: ``L`` maps ``(N, C, H_l, W_l)``; masks: ``L`` bool ``(N, H_l, W_l)`` True = pad;
            pos_embeds: ``L`` maps ``(N, C, H_l, W_l)``.
            class_masks: ``(N, K)`` bool, each image's class block.
            ctx: routing context (``ctx.dataset_ids`` set by the caller).
            dn_query_label, dn_query_bbox, dn_attn_mask, dn_meta: from ``prepare_cdn`` or all None.
        Returns:
            dict with ``logits (D, N, pad+Q, K)``, ``boxes (D, N, pad+Q, 4)``, ``enc_logits (N, Q, K)``,
            ``enc_boxes (N, Q, 4)`` (the selected proposals, refined by the encoder box head),
            ``topk_index (N, Q)`` (selected token of each matching query).
        """
        if not (len(feats) == len(masks) == len(pos_embeds) == self.num_levels):
            raise ValueError(f"expected {self.num_levels} feature levels (MODEL.DINO.NUM_FEATURE_LEVELS), got "
                             f"{len(feats)} features, {len(masks)} masks, {len(pos_embeds)} position embeddings")
        n = feats[0].shape[0]
        if class_masks.shape != (n, self.num_classes) or class_masks.dtype != torch.bool:
            raise ValueError(f"class_masks must be bool ({n}, {self.num_classes}), got {class_masks.dtype} "
                             f"{tuple(class_masks.shape)}")
        src = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], 1)
        mask = torch.cat([m.flatten(1) for m in masks], 1)
        pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl] for lvl, p in enumerate(pos_embeds)], 1)
        spatial_shapes = torch.as_tensor([f.shape[-2:] for f in feats], dtype=torch.long, device=src.device)
        areas = spatial_shapes.prod(1)
        level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
        ratios = torch.stack([valid_ratios(m) for m in masks], 1).to(src.dtype)

        memory = self.encoder(src, pos, spatial_shapes, level_start_index, ratios, mask, ctx)

        # two-stage: score every token's proposal, keep the top Q within each image's class block
        proposals, invalid = encoder_proposals(memory, mask, spatial_shapes)
        out_memory = self.enc_output_norm(self.enc_output(memory.masked_fill(invalid[..., None], 0.0)))
        enc_logits_all = self.enc_class_head(out_memory)
        enc_coord_unact = self.enc_box_head(out_memory) + proposals
        topk = select_topk_in_blocks(enc_logits_all, class_masks, self.num_queries, invalid)
        enc_logits = enc_logits_all.gather(1, topk[..., None].expand(-1, -1, self.num_classes))
        topk_coord_unact = enc_coord_unact.gather(1, topk[..., None].expand(-1, -1, 4))
        enc_boxes = topk_coord_unact.sigmoid()

        # mixed query selection: learned content, positions from the encoder
        tgt = self.tgt_embed.weight[None].expand(n, -1, -1)
        reference = enc_boxes.detach()
        labels = masked_class_argmax(enc_logits, class_masks)
        fixed_labels = None
        segments = torch.zeros(self.num_queries, dtype=torch.long, device=src.device)
        if dn_meta is not None:
            pad = dn_meta["pad_size"]
            groups = dn_meta["num_dn_group"]
            tgt = torch.cat([dn_query_label, tgt], 1)
            reference = torch.cat([dn_query_bbox.sigmoid(), reference], 1)
            dn_labels = dn_meta["dn_labels"]
            # empty DN slots (-1) have no label: they start at their block's first class, then
            # follow their own predictions like matching queries
            labels = torch.cat([torch.where(dn_labels >= 0, dn_labels, class_masks.float().argmax(1)[:, None]),
                                labels], 1)
            fixed_labels = torch.cat([dn_labels, dn_labels.new_full((n, self.num_queries), -1)], 1)
            dn_segments = torch.arange(pad, device=src.device) // (2 * dn_meta["single_pad"])
            segments = torch.cat([dn_segments, segments + groups])

        logits, boxes = self.decoder(tgt, reference, memory, mask, spatial_shapes, level_start_index, ratios,
                                     dn_attn_mask, class_masks, ctx, labels, segments, fixed_labels)
        return {"logits": logits, "boxes": boxes, "enc_logits": enc_logits, "enc_boxes": enc_boxes,
                "topk_index": topk}


def build_dino_transformer(d_model: int = 256, n_heads: int = 8, d_ffn: int = 2048, enc_layers: int = 6,
                           dec_layers: int = 6, num_levels: int = 4, enc_points: int = 4, dec_points: int = 4,
                           num_queries: int = 900, num_classes: int = 91, dropout: float = 0.0,
                           activation: str = "relu", query_pe_temperature: float = 10000.0,
                           look_forward_twice: bool = True, moe: Optional[MoESpec] = None,
                           class_blocks: Sequence[Sequence[int]] = (), share_class_head: bool = False,
                           share_box_head: bool = False, msda_impl: str = "auto") -> DINOTransformer:
    """Build a :class:`DINOTransformer`; layer ``i``'s FFN comes from ``build_ffn("encoder.i"/"decoder.i", ...)``.

    ``class_blocks``: the label space's ``(start, stop)`` blocks; every class head computes one matmul per block
    (see :class:`~gem_d2.layers.blockwise_linear.BlockwiseLinear`). ``share_class_head``/``share_box_head``:
    one decoder head for all layers (see :class:`DeformableDecoder`); the encoder's heads are always its own.
    ``msda_impl``: the deformable-attention implementation (``MODEL.DINO.MSDA_IMPL``: auto | pytorch | ext)."""
    for key, v in (("HIDDEN_DIM", d_model), ("NHEADS", n_heads), ("DIM_FEEDFORWARD", d_ffn),
                   ("ENC_LAYERS", enc_layers), ("DEC_LAYERS", dec_layers), ("NUM_FEATURE_LEVELS", num_levels),
                   ("ENC_N_POINTS", enc_points), ("DEC_N_POINTS", dec_points), ("NUM_QUERIES", num_queries),
                   ("NUM_CLASSES", num_classes)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"MODEL.DINO.{key} must be a positive int, got {v!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"MODEL.DINO.DROPOUT must be in [0, 1), got {dropout!r}")
    if moe is not None:
        known = {f"encoder.{i}" for i in range(enc_layers)} | {f"decoder.{i}" for i in range(dec_layers)}
        unknown = sorted(set(moe.layers) - known)
        if unknown:
            raise ValueError(f"MODEL.GEM.MOE_LAYERS names {unknown}, which are not FFNs of this model; expected "
                             f"'encoder.i' (i < {enc_layers}) or 'decoder.i' (i < {dec_layers})")
    enc = DeformableEncoder([
        DeformableEncoderLayer(d_model, n_heads, num_levels, enc_points,
                               build_ffn(f"encoder.{i}", d_model, d_ffn, dropout, activation, moe), dropout)
        for i in range(enc_layers)])
    dec = DeformableDecoder([
        DeformableDecoderLayer(d_model, n_heads, num_levels, dec_points,
                               build_ffn(f"decoder.{i}", d_model, d_ffn, dropout, activation, moe), dropout)
        for i in range(dec_layers)], d_model, num_classes, query_pe_temperature, look_forward_twice, class_blocks,
        share_class_head, share_box_head)
    return set_msda_impl(DINOTransformer(enc, dec, d_model, num_levels, num_queries, num_classes, class_blocks),
                         msda_impl)

