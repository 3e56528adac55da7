"""params: parameter counts of the shipped model configs vs the reference DINO-4scale R50.

    python tools/benchmark.py params [--output output/benchmarks/params.json]

The reference figure is IDEA-Research/DINO (config/DINO/DINO_4scale.py, 91 classes, one class/box
head per decoder layer) built on CPU: 47,673,177 parameters (tests/test_dino_model.py).
"""
from benchmarks.common import add_output, write_json

REFERENCE_DINO_4SCALE_R50 = 47_673_177


def add_arguments(parser):
    add_output(parser, "params")


def count_parameters(cfg):
    """(all parameters, parameters inside MoE experts) of the model ``cfg`` builds."""
    from detectron2.modeling import build_model

    model = build_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return total, experts


def run(args) -> dict:
    import gem_d2  # noqa: F401  (shims, registrations)
    from gem_d2 import model_zoo

    rows = []
    base = model_zoo.get_config("Base-GEM-DINO.yaml")
    base.MODEL.DEVICE, base.MODEL.DINO.NUM_CLASSES = "cpu", 91
    total, _ = count_parameters(base)
    rows.append(("DINO-4scale R50, dense, 91 classes (Base-GEM-DINO.yaml)", total, 0))
    gem = model_zoo.get_config("gem_dino_uodb.yaml")
    gem.MODEL.DEVICE = "cpu"  # NUM_CLASSES 0: the UODB label space (195 classes)
    gem.MODEL.GEM.ROUTER, gem.MODEL.GEM.MOE_LAYERS = "topk", list(gem.MODEL.GEM.MOE_LAYERS)  # same experts, no plan
    total_moe, experts = count_parameters(gem)
    rows.append(("GEM-DINO UODB: 195 classes, 8 experts x dec 0/2/4 (gem_dino_uodb)", total_moe, experts))
    print(f"{'model':<62} {'parameters':>12} {'in experts':>12} {'vs reference':>13}")
    for name, n, e in rows:
        print(f"{name:<62} {n:>12,} {e:>12,} {100 * (n / REFERENCE_DINO_4SCALE_R50 - 1):>+12.2f}%")
    print(f"{'reference IDEA-Research/DINO 4-scale R50':<62} {REFERENCE_DINO_4SCALE_R50:>12,}")
    result = {"reference": REFERENCE_DINO_4SCALE_R50, "rows": [dict(model=r[0], params=r[1], expert_params=r[2])
                                                                for r in rows]}
    write_json(args.output, result)
    return result
