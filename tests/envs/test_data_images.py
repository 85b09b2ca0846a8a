"""Image loading: formats, EXIF orientation, errors, the shared cache and JPEG draft views."""

from __future__ import annotations

import io
import os
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps
from zoomgym.envs.data import (
    MAX_IMAGE_PIXELS,
    ImageLoadError,
    Sample,
    clear_image_cache,
    image_cache_info,
    image_size,
    load_image,
    load_view_source,
    set_image_cache_capacity,
)


@pytest.fixture(autouse=True)
def fresh_cache():
    clear_image_cache()
    before = image_cache_info().max_bytes
    yield
    set_image_cache_capacity(before)
    clear_image_cache()


def sample_of(image, sample_id: str = "s1") -> Sample:
    return Sample(id=sample_id, image=image, question="q?", options=("a", "b"), answer="A")


def quadrants(width: int = 64, height: int = 48) -> Image.Image:
    """Four flat colours, one per quadrant: orientation is visible even after JPEG."""
    array = np.zeros((height, width, 3), np.uint8)
    array[: height // 2, : width // 2] = (255, 0, 0)
    array[: height // 2, width // 2 :] = (0, 255, 0)
    array[height // 2 :, : width // 2] = (0, 0, 255)
    array[height // 2 :, width // 2 :] = (255, 255, 255)
    return Image.fromarray(array)


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def smooth(width: int, height: int) -> Image.Image:
    """A smooth gradient image: JPEG artefacts stay small, so decode paths can be compared."""
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], axis=-1)
    return Image.fromarray(array.astype(np.uint8))


def test_path_bytes_and_pil_sources_give_the_same_rgb_image(tmp_path):
    original = quadrants()
    path = tmp_path / "q.png"
    original.save(path)
    for source in (path, str(path), encode(original), original, original.convert("P"), original.convert("RGBA")):
        image = load_image(sample_of(source))
        assert image.mode == "RGB"
        assert np.array_equal(np.asarray(image), np.asarray(original))


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert load_image(sample_of(encode(rgba))).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    ("values", "dtype", "expected"),
    [
        ([0, 32896, 65535], np.uint16, [0, 128, 255]),  # 16-bit PNG: rescaled, not clipped to white
        ([0, 128, 255], np.int32, [0, 128, 255]),  # 32-bit ints holding 8-bit values stay
        ([0.0, 0.5, 1.0], np.float32, [0, 128, 255]),  # float in [0, 1]
        ([-5.0, 100.0, 300.0], np.float32, [0, 100, 255]),  # other floats are clipped
    ],
)
def test_high_bit_depth_images_keep_their_contrast(values, dtype, expected):
    image = Image.fromarray(np.array([values], dtype=dtype))
    for source in (image, encode(image, "TIFF")):
        rgb = load_image(sample_of(source))
        assert rgb.mode == "RGB" and [rgb.getpixel((i, 0))[0] for i in range(3)] == expected


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    quadrants().save(path, quality=95, exif=exif)
    expected = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    sample = sample_of(path)
    image = load_image(sample)
    assert image.size == expected.size == image_size(sample)
    assert image.size == ((48, 64) if orientation >= 5 else (64, 48))
    assert np.abs(np.asarray(image, float) - np.asarray(expected, float)).max() <= 2


def test_exif_rotation_puts_the_right_corner_on_top(tmp_path):
    # Orientation 6: the camera was turned clockwise; showing it upright rotates 90 degrees clockwise,
    # so the stored bottom-left (blue) quadrant becomes the top-left.
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "o6.jpg"
    quadrants().save(path, quality=95, exif=exif)
    r, g, b = load_image(sample_of(path)).getpixel((2, 2))
    assert b > 200 and r < 60 and g < 60


def test_missing_file_names_the_file_and_sample(tmp_path):
    missing = tmp_path / "nowhere" / "img.jpg"
    with pytest.raises(ImageLoadError, match=r"sample 'vstar/7'.*nowhere/img\.jpg.*does not exist"):
        load_image(sample_of(missing, "vstar/7"))
    assert issubclass(ImageLoadError, ValueError)


def test_corrupt_bytes_name_embedded_bytes_and_sample():
    with pytest.raises(ImageLoadError, match=r"sample 'mme-12'.*embedded bytes"):
        load_image(sample_of(b"definitely not an image", "mme-12"))


def test_corrupt_file_names_the_file(tmp_path):
    path = tmp_path / "bad.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageLoadError, match=r"sample 's1'.*bad\.png"):
        load_image(sample_of(path))


def test_truncated_jpeg_is_an_error_not_a_grey_image(tmp_path):
    data = encode(smooth(256, 256), "JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=r"sample 's1'.*cut\.jpg.*truncated"):
        load_image(sample_of(path))


def test_errors_are_not_cached_and_a_fixed_file_loads(tmp_path):
    path = tmp_path / "later.png"
    with pytest.raises(ImageLoadError):
        load_image(sample_of(path))
    quadrants().save(path)
    assert load_image(sample_of(path)).size == (64, 48)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (no pixel data): enough for a header check."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_decompression_bomb_limit_admits_8k_and_beyond_but_not_absurd_sizes():
    assert Image.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS == 16384 * 16384
    assert image_size(sample_of(png_header(7680, 4320))) == (7680, 4320)
    assert image_size(sample_of(png_header(15360, 8640))) == (15360, 8640)  # 16K
    with pytest.raises(ImageLoadError, match=r"sample 'bomb'.*embedded bytes.*exceeds limit"):
        image_size(sample_of(png_header(40000, 40000), "bomb"))


# ---------------------------------------------------------------------------------------- cache


def test_group_of_8_rollouts_decodes_once(tmp_path):
    path = tmp_path / "shared.png"
    quadrants().save(path)
    # The env may hold one Sample or copies of it: the key is the source, not the object.
    group = [sample_of(path, f"copy-{i}") for i in range(8)]
    images = [load_image(sample) for sample in group]
    info = image_cache_info()
    assert info.decodes == 1 and info.hits == 7
    assert all(image is images[0] for image in images)


def test_concurrent_loads_share_one_decode():
    sample = sample_of(encode(smooth(512, 512)))
    barrier = threading.Barrier(8)
    results = []

    def load():
        barrier.wait()
        results.append(load_image(sample))

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert image_cache_info().decodes == 1
    assert len(results) == 8 and all(image is results[0] for image in results)


def test_capacity_zero_decodes_every_time():
    set_image_cache_capacity(0)
    sample = sample_of(encode(quadrants()))
    first, second = load_image(sample), load_image(sample)
    assert image_cache_info().decodes == 2 and first is not second
    assert image_cache_info().entries == 0


def test_lru_evicts_least_recently_used_under_the_byte_budget():
    samples = [sample_of(encode(Image.new("RGB", (100, 100), (i, 0, 0))), f"s{i}") for i in range(3)]
    set_image_cache_capacity(2 * 100 * 100 * 3)  # room for two decoded images
    load_image(samples[0])
    load_image(samples[1])
    load_image(samples[0])  # 0 is now the most recent
    load_image(samples[2])  # evicts 1
    decodes = image_cache_info().decodes
    load_image(samples[0])
    assert image_cache_info().decodes == decodes
    load_image(samples[1])
    assert image_cache_info().decodes == decodes + 1
    assert image_cache_info().bytes <= 2 * 100 * 100 * 3


def test_newest_image_is_kept_even_over_budget():
    set_image_cache_capacity(10)
    sample = sample_of(encode(quadrants()))
    assert load_image(sample) is load_image(sample)


def test_rewritten_file_is_decoded_again(tmp_path):
    path = tmp_path / "changing.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path)
    assert load_image(sample_of(path)).getpixel((0, 0)) == (255, 0, 0)
    Image.new("RGB", (8, 9), (0, 255, 0)).save(path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert load_image(sample_of(path)).getpixel((0, 0)) == (0, 255, 0)


def test_bad_capacity_is_rejected():
    with pytest.raises(ValueError, match="max_bytes"):
        set_image_cache_capacity(-1)


# ----------------------------------------------------------------------------------- draft views


def view_from(source, size):
    return np.asarray(source.image.resize(size, Image.Resampling.BICUBIC, box=source.box), float)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_jpeg_draft_view_matches_the_full_decode_view(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "big.jpg"
    smooth(2003, 1501).save(path, quality=95, exif=exif)  # odd sizes: partial DCT blocks
    sample = sample_of(path)
    target = (250, 187) if orientation < 5 else (187, 250)
    source = load_view_source(sample, target)
    assert source.original_size == image_size(sample)
    assert source.image.width < source.original_size[0]  # reduced: 1/8 here
    assert source.image.width >= target[0] and source.image.height >= target[1]
    assert image_cache_info().decodes == 1
    full_view = np.asarray(load_image(sample).resize(target, Image.Resampling.BICUBIC), float)
    assert np.abs(view_from(source, target) - full_view).mean() < 1.0  # grey levels of 255


def test_draft_is_shared_by_a_group_whatever_else_is_cached(tmp_path):
    path = tmp_path / "big.jpg"
    smooth(1600, 1200).save(path, quality=90)
    sample = sample_of(path)
    sources = [load_view_source(sample, (400, 300)) for _ in range(4)]
    assert sources[0].image.size == (400, 300) and image_cache_info().decodes == 1
    load_image(sample)  # a crop decoded the original: the view must not change for later rollouts
    sources += [load_view_source(sample, (400, 300)) for _ in range(4)]
    assert all(s.image is sources[0].image for s in sources)
    assert image_cache_info().decodes == 2


def test_no_draft_when_the_target_is_not_twice_smaller_or_not_a_jpeg(tmp_path):
    path = tmp_path / "mid.jpg"
    smooth(600, 400).save(path, quality=90)
    assert load_view_source(sample_of(path), (400, 300)).image.size == (600, 400)
    png = sample_of(encode(smooth(1600, 1200)), "png")
    source = load_view_source(png, (200, 150))
    assert source.image.size == (1600, 1200) and source.box == (0.0, 0.0, 1600.0, 1200.0)


def test_view_source_rejects_bad_target_and_reports_missing_files(tmp_path):
    with pytest.raises(ValueError, match="positive target size"):
        load_view_source(sample_of(encode(quadrants())), (0, 10))
    with pytest.raises(ImageLoadError, match=r"sample 'gone'.*gone\.jpg"):
        load_view_source(sample_of(tmp_path / "gone.jpg", "gone"), (10, 10))
