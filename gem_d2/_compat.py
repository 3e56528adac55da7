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
compiled fast path (we call pycocotools directly); ``default_setup``'s environment table needs
``tolerate_missing_compiled_extension()`` (called by tools/train_net.py) on a build without ``_C``.
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


def tolerate_missing_compiled_extension() -> None:
    """Let ``default_setup`` run on a detectron2 built without ``_C`` (tools/bootstrap.py's stand-in).

    Its environment table asks ``detectron2._C`` for the compiler version, which the stand-in refuses;
    the table is informational only, so the gap is reported in it instead of failing the run. Idempotent.
    """
    from detectron2.engine import defaults

    collect = defaults.collect_env_info
    if getattr(collect, "_gem_tolerant", False):
        return

    def collect_env_info():
        try:
            return collect()
        except NotImplementedError as e:
            return f"(detectron2 environment table unavailable: {e})"

    collect_env_info._gem_tolerant = True
    defaults.collect_env_info = collect_env_info
