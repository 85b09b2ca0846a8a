"""Image loading: formats, EXIF orientation, errors, the shared cache and JPEG draft views."""

from __future__ import annotations

import dataclasses
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
    RenderedImage,
    Sample,
    check_image,
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
    set_image_cache_capacity(2 * 100 * 100 * 4)  # room for two decoded images (4 bytes per RGB pixel)
    load_image(samples[0])
    load_image(samples[1])
    load_image(samples[0])  # 0 is now the most recent
    load_image(samples[2])  # evicts 1
    decodes = image_cache_info().decodes
    load_image(samples[0])
    assert image_cache_info().decodes == decodes
    load_image(samples[1])
    assert image_cache_info().decodes == decodes + 1
    assert image_cache_info().bytes <= 2 * 100 * 100 * 4


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


# ------------------------------------------------------------------- one budget for every pixel


def test_cached_views_do_not_keep_evicted_originals_alive():
    # 32 envs on 4K images held 605-759 MiB outside a 128 MiB budget: each cached view pinned its original.
    import gc
    import weakref

    from zoomgym.envs.geometry import Box
    from zoomgym.envs.views import ViewBudget, make_view

    first, second = (sample_of(encode(Image.new("RGB", (150, 100), (i, 0, 0))), f"s{i}") for i in (1, 2))
    original = load_image(first)
    view, _ = make_view(original, Box(0, 0, 150, 100), ViewBudget(), sample_id="s1", kind="original")
    assert make_view(original, Box(0, 0, 150, 100), ViewBudget(), sample_id="s1", kind="original")[0] is view
    set_image_cache_capacity(image_cache_info().bytes + 1000)  # room for one original and its view
    alive = weakref.ref(original)
    del original
    load_image(second)  # evicts the first original
    gc.collect()
    assert alive() is None
    assert image_cache_info().bytes <= image_cache_info().max_bytes


def test_views_are_charged_to_the_image_budget_and_not_cached_when_it_is_zero():
    from zoomgym.envs.geometry import Box
    from zoomgym.envs.views import ViewBudget, make_view

    original = Image.new("RGB", (150, 100), "white")
    before = image_cache_info().bytes
    view, info = make_view(original, Box(0, 0, 150, 100), ViewBudget(), sample_id="s", kind="original")
    assert image_cache_info().bytes - before == info.shown_size[0] * info.shown_size[1] * 4
    set_image_cache_capacity(0)
    again = make_view(original, Box(0, 0, 150, 100), ViewBudget(), sample_id="s", kind="original")[0]
    assert again is not make_view(original, Box(0, 0, 150, 100), ViewBudget(), sample_id="s", kind="original")[0]
    assert image_cache_info().entries == 0


def test_budget_charges_what_pillow_holds_per_pixel():
    # Pillow keeps an RGB pixel in 4 bytes: charging 3 let the cache hold a third more than its budget.
    load_image(sample_of(encode(Image.new("RGB", (100, 50)))))
    assert image_cache_info().bytes == 100 * 50 * 4


# ------------------------------------------------------------------ decoding memory and failures

_PEAK_CHILD = """
import json, resource, sys
def status(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))
from zoomgym.envs.data import ImageLoadError, Sample, load_image
sample = Sample("big-1", sys.argv[1], "q?", ("a", "b"), "A")
if sys.argv[2] == "limit":  # room for the interpreter, not for the pixels: the decode runs out of memory
    limit = status("VmSize") + 64 * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
before = status("VmRSS")
try:
    load_image(sample)
    print(json.dumps({"peak": status("VmHWM") - before}))
except ImageLoadError as error:
    print(json.dumps({"error": str(error), "sample_id": error.sample_id}))
"""


