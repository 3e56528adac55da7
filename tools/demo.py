#!/usr/bin/env python
"""Images in, visualised detections out (detectron2's Visualizer), with a known dataset or auto routing.

    python tools/demo.py --config-file output/demo/config.yaml --input img1.jpg imgs/*.png \\
        --output output/vis [--dataset synth_photo_test | --auto] [--confidence-threshold 0.3] \\
        MODEL.WEIGHTS output/demo/model_final.pth

``--dataset NAME`` routes every image as that dataset (a DATASETS.TRAIN name or any dataset of the
same domain): its experts and its class block. ``--auto`` identifies each image's dataset from its
backbone features (MODEL.GEM.TEST_ROUTING auto; the checkpoint carries the dataset prototypes). The
GEM mapping comes from the checkpoint when the config has none. One PNG per input is written.
"""
import gem_d2  # noqa: F401,I001  (first: compatibility shims, registrations)

import argparse
import glob
import os

import torch
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils.visualizer import Visualizer

from gem_d2.data import UnifiedLabelSpace
from gem_d2.engine import GemCheckpointer, resolve_gem_mapping
from gem_d2.engine.setup import build_cfg, prepare_datasets


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="a gem_d2 config (e.g. a run's OUTPUT_DIR/config.yaml)")
    p.add_argument("--input", nargs="+", required=True, help="image files or glob patterns")
    p.add_argument("--output", required=True, help="folder for the visualised images")
    route = p.add_mutually_exclusive_group(required=True)
    route.add_argument("--dataset", help="route every image as this dataset")
    route.add_argument("--auto", action="store_true", help="identify each image's dataset (auto routing)")
    p.add_argument("--confidence-threshold", type=float, default=0.3, help="minimum score drawn")
    p.add_argument("opts", default=[], nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p.parse_args(argv)


def input_files(patterns):
    """Expand the patterns; a pattern matching nothing is an error naming it."""
    files = []
    for pattern in patterns:
        found = sorted(glob.glob(os.path.expanduser(pattern)))
        if not found:
            raise FileNotFoundError(f"--input {pattern!r} matches no file")
        files.extend(found)
    return files


def main(argv=None):
    args = parse_args(argv)
    cfg = build_cfg(args.config_file, args.opts)
    cfg.MODEL.GEM.TEST_ROUTING = "auto" if args.auto else "dataset"
    prepare_datasets(cfg)
    resolve_gem_mapping(cfg, eval_only=True)
    space = UnifiedLabelSpace.from_cfg(cfg)
    model = build_model(cfg).eval()
    GemCheckpointer.from_config(cfg, model).load(cfg.MODEL.WEIGHTS)
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    known = {}
    if args.dataset:
        index = space.dataset_index(args.dataset)
        known = {"dataset_id": index, "class_block": space.block(index)}
    os.makedirs(args.output, exist_ok=True)
    for path in input_files(args.input):
        image = utils.read_image(path, format=cfg.INPUT.FORMAT)
        h, w = image.shape[:2]
        resized = resize.get_transform(image).apply_image(image)
        inputs = {"image": torch.as_tensor(resized.transpose(2, 0, 1).copy()), "height": h, "width": w, **known}
        with torch.no_grad():
            out = model([inputs])[0]
        name = out.get("routed_dataset", space.dataset_names[known["dataset_id"]] if known else None)
        inst = out["instances"].to("cpu")
        inst = inst[inst.scores >= args.confidence_threshold]
        rgb = utils.convert_image_to_rgb(image, cfg.INPUT.FORMAT)
        vis = Visualizer(rgb, MetadataCatalog.get(name)).draw_instance_predictions(inst)
        target = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + ".png")
        vis.save(target)
        print(f"{path}: {len(inst)} detections as {name} -> {target}")


if __name__ == "__main__":
    main()
