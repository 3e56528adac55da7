"""GMU Kitchen Scenes (``gmu_scene_00N/Images/*.png`` + ``gmu_scene_00N/Annotations/*.xml``) -> UODB ``Kitchen``.

The per-scene annotations are VOC XML with 1-based coordinates (as the UODB loader reads Kitchen, offset 1);
they are parsed, filtered to the 11 UODB product classes (reference code ``kitchen_voc.py``) and rewritten.
Image ids are ``<scene>_<frame>`` (the naming DAMEX's converter gives UODB Kitchen files,
``jinga-lala/DAMEX:datasets/voc_to_coco.py``). UODB's train/test lists are not public; we split by scene,
so no view of a scene is in both splits: scenes 2, 4 and 5 -> ``test`` (3 of the 9 scenes), the others
-> ``train``; ``--kitchen-test-scenes`` changes it. Frames are PNG, linked.
"""
import glob
import os
from typing import List, Sequence, Tuple

from gem_d2.data.voc_xml import VocBox
from gem_d2.prepare.base import Context, Converter, folder_stats
from gem_d2.prepare.errors import SourceFormatError
from gem_d2.prepare.images import image_size
from gem_d2.prepare.xmlio import parse_voc_xml

DEFAULT_TEST_SCENES = (2, 4, 5)


def scene_number(scene: str) -> int:
    digits = scene.rsplit("_", 1)[-1]
    if not digits.isdigit():
        raise ValueError(f"not a GMU scene folder name (gmu_scene_<number>): {scene!r}")
    return int(digits)


class KitchenConverter(Converter):
    key = "kitchen"
    source_dir = "GMU_Kitchens"
    expected = ("GMU_Kitchens/gmu_scene_001 ... gmu_scene_009, each with Images/rgb_*.png and Annotations/rgb_*.xml "
                "(the GMU Kitchen Scenes release)")

    def __init__(self, test_scenes: Sequence[int] = DEFAULT_TEST_SCENES):
        self.test_scenes = tuple(sorted(set(int(s) for s in test_scenes)))

    def options(self):
        return {"test_scenes": list(self.test_scenes)}

    def _frames(self, src) -> List[Tuple[str, str, str, str]]:
        self.require(src, "dataset folder")
        scenes = sorted(d for d in glob.glob(os.path.join(src, "gmu_scene_*")) if os.path.isdir(d))
        if not scenes:
            self.require(os.path.join(src, "gmu_scene_001"), "scene folder")
        numbers = {scene_number(os.path.basename(s)) for s in scenes}
        unknown = [n for n in self.test_scenes if n not in numbers]
        if unknown:
            raise ValueError(f"kitchen: test scene(s) {unknown} not found in {src} (scenes: {sorted(numbers)})")
        out = []
        for scene_dir in scenes:
            scene = os.path.basename(scene_dir)
            ann_dir = self.require(os.path.join(scene_dir, "Annotations"), "annotation folder")
            for xml in sorted(glob.glob(os.path.join(ann_dir, "*.xml"))):
                stem = os.path.splitext(os.path.basename(xml))[0]
                out.append((scene, stem, xml, os.path.join(scene_dir, "Images", stem + ".png")))
        return out

    def inputs(self, src):
        return [f for _, _, xml, image in self._frames(src) for f in (xml, image)]

    def convert(self, src, ctx: Context):
        writer = ctx.writer(self.spec, "Kitchen")
        for scene, stem, xml, image in ctx.progress(self._frames(src), desc=self.key):
            if not os.path.isfile(image):
                raise SourceFormatError(xml, f"its image {image} not found")
            ann = parse_voc_xml(xml)
            width, height = (ann.width, ann.height) if ann.width > 0 and ann.height > 0 else image_size(image)
            boxes = [VocBox(b.name, b.x1 - 1, b.y1 - 1, b.x2 - 1, b.y2 - 1, b.difficult) for b in ann.boxes]
            split = "test" if scene_number(scene) in self.test_scenes else "train"
            writer.add(split, f"{scene}_{stem}", width, height, boxes, source=image)
        return folder_stats("Kitchen", writer.finish(required_splits=("train", "test")))
