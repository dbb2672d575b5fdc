"""vzero.images: header probing and decoding every accepted mode to 8-bit RGB."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.vzero.image_helpers import encoded, noise_image
from vzero.images import decode_rgb, encode_png, image_size, probe


def test_image_size_reads_header_of_truncated_file():
    data = encoded(noise_image(40, 30))
    assert image_size(data[: len(data) // 2]) == (40, 30)  # header alone suffices


def test_decode_truncated_png_raises():
    data = encoded(noise_image(40, 30))
    with pytest.raises(OSError, match=r"truncated|broken|unrecognized|image file"):
        decode_rgb(data[: len(data) // 2])


def test_sixteen_bit_gray_scales_to_eight_bit():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 0, 1, 128, 255 in 8 bit
    data = encoded(Image.fromarray(values))
    assert probe(data).mode == "I;16"
    rgb = np.asarray(decode_rgb(data))
    assert rgb.shape == (1, 4, 3)
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_rgba_composited_over_white():
    img = Image.new("RGBA", (2, 1))
    img.putpixel((0, 0), (10, 20, 30, 0))  # fully transparent: its stored colour must not show
    img.putpixel((1, 0), (200, 0, 0, 255))
    rgb = np.asarray(decode_rgb(encoded(img)))
    np.testing.assert_array_equal(rgb[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(rgb[0, 1], [200, 0, 0])


def test_palette_with_transparency_composited_over_white():
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    rgb = np.asarray(decode_rgb(encoded(img, transparency=0)))
    np.testing.assert_array_equal(rgb[0], [[255, 255, 255], [0, 255, 0]])


@pytest.mark.parametrize(("mode", "fmt"), [("L", "PNG"), ("LA", "PNG"), ("CMYK", "JPEG"), ("1", "PNG"), ("L", "WEBP")])
def test_other_modes_become_rgb(mode, fmt):
    data = encoded(noise_image(8, 6).convert(mode), fmt)
    img = decode_rgb(data)
    assert (img.mode, img.size) == ("RGB", (8, 6))


def test_encode_png_roundtrips_pixels():
    img = noise_image(9, 7)
    np.testing.assert_array_equal(np.asarray(decode_rgb(encode_png(img))), np.asarray(img))
