"""Reading user images: real bytes made with Pillow, good and bad, through `prepare_image`.

Every bad file must end as an `ImageProblem` whose reason tells a person what to do (re-download a
truncated file, drop a corrupt one, raise the limit for a huge one); nothing else may escape.
"""

from __future__ import annotations

import hashlib
import io
import random
import struct
import time
import zlib

import pytest
from PIL import Image, ImageFile

from raydar.images import (
    ImageProblem,
    PreparedImage,
    encode_image,
    image_id,
    prepare_image,
    resize_to_max_pixels,
    sniff_format,
    teacher_payload,
)

# Pillow's TIFF reader warns about the mangled files below; the behaviour under test is the exception.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")

BIG = 10**9  # a max_pixels that never resizes
LIMIT = 50_000_000  # the spec's default max_image_pixels


def noise(size=(64, 48), mode="RGB", seed=0) -> Image.Image:
    """Random pixels: they do not compress, so a file cut in half really loses image data."""
    rng = random.Random(seed)
    bands = len(Image.new(mode, (1, 1)).getbands())
    return Image.frombytes(mode, size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * bands)))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_with_header_size(width: int, height: int) -> bytes:
    """A real 4x4 PNG whose IHDR claims `width` x `height`, with a valid CRC: a decompression bomb's header."""
    data = bytearray(encode(Image.new("RGB", (4, 4)), "PNG"))
    assert data[12:16] == b"IHDR"
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def gif_with_header_size(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("P", (4, 4)), "GIF"))
    struct.pack_into("<HH", data, 6, width, height)  # logical screen
    # and the first image descriptor, which is what Pillow reports as the size
    at = data.index(b"\x2c")
    struct.pack_into("<HH", data, at + 5, width, height)
    return bytes(data)


# ---------------------------------------------------------------- good images


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF"])
def test_a_good_image_is_prepared_with_its_sha256_and_size(fmt):
    data = encode(noise((64, 48)), fmt)
    prepared = prepare_image(data, max_pixels=BIG, max_image_pixels=LIMIT)
    assert isinstance(prepared, PreparedImage)
    assert prepared.image_id == hashlib.sha256(data).hexdigest() == image_id(data)
    assert (prepared.width, prepared.height) == (64, 48)
    assert prepared.image.size == (64, 48)
    assert prepared.image.mode == "RGB"


def test_png_pixels_come_through_unchanged():
    img = noise((20, 10))
    prepared = prepare_image(encode(img, "PNG"), max_pixels=BIG, max_image_pixels=LIMIT)
    assert prepared.image.tobytes() == img.tobytes()


def test_the_id_follows_the_bytes_not_the_pixels():
    img = noise((32, 32))
    a = prepare_image(encode(img, "PNG"), BIG, LIMIT)
    b = prepare_image(encode(img, "PNG", compress_level=9, optimize=True), BIG, LIMIT)
    c = prepare_image(encode(noise((32, 32), seed=1), "PNG"), BIG, LIMIT)
    assert a.image.tobytes() == b.image.tobytes()
    assert len({a.image_id, c.image_id}) == 2
    assert all(len(p.image_id) == 64 for p in (a, b, c))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation, swapped", [(1, False), (3, False), (6, True), (8, True), (5, True)])
def test_exif_orientation_is_applied(fmt, orientation, swapped):
    img = Image.new("RGB", (40, 20), "white")
    img.paste((255, 0, 0), (0, 0, 10, 10))  # a red square at the top-left of the stored pixels
    exif = img.getexif()
    exif[0x0112] = orientation
    prepared = prepare_image(encode(img, fmt, exif=exif), BIG, LIMIT)
    assert (prepared.width, prepared.height) == ((20, 40) if swapped else (40, 20))
    assert prepared.image.size == (prepared.width, prepared.height)
    if orientation == 6:  # rotate 90 clockwise to display: the top-left corner goes to the top-right
        r, g, b = prepared.image.getpixel((prepared.width - 3, 3))
        assert r > 200 and g < 60 and b < 60
        assert prepared.image.getpixel((2, 2))[1] > 200  # white where the square was


@pytest.mark.parametrize(
    "mode, fmt",
    [("RGBA", "PNG"), ("LA", "PNG"), ("L", "PNG"), ("L", "JPEG"), ("P", "PNG"), ("P", "GIF"), ("1", "PNG"),
     ("I;16", "PNG"), ("CMYK", "JPEG"), ("CMYK", "TIFF"), ("F", "TIFF")],
)
def test_every_mode_comes_out_rgb(mode, fmt):
    img = Image.new(mode, (30, 20))
    prepared = prepare_image(encode(img, fmt), BIG, LIMIT)
    assert prepared.image.mode == "RGB"
    assert (prepared.width, prepared.height) == (30, 20)


