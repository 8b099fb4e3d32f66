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

from PIL import Image, ImageOps, UnidentifiedImageError

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


@dataclass(frozen=True)
class PreparedImage:
    image_id: str
    width: int  # after EXIF orientation, before resizing
    height: int
    image: Image.Image  # RGB, resized to at most max_pixels


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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            # The header gives the size without decoding: reject bombs before any pixel is made.
            if img.width * img.height > max_image_pixels:
                raise ImageProblem(
                    "too_large",
                    f"{img.width}x{img.height} = {img.width * img.height:,} pixels is over the limit of "
                    f"{max_image_pixels:,} (images.max_image_pixels)",
                )
            img.load()
    except ImageProblem:
        raise
    except UnidentifiedImageError:
        fmt = sniff_format(data)
        if fmt:
            raise ImageProblem("corrupt", f"starts like a {fmt} file but does not decode") from None
        raise ImageProblem("not_an_image", f"unrecognised content (first bytes {data[:8]!r})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageProblem(
            "too_large",
            f"the header declares more pixels than Pillow will open, over the limit of {max_image_pixels:,} "
            "(images.max_image_pixels)",
        ) from None
    except OSError as e:
        if "truncated" in str(e).lower():
            raise ImageProblem("truncated", f"the file ends early ({e})") from None
        raise ImageProblem("corrupt", f"does not decode: {e}") from None
    except (SyntaxError, ValueError, EOFError) as e:  # PIL's plugins raise these on mangled headers
        raise ImageProblem("corrupt", f"does not decode: {e}") from None

    img = ImageOps.exif_transpose(img)
    if img.mode != "RGB":
        img = img.convert("RGB")
    width, height = img.size
    return PreparedImage(image_id=digest, width=width, height=height, image=resize_to_max_pixels(img, max_pixels))


def resize_to_max_pixels(img: Image.Image, max_pixels: int) -> Image.Image:
    """Shrink keeping the aspect ratio so that width * height <= max_pixels; never enlarge."""
    w, h = img.size
    if w * h <= max_pixels:
        return img
    scale = math.sqrt(max_pixels / (w * h))
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    return img.resize(size, Image.Resampling.BICUBIC)


def encode_image(img: Image.Image, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=92)
    else:
        img.save(buf, format="PNG", compress_level=1)  # fast; size matters less than CPU here
    return buf.getvalue()
