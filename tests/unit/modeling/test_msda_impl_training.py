"""The tiny GEM-DINO trained a few steps with MODEL.DINO.MSDA_IMPL pytorch and ext gives the same losses."""
import numpy as np
import pytest
import torch

import gem_d2  # noqa: F401  (shims + registrations before detectron2)

# isort: split
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from gem_d2.data.label_space import UnifiedLabelSpace
from gem_d2.data.synthetic_styles import STYLES, render_image
from gem_d2.engine.setup import build_cfg
from gem_d2.layers.ms_deform_attn import MSDeformAttn, ext_status
from gem_d2.planner.mapping import GemMapping

STEPS = 3


def _inputs(space: UnifiedLabelSpace, size: int):
    """One generated image of two domains (two class blocks), as the mapper gives them to the model."""
    inputs = []
    for domain_index, domain in [(0, "photo"), (1, "cartoon")]:
        style = STYLES[domain]
        image, boxes = render_image(style, np.random.default_rng([0, domain_index]), size, style.classes[0])
        index = space.dataset_index(f"synth_{domain}_train")
        start, stop = space.block(index)
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor([[x0, y0, x1 + 1, y1 + 1] for _, x0, y0, x1, y1 in boxes],
                                           dtype=torch.float32))
        inst.gt_classes = torch.tensor([start + style.classes.index(c) for c, *_ in boxes], dtype=torch.long)
        arr = np.asarray(image.convert("RGB")).copy()
        inputs.append({"image": torch.from_numpy(arr).permute(2, 0, 1), "instances": inst, "dataset_id": index,
                       "class_block": (start, stop), "height": size, "width": size})
    return inputs


def _train(tiny_config: str, impl: str):
    cfg = build_cfg(tiny_config, ["MODEL.DEVICE", "cpu", "MODEL.DINO.MSDA_IMPL", impl])
    units = list(cfg.DATASETS.TRAIN)
    GemMapping.create(units, [[i % 2] for i in range(len(units))], num_experts=2).to_cfg(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert {m.impl for m in model.modules() if isinstance(m, MSDeformAttn)} == {impl}
    model.train()
    # SGD: Adam would turn gradients that are zero up to rounding into full-size steps of either sign
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    inputs = _inputs(UnifiedLabelSpace.from_cfg(cfg), int(cfg.INPUT.MAX_SIZE_TRAIN))
    torch.manual_seed(1)  # the denoising noise
    history = []
    for _ in range(STEPS):
        losses = model(inputs)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        history.append({k: float(v) for k, v in losses.items()})
    return history


@pytest.mark.skipif(ext_status()[0] is None, reason=f"torch-ms-deform-attn is not built here: {ext_status()[1]}")
def test_training_losses_match_between_implementations(tiny_config):
    reference = _train(tiny_config, "pytorch")
    compiled = _train(tiny_config, "ext")
    for step, (a, b) in enumerate(zip(reference, compiled)):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], abs=1e-4, rel=1e-4), (step, key)
    assert reference[-1] != reference[0]  # the model did train
