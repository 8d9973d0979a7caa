"""Decode one image safely: a path under a data root, or bytes from a Parquet cell -> an RGB ``PIL.Image`` or a skip.

Features:

* **Confined to the data root.** A relative path is resolved under ``root`` with :func:`os.path.realpath`, so ``..``
  components, absolute paths and symlinks that point outside the root are all refused (``path_escapes_root``).
  With ``root=None`` the path is used as given, unconfined (for a caller that opens one file it trusts).
* **Decompression bombs are refused before decoding.** The size comes from the header (``Image.open`` is lazy) and is
  checked against ``max_pixels`` (``image_too_large``); PIL's own ``DecompressionBombError`` / ``Warning`` (images
  over ``PIL.Image.MAX_IMAGE_PIXELS``) count as ``image_too_large`` too.
* **Truncated files are errors.** The image is fully decoded (``img.load()``) with PIL's ``LOAD_TRUNCATED_IMAGES``
  forced off for the duration, even when another library switched it on globally (``truncated_image``).
* **Everything else that goes wrong** is a counted skip: a missing file (``missing_file``); a zero-byte file, null
  Parquet bytes, bytes that are not an image, a decoder failure (``unreadable_image``).
* **Normalised output**: the EXIF orientation is applied (``ImageOps.exif_transpose``), animated GIF/WebP/APNG give
  their first frame, and every mode becomes 8-bit RGB: alpha (RGBA, LA, palette with transparency) is composited
  on white, CMYK is converted, 16-/32-bit greyscale (``I;16``, ``I``) is scaled to 8 bits rather than clipped.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from unigendet.inputs.skips import SkipCounter

log = logging.getLogger("unigendet.data")

MAX_PIXELS = 64 * 1024 * 1024  # 8192 x 8192; real photos and FakeClue images are far below
_TRUNCATION_HINTS = ("truncated", "premature end", "unexpected end", "end of file")


#####################################################################################################
# Paths
#####################################################################################################


def resolve_under_root(source: str | os.PathLike, root: str | os.PathLike | None) -> Path | None:
    """The real path of ``source`` under ``root``, or None when it escapes the root (``..``, absolute, symlink out).

    With ``root=None`` the path is returned as given.
    """
    if root is None:
        return Path(source)
    source = os.fspath(source)
    if os.path.isabs(source):
        return None
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, source))
    if os.path.commonpath([real_root, real]) != real_root:
        return None
    return Path(real)


#####################################################################################################
# Decoding
#####################################################################################################


@contextlib.contextmanager
def _strict_decoding():
    """Truncated data raises and PIL's bomb warning is an error, whatever the process-wide settings are."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    if previous:
        log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was enabled; unigendet.inputs.images decodes strictly anyway")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited on white, high bit depths are scaled, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0  # 16-bit range -> 8 bits
        elif img.mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0  # float images in [0, 1]
        grey = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode in ("P", "L", "RGB") and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _failure_reason(e: Exception) -> str:
    """``truncated_image`` when PIL says the data ended early, else ``unreadable_image``."""
    return "truncated_image" if any(h in str(e).lower() for h in _TRUNCATION_HINTS) else "unreadable_image"


def _decode(fp, skips: SkipCounter, example_id: str, max_pixels: int) -> Image.Image | None:
    with _strict_decoding():
        try:
            img = Image.open(fp)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            skips.skip("image_too_large", example_id, str(e))
            return None
        except Exception as e:  # UnidentifiedImageError, SyntaxError, OSError (a header cut short), ...
            skips.skip(_failure_reason(e), example_id, f"{type(e).__name__}: {e}")
            return None
        width, height = img.size  # from the header: nothing decoded yet
        if width * height > max_pixels:
            skips.skip("image_too_large", example_id, f"{width}x{height} > {max_pixels} pixels")
            return None
        if width < 1 or height < 1:
            skips.skip("unreadable_image", example_id, f"header says {width}x{height}")
            return None
        try:
            img.seek(0)  # animated GIF / WebP / APNG: the first frame
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            skips.skip("image_too_large", example_id, str(e))
            return None
        except Exception as e:
            skips.skip(_failure_reason(e), example_id, f"{type(e).__name__}: {e}")
            return None
        try:
            img = ImageOps.exif_transpose(img)
        except Exception as e:  # a malformed EXIF block must not cost the image
            log.debug("ignoring unreadable EXIF of %s: %s", example_id, e)
        try:
            return to_rgb(img)
        except Exception as e:
            skips.skip("unreadable_image", example_id, f"cannot convert mode {img.mode} to RGB: {e}")
            return None


def open_image(source: str | os.PathLike | bytes | bytearray | memoryview | None, skips: SkipCounter, example_id: str,
               *, root: str | os.PathLike | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image | None:
    """Decode one image fully into an RGB ``PIL.Image``, or count a skip and return None.

    Args:
        source: a path relative to ``root`` (a record's ``image``), or the encoded bytes (a Parquet cell; None for a
            null cell).
        skips: receives the skip reason when the image cannot be used.
        example_id: the record id reported with a skip.
        root: the data root a path must stay under (its real path, symlinks resolved). None: no confinement.
        max_pixels: width * height limit checked on the header before decoding.

    Returns:
        An RGB image (EXIF orientation applied, first frame, alpha on white), or None after a counted skip.
    """
    if source is None:
        skips.skip("unreadable_image", example_id, "no image bytes (a null or unreadable Parquet cell)")
        return None
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            skips.skip("unreadable_image", example_id, "zero bytes")
            return None
        return _decode(io.BytesIO(bytes(source)), skips, example_id, max_pixels)
    path = resolve_under_root(source, root)
    if path is None:
        skips.skip("path_escapes_root", example_id, f"{os.fspath(source)!r} is outside {os.fspath(root)!r}")
        return None
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        skips.skip("missing_file", example_id, f"{path} does not exist")
        return None
    except OSError as e:  # a folder, no permission, ...
        skips.skip("unreadable_image", example_id, f"{path}: {e}")
        return None
    with f:
        if os.fstat(f.fileno()).st_size == 0:
            skips.skip("unreadable_image", example_id, f"{path} is empty")
            return None
        return _decode(f, skips, example_id, max_pixels)
