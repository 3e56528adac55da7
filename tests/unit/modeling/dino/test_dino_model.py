"""The DINO body: position embeddings, neck, transformer geometry, two-stage selection, look-forward-twice,
routing context, the DINO module and the GEMDINO meta-architecture (training, empty images, inference,
parameter count)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import gem_d2  # noqa: F401  (shims + registrations before detectron2)

# isort: split
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from gem_d2 import model_zoo
from gem_d2.data.label_space import UnifiedLabelSpace
from gem_d2.layers.box_ops import inverse_sigmoid
from gem_d2.layers.neck import ChannelMapper
from gem_d2.layers.position_encoding import PositionEmbeddingSine, box_sine_embedding
from gem_d2.modeling.dino.denoising import prepare_cdn
from gem_d2.modeling.dino.detector import DINO, class_block_masks
from gem_d2.modeling.dino.transformer import (
    build_dino_transformer,
    encoder_proposals,
    encoder_reference_points,
    select_topk_in_blocks,
    valid_ratios,
)
from gem_d2.modeling.moe.context import RoutingContext

# IDEA-Research/DINO @ faa8520, its DINO-4scale config (91 classes, R50 torchvision backbone with
# FrozenBatchNorm2d), built on CPU with its CUDA op stubbed out, `sum(p.numel() for p in model.parameters())`
# with dec_pred_class_embed_share = dec_pred_bbox_embed_share = False, i.e. one class/box head per decoder
# layer as in detrex's DINO and in gem_d2's base config; and with the config's default shared heads.
REFERENCE_DINO_4SCALE_R50_PARAMS = 47_673_177
REFERENCE_DINO_4SCALE_R50_SHARED_PARAMS = 46_893_182


def _seed(seed=0):
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------ embeddings / neck

def _naive_sine(mask, num_feats, temperature, offset=-0.5, normalize=True):
    """Loop version of the sine embedding: (N, H, W) bool -> (N, 2F, H, W)."""
    n, h, w = mask.shape
    valid = ~mask
    out = np.zeros((n, 2 * num_feats, h, w))
    for b in range(n):
        for i in range(h):
            for j in range(w):
                y, x = valid[b, :i + 1, j].sum(), valid[b, i, :j + 1].sum()
                if normalize:
                    y = (y + offset) / (valid[b, :, j].sum() + 1e-6) * 2 * math.pi
                    x = (x + offset) / (valid[b, i, :].sum() + 1e-6) * 2 * math.pi
                for k in range(num_feats):
                    d = temperature ** (2 * (k // 2) / num_feats)
                    f = math.sin if k % 2 == 0 else math.cos
                    out[b, k, i, j] = f(y / d)
                    out[b, num_feats + k, i, j] = f(x / d)
    return out


# (temperature, offset, normalize): detrex's DINO, IDEA-Research/DINO's, DETR's unnormalised form
@pytest.mark.parametrize("temperature, offset, normalize", [(10000.0, -0.5, True), (20.0, 0.0, True),
                                                             (10000.0, 0.0, False)])
def test_position_embedding_matches_loop_reference_with_padding(temperature, offset, normalize):
    mask = torch.zeros(2, 5, 6, dtype=torch.bool)
    mask[1, 3:, :] = True
    mask[1, :, 4:] = True
    pos = PositionEmbeddingSine(num_feats=8, temperature=temperature, offset=offset, normalize=normalize)(mask)
    assert pos.shape == (2, 16, 5, 6)
    ref = _naive_sine(mask.numpy(), 8, temperature, offset, normalize)
    valid = ~mask.numpy()
    # padded rows/columns of image 1 divide by ~0 in both; compare the valid area of both images
    np.testing.assert_allclose(pos.numpy()[np.broadcast_to(valid[:, None], pos.shape)],
                               ref[np.broadcast_to(valid[:, None], ref.shape)], atol=2e-5)


def test_box_sine_embedding_order_and_values():
    box = torch.tensor([[0.25, 0.5, 0.1, 0.3]])
    emb = box_sine_embedding(box, num_feats=4, temperature=100.0)
    assert emb.shape == (1, 16)

    def one(v):
        t = v * 2 * math.pi
        return [f(t / 100.0 ** (2 * (k // 2) / 4)) for k, f in enumerate([math.sin, math.cos] * 2)]

    expected = one(0.5) + one(0.25) + one(0.1) + one(0.3)  # (y, x, w, h)
    np.testing.assert_allclose(emb[0].numpy(), expected, atol=1e-6)
    # points: (y, x)
    np.testing.assert_allclose(box_sine_embedding(box[:, :2], 4, 100.0)[0].numpy(), one(0.5) + one(0.25), atol=1e-6)
    with pytest.raises(ValueError, match="num_feats"):
        PositionEmbeddingSine(num_feats=7)


def test_channel_mapper_levels_and_errors():
    _seed()
    neck = ChannelMapper([16, 24, 40], 64, num_outs=5)
    feats = [torch.randn(2, 16, 32, 40), torch.randn(2, 24, 16, 20), torch.randn(2, 40, 8, 10)]
    outs = neck(feats)
    assert [tuple(o.shape) for o in outs] == [(2, 64, 32, 40), (2, 64, 16, 20), (2, 64, 8, 10), (2, 64, 4, 5),
                                              (2, 64, 2, 3)]
    assert neck.extra_convs[0][0].in_channels == 40  # first extra level convolves the last input feature
    assert neck.extra_convs[1][0].in_channels == 64
    for conv_gn in list(neck.convs) + list(neck.extra_convs):
        assert isinstance(conv_gn[1], nn.GroupNorm) and conv_gn[1].num_groups == 32
    with pytest.raises(ValueError, match="HIDDEN_DIM=48"):
        ChannelMapper([16], 48, 1)
    with pytest.raises(ValueError, match="NUM_FEATURE_LEVELS=1"):
        ChannelMapper([16, 24], 64, 1)


# ------------------------------------------------------------------------------------------ geometry

def test_valid_ratios_reference_points_and_proposals_by_hand():
    # one level 2x4, image 1 has only 2 valid columns and 1 valid row
    mask = torch.zeros(2, 2, 4, dtype=torch.bool)
    mask[1, :, 2:] = True
    mask[1, 1:, :] = True
    ratios = valid_ratios(mask)
    assert ratios.tolist() == [[1.0, 1.0], [0.5, 0.5]]
    shapes = torch.tensor([[2, 4]])
    ref = encoder_reference_points(shapes, ratios[:, None])
    assert ref.shape == (2, 8, 1, 2)
    # token (row 0, col 1): centre (1.5 / 4, 0.5 / 2) of a full image
    assert ref[0, 1, 0].tolist() == pytest.approx([1.5 / 4, 0.5 / 2])
    # image 1: normalised by the valid extent (2 cols, 1 row), then scaled back by the valid ratio
    assert ref[1, 1, 0].tolist() == pytest.approx([1.5 / 2 * 0.5, 0.5 / 1 * 0.5])

    memory = torch.zeros(2, 8, 3)
    props, invalid = encoder_proposals(memory, mask.flatten(1), shapes)
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    assert props[0, 1].tolist() == pytest.approx([logit(1.5 / 4), logit(0.25), logit(0.05), logit(0.05)])
    assert props[1, 1].tolist() == pytest.approx([logit(0.75), logit(0.5), logit(0.05), logit(0.05)])
    # padded tokens of image 1 are invalid and +inf
    assert invalid[1].tolist() == mask[1].flatten().tolist()
    assert torch.isinf(props[1, 2]).all() and not invalid[0].any()
    # a proposal too close to the border (cx = 3.5/4 is fine, a second level with w = 0.1 fine; x > 0.99 not)
    mask2 = torch.zeros(1, 1, 200, dtype=torch.bool)
    p2, inv2 = encoder_proposals(torch.zeros(1, 200, 1), mask2.flatten(1), torch.tensor([[1, 200]]))
    assert inv2[0, -1] and not inv2[0, 100]  # cx = 199.5 / 200 > 0.99
    assert torch.isinf(p2[0, -1]).all()


def test_select_topk_in_blocks_matches_brute_force():
    _seed()
    logits = torch.randn(3, 40, 9)
    blocks = torch.tensor([[0, 3], [3, 4], [4, 9]])
    masks = class_block_masks(blocks, 9)
    invalid = torch.zeros(3, 40, dtype=torch.bool)
    invalid[2, :5] = True
    # make the out-of-block classes the best everywhere: selection must ignore them
    logits[0, :, 3:] += 10
    idx = select_topk_in_blocks(logits, masks, 7, invalid)
    for i, (s, e) in enumerate(blocks.tolist()):
        score = {t: max(logits[i, t, s:e].tolist()) for t in range(40) if not invalid[i, t]}
        expected = sorted(score, key=lambda t: -score[t])[:7]
        assert idx[i].tolist() == expected
    with pytest.raises(ValueError, match="NUM_QUERIES=41"):
        select_topk_in_blocks(logits, masks, 41)


# ------------------------------------------------------------------------------------------ transformer

C, LEVELS, QUERIES, CLASSES = 32, 2, 10, 6


def _tiny_transformer(look_forward_twice=True, dec_layers=3):
    _seed()
    return build_dino_transformer(d_model=C, n_heads=4, d_ffn=64, enc_layers=2, dec_layers=dec_layers,
                                  num_levels=LEVELS, num_queries=QUERIES, num_classes=CLASSES,
                                  look_forward_twice=look_forward_twice)


def _tiny_inputs(n=2):
    _seed(1)
    feats = [torch.randn(n, C, 8, 10), torch.randn(n, C, 4, 5)]
    masks = [torch.zeros(n, 8, 10, dtype=torch.bool), torch.zeros(n, 4, 5, dtype=torch.bool)]
    masks[0][1, :, 8:] = True
    masks[1][1, :, 4:] = True
    pe = PositionEmbeddingSine(C // 2)
    return feats, masks, [pe(m) for m in masks]


def _randomise_heads(tr):
    # the reference zero-initialises the last box-head layer; give every head non-trivial weights
    with torch.no_grad():
        for head in list(tr.decoder.box_heads) + [tr.enc_box_head]:
            for p in head.parameters():
                p.normal_(0, 0.05)


@pytest.mark.parametrize("lft", [True, False])
def test_look_forward_twice_gradient_reaches_previous_box_head_only_with_lft(lft):
    tr = _tiny_transformer(look_forward_twice=lft)
    _randomise_heads(tr)
    feats, masks, pos = _tiny_inputs()
    blocks = torch.tensor([[0, 3], [3, 6]])
    out = tr(feats, masks, pos, class_block_masks(blocks, CLASSES), RoutingContext(dataset_ids=torch.tensor([0, 1])))
    out["boxes"][2].sum().backward()  # a loss on layer 2's boxes only
    grad_prev = tr.decoder.box_heads[1].layers[-1].weight.grad
    grad_two_back = tr.decoder.box_heads[0].layers[-1].weight.grad
    assert tr.decoder.box_heads[2].layers[-1].weight.grad.abs().sum() > 0
    if lft:
        assert grad_prev is not None and grad_prev.abs().sum() > 0
    else:
        assert grad_prev is None or grad_prev.abs().sum() == 0
    # only one step back: layer 0's box head is never reached from layer 2
    assert grad_two_back is None or grad_two_back.abs().sum() == 0


@pytest.mark.parametrize("lft", [True, False])
def test_decoder_refines_from_raw_output_and_predicts_from_normed_output(lft):
    """The references' semantics: r_i = sigmoid(box_head_i(o_i) + logit(b_i)) from the raw output o_i is the
    next reference; box_i = sigmoid(box_head_i(norm(o_i)) + logit(p_i)) with p_i = r_{i-1} (or b_0 at layer
    0); logits_i = class_head_i(norm(o_i))."""
    tr = _tiny_transformer(look_forward_twice=lft)
    _randomise_heads(tr)
    with torch.no_grad():  # the layers end in a LayerNorm: at init norm(o_i) ~ o_i, so train the final norm a bit
        tr.decoder.norm.weight.uniform_(0.5, 1.5)
        tr.decoder.norm.bias.normal_(0, 0.3)
    feats, masks, pos = _tiny_inputs()
    raw, refs = [], []
    for layer in tr.decoder.layers:
        layer.register_forward_pre_hook(lambda m, args: refs.append(args[2]))
        layer.register_forward_hook(lambda m, args, out: raw.append(out))
    ratios = torch.stack([valid_ratios(m) for m in masks], 1)
    ratios4 = torch.cat([ratios, ratios], -1)[:, None]
    blocks = torch.tensor([[0, 3], [3, 6]])
    out = tr(feats, masks, pos, class_block_masks(blocks, CLASSES), RoutingContext(dataset_ids=torch.tensor([0, 1])))
    dec = tr.decoder
    b = p = out["enc_boxes"].detach()
    with torch.no_grad():
        torch.testing.assert_close(refs[0], b[:, :, None] * ratios4)
        for i in range(3):
            h = dec.norm(raw[i])
            torch.testing.assert_close(out["logits"][i], dec.class_heads[i](h))
            torch.testing.assert_close(out["boxes"][i], (dec.box_heads[i](h) + inverse_sigmoid(p)).sigmoid())
            if i < 2:
                r = (dec.box_heads[i](raw[i]) + inverse_sigmoid(b)).sigmoid()
                torch.testing.assert_close(refs[i + 1], r[:, :, None] * ratios4)
                assert not refs[i + 1].requires_grad
                # two deltas: the prediction is not the next reference
                assert (out["boxes"][i] - r).abs().max() > 1e-4
                b = r
                p = r


def test_shared_decoder_heads_are_one_module_for_every_layer():
    shared = build_dino_transformer(d_model=C, n_heads=4, d_ffn=64, enc_layers=1, dec_layers=3, num_levels=LEVELS,
                                    num_queries=QUERIES, num_classes=CLASSES, share_class_head=True,
                                    share_box_head=True)
    dec = shared.decoder
    assert dec.class_heads[0] is dec.class_heads[2] and dec.box_heads[0] is dec.box_heads[1]
    assert dec.class_heads[0] is not shared.enc_class_head and dec.box_heads[0] is not shared.enc_box_head
    names = {n for n, _ in shared.named_parameters()}
    assert "decoder.class_heads.0.weight" in names and "decoder.class_heads.1.weight" not in names
    state = shared.state_dict()  # every layer's index is in the state dict (as the reference's checkpoints)
    w0, w2 = state["decoder.box_heads.0.layers.0.weight"], state["decoder.box_heads.2.layers.0.weight"]
    assert w0.data_ptr() == w2.data_ptr()
    _randomise_heads(shared)
    feats, masks, pos = _tiny_inputs()
    out = shared(feats, masks, pos, class_block_masks(torch.tensor([[0, 3], [3, 6]]), CLASSES),
                 RoutingContext(dataset_ids=torch.tensor([0, 1])))
    out["boxes"][2].sum().backward()
    assert dec.box_heads[0].layers[-1].weight.grad.abs().sum() > 0


def test_two_stage_topk_respects_class_blocks_in_the_transformer():
    tr = _tiny_transformer()
    feats, masks, pos = _tiny_inputs()
    # classes 3..5 (image 0's other block) score far higher than 0..2 on different tokens
    with torch.no_grad():
        tr.enc_class_head.weight.normal_(0, 1.0)
        tr.enc_class_head.bias[3:] += 20.0
    captured = {}
    tr.enc_class_head.register_forward_hook(lambda m, i, o: captured.setdefault("logits", o.detach()))
    blocks = torch.tensor([[0, 3], [3, 6]])
    out = tr(feats, masks, pos, class_block_masks(blocks, CLASSES), RoutingContext(dataset_ids=torch.tensor([0, 1])))
    logits = captured["logits"]
    _, invalid = encoder_proposals(torch.zeros(2, logits.shape[1], 1),
                                   torch.cat([m.flatten(1) for m in masks], 1), torch.tensor([[8, 10], [4, 5]]))
    for i, (s, e) in enumerate(blocks.tolist()):
        score = logits[i, :, s:e].max(-1).values.masked_fill(invalid[i], float("-inf"))
        assert out["topk_index"][i].tolist() == score.argsort(descending=True)[:QUERIES].tolist()
        torch.testing.assert_close(out["enc_logits"][i], logits[i, out["topk_index"][i]])
    # image 0 would pick different tokens if the whole label space were used
    unrestricted = logits[0].max(-1).values.masked_fill(invalid[0], float("-inf")).argsort(descending=True)[:QUERIES]
    assert unrestricted.tolist() != out["topk_index"][0].tolist()


class _Recorder(nn.Module):
    """A dense FFN stand-in that records what the routing context told it."""

    def __init__(self, log, name):
        super().__init__()
        self.log, self.name, self.lin = log, name, nn.Linear(C, C)

    def forward(self, x, ctx):
        self.log.append((self.name, None if ctx.segments is None else ctx.segments.clone(),
                         None if ctx.query_labels is None else ctx.query_labels.clone(),
                         None if ctx.key_padding_mask is None else ctx.key_padding_mask.clone(), x.shape))
        ctx.aux_losses[f"loss_aux_{self.name}"] = x.mean() * 0 + 1.0
        ctx.stats[f"tokens_{self.name}"] = torch.tensor(x.shape[1])
        return self.lin(x)


def test_routing_context_segments_query_labels_and_padding():
    tr = _tiny_transformer()
    log = []
    for i, layer in enumerate(tr.encoder.layers):
        layer.ffn = _Recorder(log, f"encoder.{i}")
    for i, layer in enumerate(tr.decoder.layers):
        layer.ffn = _Recorder(log, f"decoder.{i}")
    feats, masks, pos = _tiny_inputs()
    blocks = torch.tensor([[0, 3], [3, 6]])
    class_masks = class_block_masks(blocks, CLASSES)
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.2, 0.3]])},
               {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}]
    label_enc = nn.Embedding(CLASSES, C)
    dn = prepare_cdn(targets, 6, 0.5, 1.0, CLASSES, label_enc, QUERIES, blocks)
    meta = dn[3]
    pad, groups, single = meta["pad_size"], meta["num_dn_group"], meta["single_pad"]
    assert (pad, groups, single) == (12, 3, 2)
    ctx = RoutingContext(dataset_ids=torch.tensor([0, 1]))
    out = tr(feats, masks, pos, class_masks, ctx, *dn)

    enc = [e for e in log if e[0].startswith("encoder")]
    dec = [e for e in log if e[0].startswith("decoder")]
    assert len(enc) == 2 and len(dec) == 3
    padding = torch.cat([m.flatten(1) for m in masks], 1)
    for _, seg, labels, kpm, _ in enc:
        assert seg is None and labels is None and torch.equal(kpm, padding)
    expected_seg = torch.tensor([0] * 4 + [1] * 4 + [2] * 4 + [groups] * QUERIES)
    valid = meta["dn_valid"]
    for i, (_, seg, labels, kpm, shape) in enumerate(dec):
        assert kpm is None and torch.equal(seg, expected_seg) and shape[1] == pad + QUERIES
        # DN queries keep their noised labels at every layer
        assert torch.equal(labels[:, :pad][valid], meta["dn_labels"][valid])
        if i == 0:  # matching queries: the encoder proposal's class within the block
            prev = out["enc_logits"]
        else:
            prev = out["logits"][i - 1][:, pad:]
        expected = prev.masked_fill(~class_masks[:, None], float("-inf")).argmax(-1)
        assert torch.equal(labels[:, pad:], expected)
        for b, (s, e) in enumerate(blocks.tolist()):
            assert ((labels[b] >= s) & (labels[b] < e)).all()
    assert set(ctx.aux_losses) == {f"loss_aux_{e[0]}" for e in log}


def test_moe_layer_names_are_checked():
    from gem_d2.modeling.moe.context import MoESpec

    with pytest.raises(ValueError, match="decoder.9"):
        build_dino_transformer(d_model=C, n_heads=4, d_ffn=64, enc_layers=1, dec_layers=2, num_levels=1,
                               num_queries=4, num_classes=2, moe=MoESpec(["decoder.9"], 2, "gem"))


# ------------------------------------------------------------------------------------------ DINO module

def test_dino_outputs_and_block_restricted_predict():
    _seed()
    tr = _tiny_transformer()
    model = DINO(ChannelMapper([16, 24], C, LEVELS), PositionEmbeddingSine(C // 2), tr, dn_number=6)
    feats = [torch.randn(2, 16, 8, 10), torch.randn(2, 24, 4, 5)]
    mask = torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, :, 60:] = True
    blocks = torch.tensor([[0, 3], [3, 6]])
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.2, 0.3]])},
               {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}]
    model.train()
    out, meta, ctx = model(feats, mask, blocks, torch.tensor([0, 1]), targets)
    assert out["pred_logits"].shape == (2, QUERIES, CLASSES) and out["pred_boxes"].shape == (2, QUERIES, 4)
    assert len(out["aux_outputs"]) == 2 and out["enc_outputs"]["pred_boxes"].shape == (2, QUERIES, 4)
    assert out["dn_outputs"]["pred_logits"].shape == (2, meta["pad_size"], CLASSES)
    assert len(out["dn_outputs"]["aux_outputs"]) == 2
    assert torch.equal(ctx.dataset_ids, torch.tensor([0, 1]))

    model.eval()
    out, meta, _ = model(feats, mask, blocks, torch.tensor([0, 1]))
    assert meta is None and "dn_outputs" not in out
    results = DINO.predict(out["pred_logits"], out["pred_boxes"], blocks, num_select=25)
    for (scores, labels, _), (s, e) in zip(results, blocks.tolist()):
        assert len(scores) == min(25, QUERIES * (e - s))
        assert ((labels >= s) & (labels < e)).all()
        assert (scores[:-1] >= scores[1:]).all()
    # brute force for image 1: all (query, class) pairs of its block
    s, e = blocks[1].tolist()
    prob = out["pred_logits"][1, :, s:e].sigmoid()
    pairs = sorted(((float(prob[q, c]), q, c + s) for q in range(QUERIES) for c in range(e - s)), reverse=True)[:25]
    torch.testing.assert_close(results[1][0], torch.tensor([p[0] for p in pairs]))
    assert results[1][1].tolist() == [p[2] for p in pairs]
    torch.testing.assert_close(results[1][2], out["pred_boxes"][1, [p[1] for p in pairs]])


def test_class_block_masks_validation():
    assert class_block_masks(torch.tensor([[1, 3]]), 4).tolist() == [[False, True, True, False]]
    with pytest.raises(ValueError, match="start < stop"):
        class_block_masks(torch.tensor([[2, 2]]), 4)


# ------------------------------------------------------------------------------------------ meta-architecture

def _tiny_cfg():
    cfg = model_zoo.get_config("dino_synth_small.yaml")
    cfg.MODEL.DEVICE = "cpu"
    d = cfg.MODEL.DINO
    d.HIDDEN_DIM, d.DIM_FEEDFORWARD, d.ENC_LAYERS, d.DEC_LAYERS = 64, 128, 2, 2
    d.NUM_QUERIES, d.DN_NUMBER, d.NUM_SELECT = 20, 10, 30
    return cfg


def _inputs(space, sizes, counts, datasets, rng):
    out = []
    for (h, w), m, name in zip(sizes, counts, datasets):
        index = space.dataset_index(name)
        start, stop = space.block(index)
        inst = Instances((h, w))
        xy = rng.uniform(0, 0.6, size=(m, 2)) * [w, h]
        wh = rng.uniform(0.1, 0.35, size=(m, 2)) * [w, h]
        inst.gt_boxes = Boxes(torch.tensor(np.concatenate([xy, xy + wh], 1), dtype=torch.float32))
        inst.gt_classes = torch.tensor(rng.integers(start, stop, size=m), dtype=torch.long)
        out.append({"image": torch.tensor(rng.integers(0, 256, size=(3, h, w)), dtype=torch.uint8),
                    "instances": inst, "dataset_id": index, "class_block": (start, stop),
                    "height": 2 * h, "width": 2 * w})
    return out


@pytest.fixture(scope="module")
def tiny_model():
    _seed()
    cfg = _tiny_cfg()
    return cfg, UnifiedLabelSpace.from_cfg(cfg), build_model(cfg)


@pytest.mark.parametrize("counts", [(0, 0), (0, 3)])
def test_batches_with_empty_images_train(tiny_model, counts):
    cfg, space, model = tiny_model
    rng = np.random.default_rng(0)
    inputs = _inputs(space, [(128, 160), (160, 128)], counts, ["synth_photo_train", "synth_medical_train"], rng)
    model.train()
    model.zero_grad()
    losses = model(inputs)
    assert {"loss_class", "loss_bbox", "loss_giou", "loss_class_enc", "loss_class_0", "loss_class_dn"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    total = sum(losses.values())
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert model.dino.label_enc.weight.grad is not None  # kept in the graph even without DN queries
    if sum(counts) == 0:
        assert float(losses["loss_bbox"]) == 0 and float(losses["loss_class"]) > 0


def test_inference_returns_local_classes_and_boxes_inside_the_image(tiny_model):
    cfg, space, model = tiny_model
    rng = np.random.default_rng(1)
    names = ["synth_aerial_test", "synth_medical_test"]
    inputs = _inputs(space, [(128, 160), (96, 128)], (1, 1), names, rng)
    model.eval()
    with torch.no_grad():
        results = model(inputs)
    assert len(results) == 2
    for x, r, name in zip(inputs, results, names):
        inst = r["instances"]
        n_cls = len(space.classes(space.dataset_index(name)))
        assert inst.image_size == (x["height"], x["width"])
        assert 0 < len(inst) <= cfg.MODEL.DINO.NUM_SELECT
        assert inst.pred_classes.min() >= 0 and inst.pred_classes.max() < n_cls
        b = inst.pred_boxes.tensor
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 2] <= x["width"]).all() and (b[:, 3] <= x["height"]).all()
        assert (inst.scores[:-1] >= inst.scores[1:]).all()


def test_router_aux_losses_and_stats_surface(tiny_model):
    cfg, space, model = tiny_model
    layer = model.dino.transformer.decoder.layers[0]
    original = layer.ffn

    class Noisy(nn.Module):
        def __init__(self, ffn):
            super().__init__()
            self.ffn = ffn

        def forward(self, x, ctx):
            ctx.aux_losses["loss_router_decoder.0"] = (x ** 2).mean()
            ctx.stats["load_decoder.0"] = torch.bincount(ctx.dataset_ids, minlength=5)
            return self.ffn(x, ctx)

    layer.ffn = Noisy(original)
    try:
        inputs = _inputs(space, [(128, 128)] * 2, (2, 1), ["synth_photo_train", "synth_sketch_train"],
                         np.random.default_rng(2))
        model.train()
        losses = model(inputs)
        assert "loss_router_decoder.0" in losses and losses["loss_router_decoder.0"].requires_grad
        assert model.routing_stats["load_decoder.0"].tolist() == [1, 0, 0, 0, 1]
    finally:
        layer.ffn = original


def test_inputs_are_validated(tiny_model):
    cfg, space, model = tiny_model
    inputs = _inputs(space, [(128, 128)], (1,), ["synth_photo_train"], np.random.default_rng(3))
    del inputs[0]["dataset_id"]
    model.eval()
    with pytest.raises(KeyError, match="dataset_id"):
        model(inputs)
    inputs = _inputs(space, [(128, 128)], (1,), ["synth_photo_train"], np.random.default_rng(3))
    inputs[0]["class_block"] = (0, 99)
    with pytest.raises(ValueError, match="class_block"):
        model(inputs)


def test_num_classes_smaller_than_label_space_is_rejected():
    cfg = _tiny_cfg()
    cfg.MODEL.DINO.NUM_CLASSES = 3
    cfg.MODEL.GEM.MOE_LAYERS = []
    model = build_model(cfg)  # explicit NUM_CLASSES without MoE: the label space is not consulted
    assert model.num_classes == 3
    cfg.MODEL.GEM.MOE_LAYERS = ["decoder.0"]
    with pytest.raises(ValueError, match="NUM_CLASSES=3"):
        build_model(cfg)


@pytest.mark.parametrize("reference", ["detrex", "idea"])
def test_r50_4scale_parameter_count_matches_reference_dino(reference):
    """Base config (detrex's choices) and the same keys set as IDEA-Research/DINO (shared decoder heads,
    stem + res2 frozen, map PE temperature 20 without offset)."""
    cfg = model_zoo.get_config("Base-GEM-DINO.yaml")
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.DINO.NUM_CLASSES = 91
    expected = REFERENCE_DINO_4SCALE_R50_PARAMS
    if reference == "idea":
        d = cfg.MODEL.DINO
        d.SHARE_CLASS_HEAD = d.SHARE_BOX_HEAD = True
        d.PE_TEMPERATURE, d.PE_OFFSET = 20, 0.0
        cfg.MODEL.BACKBONE.FREEZE_AT = 2
        expected = REFERENCE_DINO_4SCALE_R50_SHARED_PARAMS
    model = build_model(cfg)
    count = sum(p.numel() for p in model.parameters())
    print(f"GEMDINO R50 4-scale, 91 classes, {reference}: {count:,} parameters (reference {expected:,})")
    assert abs(count - expected) / expected < 0.01
    dec = model.dino.transformer.decoder
    assert len(dec.class_heads) == 6 and model.dino.num_queries == 900
    pe = model.dino.position_embedding
    assert model.backbone.stem.conv1.weight.requires_grad is False
    if reference == "idea":
        assert all(h is dec.class_heads[0] for h in dec.class_heads)
        assert all(h is dec.box_heads[0] for h in dec.box_heads)
        assert model.backbone.res2[0].conv1.weight.requires_grad is False  # FREEZE_AT 2
        assert (pe.temperature, pe.offset) == (20.0, 0.0)
    else:
        assert len({id(h) for h in dec.class_heads}) == 6 and len({id(h) for h in dec.box_heads}) == 6
        assert model.backbone.res2[0].conv1.weight.requires_grad is True  # FREEZE_AT 1
        assert (pe.temperature, pe.offset) == (10000.0, -0.5)
    assert pe.normalize and dec.query_pe_temperature == 10000.0