def test_grayscale_stays_gray_and_palette_keeps_its_colours():
    gray = Image.new("L", (8, 8), 77)
    assert prepare_image(encode(gray, "PNG"), BIG, LIMIT).image.getpixel((3, 3)) == (77, 77, 77)
    pal = Image.new("P", (8, 8))
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.paste(1, (0, 0, 8, 8))
    assert prepare_image(encode(pal, "PNG"), BIG, LIMIT).image.getpixel((3, 3)) == (10, 200, 30)


@pytest.mark.parametrize("mode, fmt, dark, bright", [("I;16", "PNG", 10_000, 50_000), ("F", "TIFF", 0.2, 0.8)])
def test_high_bit_depth_images_keep_their_contrast(mode, fmt, dark, bright):
    img = Image.new(mode, (20, 10), dark)
    img.paste(bright, (10, 0, 20, 10))
    prepared = prepare_image(encode(img, fmt), BIG, LIMIT)
    left, right = prepared.image.getpixel((2, 5))[0], prepared.image.getpixel((17, 5))[0]
    assert 0 < left < right < 255


# ---------------------------------------------------------------- resizing


@pytest.mark.parametrize(
    "size, max_pixels", [((400, 200), 20_000), ((200, 400), 20_000), ((1000, 10), 5_000), ((333, 777), 12_345)]
)
def test_resize_keeps_the_aspect_and_respects_max_pixels(size, max_pixels):
    prepared = prepare_image(encode(Image.new("RGB", size, "blue"), "PNG"), max_pixels, LIMIT)
    assert (prepared.width, prepared.height) == size  # the original size is reported, not the resized one
    w, h = prepared.image.size
    assert w * h <= max_pixels
    assert w * h > 0.9 * max_pixels  # shrunk to the budget, not far below it
    assert w / h == pytest.approx(size[0] / size[1], rel=0.05)


def test_resize_never_enlarges():
    img = Image.new("RGB", (30, 20))
    assert resize_to_max_pixels(img, 10**6).size == (30, 20)
    assert resize_to_max_pixels(img, 600).size == (30, 20)  # exactly at the budget
    assert resize_to_max_pixels(img, 599).size[0] * resize_to_max_pixels(img, 599).size[1] <= 599
    assert prepare_image(encode(img, "PNG"), 10**6, LIMIT).image.size == (30, 20)


def test_resize_of_a_thin_image_keeps_at_least_one_pixel_row():
    w, h = resize_to_max_pixels(Image.new("RGB", (4000, 1)), 100).size
    assert h == 1 and w >= 1


def test_resize_of_a_thin_image_still_respects_max_pixels():
    w, h = resize_to_max_pixels(Image.new("RGB", (4000, 1)), 100).size
    assert w * h <= 100


def test_exif_rotation_happens_before_resizing():
    img = Image.new("RGB", (400, 100))
    exif = img.getexif()
    exif[0x0112] = 6
    prepared = prepare_image(encode(img, "JPEG", exif=exif), 10_000, LIMIT)
    assert (prepared.width, prepared.height) == (100, 400)
    w, h = prepared.image.size
    assert h > w and w * h <= 10_000


# ---------------------------------------------------------------- bad images


def reason_of(data: bytes, max_image_pixels: int = LIMIT) -> str:
    with pytest.raises(ImageProblem) as err:
        prepare_image(data, BIG, max_image_pixels)
    assert str(err.value).startswith(err.value.reason + ": ")
    return err.value.reason


@pytest.mark.parametrize(
    "data",
    [b"", b"hello, this is a text file and not an image\n", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", b"\x00" * 64,
     bytes(random.Random(3).randrange(256) for _ in range(500)).replace(b"\x89", b"\x00").replace(b"\xff", b"\x00")],
    ids=["empty", "text", "pdf", "zeros", "random"],
)
def test_things_that_are_not_images(data):
    assert reason_of(data) == "not_an_image"


