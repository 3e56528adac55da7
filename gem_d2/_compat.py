"""Every compatibility fix gem_d2 needs for detectron2 v0.6 on current libraries, in one place.

Applied by ``import gem_d2`` before detectron2 is imported; each fix only restores a name when it
is missing, so it is a no-op on an environment that already has it (e.g. upstream detectron2 with
older NumPy/Pillow).

- NumPy >= 1.24 removed the aliases ``np.bool/int/float/complex/object/str`` that detectron2 v0.6
  uses in ~19 places (e.g. ``data/build.py``'s class histogram, run by every train-loader build).
- Pillow >= 10 removed ``Image.LINEAR``, a default argument of ``ExtentTransform``, evaluated when
  ``detectron2.data.transforms`` is imported.

Not fixed here (handled where used): detectron2's ``launch``/``create_ddp_model`` assume CUDA, so
gem_d2.engine has its own launcher and DDP wrapping; ``COCOEvaluator`` is never used with the
compiled fast path (we call pycocotools directly).
"""
import builtins

import numpy as np
from PIL import Image

_NUMPY_ALIASES = {"bool": builtins.bool, "int": builtins.int, "float": builtins.float,
                  "complex": builtins.complex, "object": builtins.object, "str": builtins.str}


def apply() -> None:
    """Restore the removed names detectron2 v0.6 needs; idempotent."""
    for name, value in _NUMPY_ALIASES.items():
        if name not in vars(np):  # vars(): getattr would trigger NumPy's FutureWarning
            setattr(np, name, value)
    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR
