"""Putting image files into the output tree: link or copy when the format already matches, else re-encode."""
import os
import shutil
import warnings
from contextlib import contextmanager

import numpy as np
from PIL import Image

from gem_d2.prepare.errors import SourceFormatError

LINK_MODES = ("hardlink", "symlink", "copy")
JPEG_QUALITY = 95  # for images that must be re-encoded as JPEG (KITTI frames, DOTA patches)
_SAME_FORMAT = {".jpg": {".jpg", ".jpeg"}, ".png": {".png"}}


@contextmanager
def large_images():
    """Let PIL open very large images (DOTA scenes reach 20000 x 20000 px, past its decompression-bomb limit)."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def image_size(path) -> tuple:
    """``(width, height)`` from the image header; a missing or unreadable file raises :class:`SourceFormatError`."""
    if not os.path.isfile(path):
        raise SourceFormatError(path, "image file not found")
    try:
        with large_images(), Image.open(path) as im:
            return im.size
    except (OSError, SyntaxError, ValueError) as e:
        raise SourceFormatError(path, f"cannot read image: {e}") from None


def load_image(path, mode=None) -> Image.Image:
    """Decode ``path`` fully (converted to ``mode`` when given); missing/unreadable -> :class:`SourceFormatError`."""
    if not os.path.isfile(path):
        raise SourceFormatError(path, "image file not found")
    try:
        with large_images(), Image.open(path) as im:
            im.load()
            return im.convert(mode) if mode and im.mode != mode else im.copy()
    except (OSError, SyntaxError, ValueError) as e:
        raise SourceFormatError(path, f"cannot read image: {e}") from None


def save_image(image, dst) -> None:
    """Encode a PIL image or a uint8 array to ``dst``; the format follows the extension (JPEG quality 95)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.splitext(dst)[1].lower() in (".jpg", ".jpeg"):
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        image.save(dst, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(dst, format="PNG")


def place_image(src, dst, link_mode: str = "hardlink") -> None:
    """Put ``src`` at ``dst``: linked or copied when both have the same format, else decoded and re-encoded.

    ``link_mode``: ``hardlink`` (falls back to a copy across file systems), ``symlink`` (absolute) or ``copy``.
    """
    if link_mode not in LINK_MODES:
        raise ValueError(f"link_mode must be one of {LINK_MODES}, got {link_mode!r}")
    if not os.path.isfile(src):
        raise SourceFormatError(src, "image file not found")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    src_ext, dst_ext = os.path.splitext(src)[1].lower(), os.path.splitext(dst)[1].lower()
    if src_ext not in _SAME_FORMAT.get(dst_ext, {dst_ext}):
        save_image(load_image(src), dst)
        return
    if link_mode == "symlink":
        os.symlink(os.path.abspath(src), dst)
        return
    if link_mode == "hardlink":
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another file system, or links not allowed: copy instead
    shutil.copyfile(src, dst)