@pytest.mark.parametrize(
    "data",
    [b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, b"\x89PNG\r\n\x1a\n" + b"\x01\x02\x03\x04\x00\xfe\x7f\x80" * 20,
     b"\xff\xd8\xff" + b"garbage" * 20, b"GIF89a" + b"\x00" * 5, b"II*\x00" + b"\xff" * 50,
     b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x00" * 30],
    ids=["png-zeros", "png-binary-garbage", "jpeg-garbage", "gif-garbage", "tiff-garbage", "webp-garbage"],
)
def test_a_known_signature_followed_by_garbage_is_corrupt(data):
    assert reason_of(data) == "corrupt"


def test_png_signature_followed_by_text_garbage_is_corrupt():
    assert reason_of(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20) == "corrupt"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99])
def test_a_real_image_cut_short_is_truncated(fmt, keep):
    data = encode(noise((64, 48)), fmt)
    assert reason_of(data[: int(len(data) * keep)]) == "truncated"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"])
def test_a_real_image_cut_anywhere_is_never_called_not_an_image(fmt):
    data = encode(noise((64, 48)), fmt)
    for cut in range(12, len(data), max(1, len(data) // 50)):  # 12 bytes: every magic number is whole
        try:
            prepare_image(data[:cut], BIG, LIMIT)
        except ImageProblem as e:
            assert e.reason in {"corrupt", "truncated"}, (cut, str(e))


@pytest.mark.parametrize(
    "make, size",
    [(png_with_header_size, (10_000, 10_000)), (png_with_header_size, (8_000, 8_000)),
     (png_with_header_size, (60_000, 60_000)), (gif_with_header_size, (9_000, 9_000))],
    ids=["png-1e8", "png-6.4e7", "png-3.6e9", "gif-8.1e7"],
)
def test_a_header_declaring_too_many_pixels_is_rejected_without_decoding(make, size, monkeypatch):
    data = make(*size)

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    t = time.perf_counter()
    assert reason_of(data, max_image_pixels=LIMIT) == "too_large"
    assert time.perf_counter() - t < 0.5


def test_too_large_names_the_size_and_the_setting_when_raydar_sets_the_limit():
    with pytest.raises(ImageProblem) as err:
        prepare_image(png_with_header_size(3000, 2000), BIG, max_image_pixels=5_000_000)
    assert err.value.reason == "too_large"
    assert "3000x2000" in str(err.value) and "max_image_pixels" in str(err.value)


def test_the_limit_counts_pixels_not_sides():
    img = encode(Image.new("RGB", (100, 50)), "PNG")
    assert prepare_image(img, BIG, max_image_pixels=5_000).width == 100
    assert reason_of(img, max_image_pixels=4_999) == "too_large"


def test_a_max_image_pixels_above_pillows_limit_is_honoured(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # stands in for 89 M, to keep the image small
    prepared = prepare_image(encode(Image.new("RGB", (40, 40)), "PNG"), BIG, max_image_pixels=10_000)
    assert (prepared.width, prepared.height) == (40, 40)


# Malformed EXIF written by a camera: ImageLength (0x0101) stored as ASCII, beside Orientation = 6.
BAD_EXIF = (
    b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x02"
    b"\x01\x01\x00\x02\x00\x00\x00\x06\x00\x00\x00&"
    b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00"
    b"\x00\x00\x00\x00descr\x00"
)


def test_malformed_exif_never_escapes_as_another_exception():
    data = encode(Image.new("RGB", (40, 20)), "JPEG", exif=BAD_EXIF)
    try:
        prepared = prepare_image(data, BIG, LIMIT)
    except ImageProblem:
        return
    assert (prepared.width, prepared.height) == (20, 40)


def test_mangled_files_only_ever_raise_image_problem():
    """Random byte flips and cuts of real files: each either decodes or is an ImageProblem."""
    rng = random.Random(1234)
    base = noise((24, 16))
    reasons = set()
    for fmt in ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]:
        data = encode(base, fmt)
        for _ in range(40):
            b = bytearray(data)
            for _ in range(rng.randrange(1, 6)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            if rng.random() < 0.3:
                b = b[: rng.randrange(len(b))]
            try:
                prepare_image(bytes(b), BIG, LIMIT)
            except ImageProblem as e:
                assert e.reason in {"not_an_image", "corrupt", "truncated", "too_large"}
                reasons.add(e.reason)
    assert {"corrupt", "truncated"} <= reasons


# ---------------------------------------------------------------- what the teacher is sent


@pytest.mark.parametrize("fmt, media", [("PNG", "png"), ("JPEG", "jpeg"), ("WEBP", "webp")])
def test_an_image_that_needs_no_change_is_sent_as_its_original_bytes(fmt, media):
    data = encode(noise((40, 30)), fmt)
    prepared = prepare_image(data, BIG, LIMIT)
    assert prepared.unchanged and prepared.source_format == fmt
    assert teacher_payload(data, prepared) == (data, media)


def test_a_resized_png_is_re_encoded_losslessly_at_the_prepared_size():
    data = encode(noise((200, 100)), "PNG")
    prepared = prepare_image(data, 5_000, LIMIT)
    assert not prepared.unchanged
    payload, media = teacher_payload(data, prepared)
    assert media == "png" and payload != data
    sent = Image.open(io.BytesIO(payload))
    assert sent.size == prepared.image.size
    assert sent.convert("RGB").tobytes() == prepared.image.tobytes()


def test_a_rotated_jpeg_is_sent_upright():
    img = Image.new("RGB", (40, 20))
    exif = img.getexif()
    exif[0x0112] = 6
    data = encode(img, "JPEG", exif=exif)
    prepared = prepare_image(data, BIG, LIMIT)
    assert not prepared.unchanged
    payload, media = teacher_payload(data, prepared)
    assert media == "jpeg" and payload != data
    assert Image.open(io.BytesIO(payload)).size == (20, 40)


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "GIF"])
def test_formats_a_teacher_may_not_read_are_re_encoded_as_jpeg(fmt):
    data = encode(noise((16, 16)), fmt)
    payload, media = teacher_payload(data, prepare_image(data, BIG, LIMIT))
    assert media == "jpeg" and sniff_format(payload) == "jpeg"


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_an_explicit_format_always_re_encodes(fmt):
    data = encode(noise((16, 16)), "WEBP")
    payload, media = teacher_payload(data, prepare_image(data, BIG, LIMIT), fmt)
    assert media == fmt and sniff_format(payload) == fmt


def test_the_teacher_is_sent_what_the_student_sees_for_a_transparent_png():
    data = encode(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "PNG")  # fully transparent, red underneath
    prepared = prepare_image(data, BIG, LIMIT)
    payload, _ = teacher_payload(data, prepared)
    assert Image.open(io.BytesIO(payload)).mode == "RGB"


# ---------------------------------------------------------------- encoding and sniffing


def test_encode_png_round_trips_exactly():
    img = noise((33, 17))
    data = encode_image(img, "png")
    assert data.startswith(b"\x89PNG")
    back = Image.open(io.BytesIO(data))
    assert back.format == "PNG" and back.size == (33, 17)
    assert back.convert("RGB").tobytes() == img.tobytes()


def test_encode_jpeg_round_trips_closely():
    img = Image.new("RGB", (32, 32), (200, 40, 90))
    data = encode_image(img, "jpeg")
    assert data.startswith(b"\xff\xd8\xff")
    back = Image.open(io.BytesIO(data))
    assert back.format == "JPEG" and back.size == (32, 32)
    r, g, b = back.getpixel((16, 16))
    assert abs(r - 200) <= 4 and abs(g - 40) <= 4 and abs(b - 90) <= 4


def test_encoded_images_are_prepared_again_unchanged_in_size():
    prepared = prepare_image(encode(noise((50, 30)), "PNG"), BIG, LIMIT)
    again = prepare_image(encode_image(prepared.image, "png"), BIG, LIMIT)
    assert again.image.tobytes() == prepared.image.tobytes()


@pytest.mark.parametrize(
    "fmt, expected, kw",
    [("PNG", "png", {}), ("JPEG", "jpeg", {}), ("GIF", "gif", {}), ("BMP", "bmp", {}), ("TIFF", "tiff", {}),
     ("TIFF", "tiff", {"compression": "raw"}), ("WEBP", "webp", {})],
)
def test_sniff_format_recognises_real_files(fmt, expected, kw):
    assert sniff_format(encode(Image.new("RGB", (8, 8)), fmt, **kw)) == expected


@pytest.mark.parametrize(
    "data, expected",
    [(b"GIF87a....", "gif"), (b"GIF89a....", "gif"), (b"II*\x00....", "tiff"), (b"MM\x00*....", "tiff"),
     (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "webp"), (b"RIFF\x10\x00\x00\x00WAVEfmt ", None), (b"", None),
     (b"\x89PNX\r\n\x1a\n", None), (b"hello", None), (b"\xff\xd8", None)],
)
def test_sniff_format_reads_magic_numbers(data, expected):
    assert sniff_format(data) == expected


def test_sniff_format_on_big_endian_tiff():
    data = encode(Image.new("L", (8, 8)), "TIFF")
    big_endian = b"MM\x00*" + data[4:]  # only the magic matters to sniffing
    assert sniff_format(big_endian) == "tiff"