def decode_in_child(path, mode: str = "measure") -> dict:
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(path), mode], cwd=root, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_decoding_memory_is_bounded_by_pixels_not_by_file_size(tmp_path):
    # Kilobyte files of 16 MP each: the 16-bit one peaked at ~30 bytes per pixel (float64 copies), the
    # palette one with transparency at ~16 (four RGBA-sized copies). Now: the decoder's pixels plus the
    # RGB result (4 bytes), converted a tile at a time.
    side = 4000
    grey16 = tmp_path / "grey16.png"
    ramp = (np.arange(side, dtype=np.uint32) * 65535 // side).astype(np.uint16)
    Image.fromarray(np.broadcast_to(ramp, (side, side)).copy()).save(grey16)
    palette = Image.new("P", (side, side), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    alpha = tmp_path / "palette.png"
    palette.save(alpha, transparency=0)
    for path, decoder_bytes in ((grey16, 2), (alpha, 1)):
        assert path.stat().st_size < 300_000
        peak = decode_in_child(path)["peak"]
        assert peak < (decoder_bytes + 4 + 1) * side * side + (32 << 20), (path.name, peak / side / side)


def test_running_out_of_memory_is_an_image_load_error_naming_file_and_sample(tmp_path):
    path = tmp_path / "huge16.png"
    Image.fromarray(np.zeros((6000, 6000), np.uint16)).save(path)
    result = decode_in_child(path, "limit")
    assert result["sample_id"] == "big-1"
    assert "huge16.png" in result["error"] and "memory" in result["error"]


def test_conversions_tile_by_tile_equal_whole_image_conversions(monkeypatch):
    import zoomgym.envs.data.images as images

    monkeypatch.setattr(images, "DECODE_TILE_PIXELS", 64)  # a 40 x 40 image in tiles of one row or so
    rng = np.random.default_rng(0)
    deep = np.zeros((40, 40), np.uint16)
    deep[:20] = 256  # the top tiles alone look 8-bit: the scale must come from the whole image
    deep[20:] = rng.integers(0, 65536, size=(20, 40))
    rgb = np.asarray(load_image(sample_of(encode(Image.fromarray(deep)), "deep")))
    assert np.array_equal(rgb[..., 0], np.round(deep * (255 / 65535)).astype(np.uint8))
    palette = Image.fromarray(rng.integers(0, 4, size=(40, 40), dtype=np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9] + [0] * 756)
    palette.info["transparency"] = bytes([0, 128, 255, 255])
    flat = Image.alpha_composite(Image.new("RGBA", (40, 40), "white"), palette.convert("RGBA")).convert("RGB")
    loaded = load_image(sample_of(encode(palette), "palette"))
    assert np.array_equal(np.asarray(loaded), np.asarray(flat))


def test_fifo_or_folder_as_an_image_path_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    outcome = []

    def load():
        try:
            load_image(sample_of(fifo, "fifo-1"))
        except ImageLoadError as error:
            outcome.append(str(error))

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # blocked in open(): let it go before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("opening a FIFO blocked")
    assert len(outcome) == 1 and "fifo-1" in outcome[0] and "pipe.jpg" in outcome[0]
    assert "not a regular file" in outcome[0]
    with pytest.raises(ImageLoadError, match=r"sample 'dir-1'.*is a folder"):
        image_size(sample_of(tmp_path, "dir-1"))


def test_header_check_refuses_too_many_pixels_and_unconvertible_modes():
    from zoomgym.envs.data import check_image

    # 20000 x 20000 = 400 MP: Pillow only warns below twice its limit; a decode would take ~3 GiB.
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(
        ImageLoadError, match=r"sample 'wide'.*20000x20000 = 400,000,000 pixels, which exceeds limit MAX_IMAGE_PIXELS"
    ):
        check_image(sample_of(png_header(20000, 20000), "wide"))
    with pytest.raises(ImageLoadError, match=r"sample 'la'.*pixel mode 'La'"):
        check_image(sample_of(Image.new("La", (4, 4)), "la"))
    assert check_image(sample_of(png_header(7680, 4320))) == (7680, 4320)


def test_image_load_error_names_the_sample_and_source_and_pickles():
    import pickle

    with pytest.raises(ImageLoadError) as caught:
        load_image(sample_of(b"junk", "mme-3"))
    error = pickle.loads(pickle.dumps(caught.value))
    assert (error.sample_id, error.source, str(error)) == ("mme-3", "embedded bytes", str(caught.value))


RENDERS: list[str] = []


@dataclasses.dataclass(frozen=True)
class Quadrants(RenderedImage):
    """A RenderedImage for the tests: `quadrants` at ``width x height``, counting its renders."""

    width: int = 64
    height: int = 48
    mode: str = "RGB"
    fails: bool = False

    @property
    def size(self) -> tuple[int, int]:
        return (self.width, self.height)

    def describe(self) -> str:
        return f"test quadrants {self.width}x{self.height}"

    def render(self) -> Image.Image:
        RENDERS.append(self.describe())
        if self.fails:
            raise MemoryError
        return quadrants(self.width, self.height).convert(self.mode)


def test_a_rendered_image_is_drawn_once_on_first_use_and_shared_by_equal_descriptions():
    RENDERS.clear()
    a, b = sample_of(Quadrants(), "a"), sample_of(Quadrants(), "b")
    assert image_size(a) == check_image(a) == (64, 48) and RENDERS == []  # known without drawing
    image = load_image(a)
    assert np.array_equal(np.asarray(image), np.asarray(quadrants())) and RENDERS == ["test quadrants 64x48"]
    assert load_image(b) is image and load_view_source(b, (32, 24)).image is image and len(RENDERS) == 1
    assert image_cache_info().decodes == 1


@pytest.mark.parametrize(("source", "reason"), [
    (Quadrants(fails=True), r"needs more memory than is free to render \(64x48\)"),
    (Quadrants(mode="L"), r"rendered as L 64x48, not RGB of its size \(64, 48\)"),
    (Quadrants(width=MAX_IMAGE_PIXELS), r"has \d+x48 pixels; expects 1 to MAX_IMAGE_PIXELS"),
])
def test_a_rendered_image_that_cannot_be_drawn_names_itself_and_the_sample(source, reason):
    with pytest.raises(ImageLoadError, match=rf"sample 'bad'.*test quadrants .*{reason}") as error:
        load_image(sample_of(source, "bad"))
    assert error.value.sample_id == "bad" and error.value.source.startswith("test quadrants")


def test_map_in_threads_is_the_loop():
    from zoomgym.envs.data.images import map_in_threads

    canvases = [Image.new("RGB", (64 + i, 48), (i, 0, 0)) for i in range(9)]
    resized = map_in_threads(lambda image: image.resize((200, 150), Image.Resampling.BICUBIC), canvases)
    assert [im.tobytes() for im in resized] == [im.resize((200, 150), Image.Resampling.BICUBIC).tobytes()
                                                for im in canvases]

    def fail_on_odd(i: int) -> int:
        if i % 2:
            raise ValueError(f"item {i}")
        return i

    with pytest.raises(ValueError, match="item 1"):
        map_in_threads(fail_on_odd, list(range(6)))
    assert map_in_threads(fail_on_odd, [4]) == [4] and map_in_threads(fail_on_odd, []) == []
