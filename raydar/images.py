"""Reading user images safely: decode, apply EXIF orientation, validate, resize, hash.

Every way an image can be bad ends as an `ImageProblem` with a reason a person can act on; nothing
here raises on bad bytes. The image id is the sha256 of the file's bytes, so a label follows the
content, not the file name.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

# Magic numbers of the formats we accept: bytes that start like one of these but do not decode are
# a *corrupt* image; anything else is *not an image*.
_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "png",
    b"\xff\xd8\xff": "jpeg",
    b"GIF87a": "gif",
    b"GIF89a": "gif",
    b"BM": "bmp",
    b"II*\x00": "tiff",
    b"MM\x00*": "tiff",
}


class ImageProblem(ValueError):
    """An image that cannot be used; `reason` is one of not_an_image, corrupt, truncated, too_large."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# Formats every OpenAI-compatible vision endpoint reads, so the original bytes can be sent as they are.
TEACHER_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}


@dataclass(frozen=True)
class PreparedImage:
    image_id: str
    width: int  # after EXIF orientation, before resizing
    height: int
    image: Image.Image  # RGB, resized to at most max_pixels
    source_format: str  # Pillow's name: PNG, JPEG, ...
    unchanged: bool  # no rotation and no resize: the original bytes show exactly `image`


def image_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sniff_format(data: bytes) -> str | None:
    for magic, fmt in _MAGIC.items():
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def prepare_image(data: bytes, max_pixels: int, max_image_pixels: int) -> PreparedImage:
    """Decode and check `data`; raises ImageProblem for anything that is not a usable image."""
    digest = image_id(data)
    if not data:
        raise ImageProblem("not_an_image", "empty file")
    img = _open(data, max_image_pixels)
    try:
        img.load()
    except OSError as e:  # the header was fine, so bytes ran out or the pixel data is damaged
        if "truncated" in str(e).lower():
            raise ImageProblem("truncated", f"the file ends early ({e})") from None
        raise ImageProblem("corrupt", f"pixel data does not decode: {e}") from None
    except (SyntaxError, ValueError, EOFError) as e:
        raise ImageProblem("corrupt", f"pixel data does not decode: {e}") from None

    source_format, source_mode = img.format or "", img.mode
    orientation = _orientation(img)
    if orientation in _TRANSPOSE:
        img = img.transpose(_TRANSPOSE[orientation])
    img = _to_rgb(img)
    width, height = img.size
    resized = resize_to_max_pixels(img, max_pixels)
    return PreparedImage(
        image_id=digest, width=width, height=height, image=resized, source_format=source_format,
        unchanged=orientation not in _TRANSPOSE and resized.size == (width, height) and source_mode in ("RGB", "L"),
    )


def _open(data: bytes, max_image_pixels: int) -> Image.Image:
    """Open (header only) and check the declared size before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            # raydar's own limit decides; Pillow's DecompressionBombError still stops > 2x its limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        fmt = sniff_format(data)
        if fmt:
            raise ImageProblem("corrupt", f"starts like a {fmt} file but does not decode") from None
        raise ImageProblem("not_an_image", f"unrecognised content (first bytes {data[:8]!r})") from None
    except Image.DecompressionBombError:
        raise ImageProblem(
            "too_large",
            f"the header declares more pixels than Pillow opens ({2 * Image.MAX_IMAGE_PIXELS:,}), over the limit "
            f"of {max_image_pixels:,} (images.max_image_pixels)",
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # a mangled header
        raise ImageProblem("corrupt", f"header does not decode: {e}") from None
    if img.width * img.height > max_image_pixels:
        raise ImageProblem(
            "too_large",
            f"{img.width}x{img.height} = {img.width * img.height:,} pixels is over the limit of "
            f"{max_image_pixels:,} (images.max_image_pixels)",
        )
    return img


_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag, or 1 when the EXIF is missing or unreadable (cameras write broken EXIF)."""
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:
        return 1


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit and float images are scaled, not clipped (Pillow's convert would turn a 16-bit
    X-ray white): integers by the bit depth they use (a 12-bit scan in a 16-bit file fills 0-255),
    floats in [0, 1] by 255, other floats from their min to their max."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if img.mode == "F" and not (lo >= 0 and hi <= 1):
            scaled = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        elif img.mode == "F":
            scaled = arr
        else:
            bits = max(8, int(np.ceil(np.log2(max(hi, 1) + 1))))
            scaled = np.clip(arr, 0, None) / (2**bits - 1)
        img = Image.fromarray((np.clip(scaled, 0, 1) * 255).round().astype(np.uint8), "L")
    return img if img.mode == "RGB" else img.convert("RGB")


def teacher_payload(data: bytes, prepared: PreparedImage, fmt: str = "auto") -> tuple[bytes, str]:
    """The bytes to send a teacher and their image type (`png`, `jpeg`, `webp`).

    `auto` sends the original bytes when they already show the prepared image in a format every
    teacher reads (no re-encoding: the cheapest and most faithful); otherwise it re-encodes,
    losslessly (PNG) if the source was PNG, else as JPEG. `png` and `jpeg` always re-encode.
    """
    if fmt == "auto":
        if prepared.unchanged and prepared.source_format in TEACHER_FORMATS:
            return data, TEACHER_FORMATS[prepared.source_format]
        fmt = "png" if prepared.source_format == "PNG" else "jpeg"
    return encode_image(prepared.image, fmt), fmt


def resize_to_max_pixels(img: Image.Image, max_pixels: int) -> Image.Image:
    """Shrink keeping the aspect ratio so that width * height <= max_pixels; never enlarge."""
    w, h = img.size
    if w * h <= max_pixels:
        return img
    scale = math.sqrt(max_pixels / (w * h))
    nw, nh = max(1, int(w * scale)), max(1, int(h * scale))
    nw, nh = min(nw, max(1, max_pixels // nh)), min(nh, max(1, max_pixels // nw))  # a side clamped to 1 px
    return img.resize((nw, nh), Image.Resampling.BICUBIC)


def encode_image(img: Image.Image, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=92)
    else:
        img.save(buf, format="PNG", compress_level=1)  # fast; size matters less than CPU here
    return buf.getvalue()
