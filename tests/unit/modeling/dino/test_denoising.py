"""Contrastive denoising: shapes, the exact attention mask, label/box noise, output splitting."""
import pytest
import torch

from gem_d2.layers.box_ops import box_cxcywh_to_xyxy
from gem_d2.modeling.dino.denoising import cdn_attention_mask, dn_match_indices, prepare_cdn, split_dn_outputs

F64 = torch.float64


def target(labels, boxes):
    return {"labels": torch.tensor(labels, dtype=torch.long), "boxes": torch.tensor(boxes, dtype=F64).view(-1, 4)}


def random_targets(counts, num_classes=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in counts:
        centre = 0.3 + 0.4 * torch.rand(c, 2, generator=g, dtype=F64)
        size = 0.05 + 0.2 * torch.rand(c, 2, generator=g, dtype=F64)
        out.append({"labels": torch.randint(0, num_classes, (c,), generator=g), "boxes": torch.cat([centre, size], 1)})
    return out


def test_attention_mask_exact_pattern():
    # 2 groups of (1 positive + 1 negative), 2 matching queries; 1 = blocked (row = query, column = key)
    expected = torch.tensor([
        [0, 0, 1, 1, 0, 0],  # group 0 positive: sees its group and the matching queries
        [0, 0, 1, 1, 0, 0],  # group 0 negative
        [1, 1, 0, 0, 0, 0],  # group 1 positive
        [1, 1, 0, 0, 0, 0],  # group 1 negative
        [1, 1, 1, 1, 0, 0],  # matching queries see no DN query
        [1, 1, 1, 1, 0, 0],
    ], dtype=torch.bool)
    assert torch.equal(cdn_attention_mask(2, 1, 2), expected)

    # three groups of 2 x 2 queries, one matching query
    b = torch.ones(4, 4, dtype=torch.bool)
    z = torch.zeros(4, 4, dtype=torch.bool)
    dn = torch.cat([torch.cat([z, b, b], 1), torch.cat([b, z, b], 1), torch.cat([b, b, z], 1)], 0)
    expected3 = torch.zeros(13, 13, dtype=torch.bool)
    expected3[:12, :12] = dn
    expected3[12, :12] = True
    assert torch.equal(cdn_attention_mask(3, 2, 1), expected3)


@pytest.mark.parametrize("counts,dn_number,groups", [
    ([2, 0, 3], 100, 33),   # an empty image in the batch
    ([1, 1], 100, 100),
    ([5], 3, 1),            # more objects than the DN budget: still one group
    ([0, 4, 2, 1], 10, 2),
])
def test_cdn_shapes_and_layout(counts, dn_number, groups):
    targets = random_targets(counts)
    label_enc = torch.nn.Embedding(6, 8).double()
    q = 7
    label, bbox, mask, meta = prepare_cdn(targets, dn_number, 0.5, 1.0, 6, label_enc, q)
    b = max(counts)
    pad = 2 * groups * b
    assert (meta["num_dn_group"], meta["single_pad"], meta["pad_size"], meta["num_queries"]) == (groups, b, pad, q)
    assert meta["num_targets"] == counts
    assert label.shape == (len(counts), pad, 8) and bbox.shape == (len(counts), pad, 4)
    assert mask.shape == (pad + q, pad + q) and mask.dtype == torch.bool
    assert torch.equal(mask, cdn_attention_mask(groups, b, q))
    # filled slots: first M_i of each half-group; content = embedding of the noised label
    for i, c in enumerate(counts):
        slots = (torch.arange(pad) % b) < c
        assert torch.equal(meta["dn_valid"][i], slots)
        assert torch.equal(meta["dn_labels"][i] >= 0, slots)
        filled = meta["dn_labels"][i][slots]
        assert torch.equal(label[i][slots], label_enc.weight[filled])
        assert torch.equal(label[i][~slots], torch.zeros_like(label[i][~slots]))
        assert torch.equal(bbox[i][~slots], torch.zeros_like(bbox[i][~slots]))
    # fixed DN correspondence: positive k of group g at g * 2B + k
    for (pred, tgt), c in zip(dn_match_indices(meta), counts):
        assert pred.tolist() == [g * 2 * b + k for g in range(groups) for k in range(c)]
        assert tgt.tolist() == list(range(c)) * groups


def test_cdn_disabled_cases():
    label_enc = torch.nn.Embedding(6, 8)
    targets = random_targets([2, 1])
    assert prepare_cdn(targets, 0, 0.5, 1.0, 6, label_enc, 5) == (None, None, None, None)
    assert prepare_cdn(targets, 100, 0.5, 1.0, 6, label_enc, 5, training=False) == (None, None, None, None)
    assert prepare_cdn(random_targets([0, 0]), 100, 0.5, 1.0, 6, label_enc, 5) == (None, None, None, None)


def test_label_noise_stays_inside_each_block():
    counts = [3, 2, 4]
    blocks = torch.tensor([[0, 3], [3, 5], [5, 10]])
    targets = random_targets(counts, seed=1)
    for t, (start, stop) in zip(targets, blocks.tolist()):
        t["labels"] = start + t["labels"] % (stop - start)
    label_enc = torch.nn.Embedding(10, 4)
    gen = torch.Generator().manual_seed(0)
    _, _, _, meta = prepare_cdn(targets, 200, 1.0, 1.0, 10, label_enc, 5, class_blocks=blocks, generator=gen)
    labels, valid = meta["dn_labels"], meta["dn_valid"]
    changed = 0
    for i, (start, stop) in enumerate(blocks.tolist()):
        got = labels[i][valid[i]]
        assert got.min() >= start and got.max() < stop
        truth = targets[i]["labels"].repeat(2 * meta["num_dn_group"])
        changed += int((got != truth).sum())
        assert set(got.tolist()) == set(range(start, stop))  # the whole block is reachable
    # flip probability 0.5, then a uniform draw that keeps the true label with prob 1/width
    total = int(valid.sum())
    expected = sum(0.5 * (1 - 1 / (stop - start)) * 2 * meta["num_dn_group"] * c
                   for c, (start, stop) in zip(counts, blocks.tolist()))
    assert abs(changed - expected) < 4 * (total * 0.25) ** 0.5


def test_label_noise_without_blocks_and_no_noise():
    targets = random_targets([3, 3], seed=2)
    label_enc = torch.nn.Embedding(6, 4)
    _, _, _, meta = prepare_cdn(targets, 6, 0.0, 0.0, 6, label_enc, 5)
    truth = torch.stack([t["labels"].repeat(4) for t in targets])
    assert torch.equal(meta["dn_labels"], truth)  # ratio 0: no flips
    gen = torch.Generator().manual_seed(3)
    _, _, _, meta = prepare_cdn(targets, 300, 1.0, 0.0, 6, label_enc, 5, generator=gen)
    assert set(meta["dn_labels"].flatten().tolist()) == set(range(6))


def test_box_noise_bounds():
    counts = [3, 1]
    targets = random_targets(counts, seed=4)  # boxes well inside the image: no clamping with scale 0.4
    label_enc = torch.nn.Embedding(6, 4).double()
    scale = 0.4
    gen = torch.Generator().manual_seed(5)
    _, bbox, _, meta = prepare_cdn(targets, 30, 0.5, scale, 6, label_enc, 5, generator=gen)
    b, groups = meta["single_pad"], meta["num_dn_group"]
    pos_shift, neg_shift = [], []
    for i, t in enumerate(targets):
        truth = box_cxcywh_to_xyxy(t["boxes"])
        half = t["boxes"][:, 2:].repeat(1, 2) / 2
        for g in range(groups):
            for half_idx, bucket in ((0, pos_shift), (1, neg_shift)):
                start = g * 2 * b + half_idx * b
                noised = box_cxcywh_to_xyxy(bbox[i, start:start + counts[i]].sigmoid())
                bucket.append((noised - truth).abs() / (half * scale))  # shift in units of scale * (w/2, h/2)
    pos, neg = torch.cat(pos_shift), torch.cat(neg_shift)
    assert pos.max() < 1 + 1e-9 and neg.min() > 1 - 1e-9 and neg.max() < 2 + 1e-9
    assert pos.min() < 0.1 and neg.max() > 1.9  # the whole ranges are used
    # both directions occur
    signs = torch.sign(box_cxcywh_to_xyxy(bbox[0, :3].sigmoid()) - box_cxcywh_to_xyxy(targets[0]["boxes"]))
    assert (signs > 0).any() and (signs < 0).any()


def test_box_noise_clamps_to_image():
    targets = [target([0], [0.05, 0.95, 0.1, 0.1])]
    gen = torch.Generator().manual_seed(0)
    _, bbox, _, _ = prepare_cdn(targets, 50, 0.0, 1.0, 2, torch.nn.Embedding(2, 4).double(), 3, generator=gen)
    xyxy = box_cxcywh_to_xyxy(bbox[0].sigmoid())
    assert xyxy.min() > -1e-4 and xyxy.max() < 1 + 1e-4


def test_generator_makes_cdn_reproducible():
    targets = random_targets([2, 3], seed=6)
    label_enc = torch.nn.Embedding(6, 4)
    runs = [prepare_cdn(targets, 20, 0.5, 1.0, 6, label_enc, 5, generator=torch.Generator().manual_seed(9))
            for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_bad_arguments():
    targets = random_targets([2, 1])
    with pytest.raises(ValueError, match="class_blocks"):
        prepare_cdn(targets, 10, 0.5, 1.0, 6, torch.nn.Embedding(6, 4), 5, class_blocks=torch.tensor([[0, 3]]))
    with pytest.raises(ValueError, match="start < stop"):
        prepare_cdn(targets, 10, 0.5, 1.0, 6, torch.nn.Embedding(6, 4), 5, class_blocks=torch.tensor([[0, 3], [4, 7]]))
    with pytest.raises(ValueError, match="num_classes"):
        prepare_cdn(targets, 10, 0.5, 1.0, 6, torch.nn.Embedding(4, 4), 5)


def test_split_dn_outputs():
    _, _, _, meta = prepare_cdn(random_targets([2, 1]), 4, 0.5, 1.0, 6, torch.nn.Embedding(6, 4), 3)
    pad = meta["pad_size"]
    cls = torch.arange(3 * 2 * (pad + 3) * 6, dtype=torch.float32).view(3, 2, pad + 3, 6)
    box = torch.rand(3, 2, pad + 3, 4)
    (dc, db), (mc, mb) = split_dn_outputs(cls, box, meta)
    assert dc.shape == (3, 2, pad, 6) and mc.shape == (3, 2, 3, 6) and db.shape == (3, 2, pad, 4)
    assert torch.equal(torch.cat([dc, mc], 2), cls) and torch.equal(torch.cat([db, mb], 2), box)
    assert split_dn_outputs(cls, box, None) == ((None, None), (cls, box))
    with pytest.raises(ValueError, match="pad_size"):
        split_dn_outputs(cls[:, :, 1:], box[:, :, 1:], meta)
