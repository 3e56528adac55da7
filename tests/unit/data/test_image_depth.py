"""16-bit images reach the model as 8 bits by v >> 8 (order and spread kept), not clipped to 255."""
import numpy as np
import pytest
from PIL import Image

import gem_d2  # noqa: F401  (shims before detectron2)

# isort: split
from gem_d2.data import read_image_checked
from gem_d2.data.mapper import image_to_8bit


def _gradient_png(path):
    """A 256 x 256 16-bit PNG holding every value 0..65535 once, in raster order."""
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(values).save(path)
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I")  # the file really is 16-bit
    return values


@pytest.mark.parametrize("fmt", ["RGB", "BGR", "L", None])
def test_full_range_gradient_keeps_order_and_spread(tmp_path, fmt):
    values = _gradient_png(tmp_path / "g.png")
    image = read_image_checked(str(tmp_path / "g.png"), format=fmt)
    assert image.dtype == np.uint8 and image.shape[:2] == (256, 256)
    gray = image.reshape(256 * 256, -1)
    assert (gray == gray[:, :1]).all()  # gray stays gray in every channel
    gray = gray[:, 0].astype(int)
    assert gray.min() == 0 and gray.max() == 255
    assert (np.diff(gray) >= 0).all()  # monotone: the order of the 16-bit values is kept
    assert len(np.unique(gray)) == 256  # every 8-bit level is used
    assert (gray == 255).mean() <= 1 / 256
    np.testing.assert_array_equal(gray, values.reshape(-1) >> 8)


def test_control_plain_conversion_saturates(tmp_path):
    _gradient_png(tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as im:
        clipped = np.asarray(im.convert("RGB"))[..., 0]
    assert (clipped == 255).mean() > 0.99  # what the mapper used to get


def test_mode_i_and_other_modes():
    wide = Image.fromarray(np.array([[-5, 0, 255, 256, 65535, 70000]], dtype=np.int32))
    assert wide.mode == "I"
    assert np.asarray(image_to_8bit(wide)).tolist() == [[0, 0, 0, 1, 255, 255]]
    rgb = Image.new("RGB", (2, 2), (1, 2, 3))
    assert image_to_8bit(rgb) is rgb


def test_8bit_images_are_unchanged(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "c.png")
    np.testing.assert_array_equal(read_image_checked(str(tmp_path / "c.png"), "RGB"), pixels)
    np.testing.assert_array_equal(read_image_checked(str(tmp_path / "c.png"), "BGR"), pixels[..., ::-1])
