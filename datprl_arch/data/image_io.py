"""Image decoding and encoding that keeps bit depth and channel count.

BasicSR's ``imfrombytes(..., float32=True)`` decodes with ``IMREAD_COLOR`` (16-bit becomes 8-bit) and always divides
by 255, so 16-bit medical and remote-sensing images lose their range. Here every image is decoded unchanged, scaled by
its dtype's range into float32 ``[0, 1]`` and described by an :class:`ImageFormat` so results can be written back in
the input's bit depth and channels.

Arrays are OpenCV-style: ``(H, W, C)`` with ``C`` in {1, 3}, colour in BGR order.
"""
from __future__ import annotations

import dataclasses
import io
import os
import struct
import zlib
from typing import Optional

import cv2
import numpy as np

from ..errors import DatprlError
from ..utils.atomic import atomic_write_bytes

#: Divisors that map an integer image's dtype onto [0, 1].
DTYPE_RANGE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
#: Channel counts a network can be fed: grayscale or colour.
NETWORK_CHANNELS = (1, 3)
#: File suffixes treated as images when scanning folders (lower case).
IMAGE_SUFFIXES = ('.png', '.tif', '.tiff', '.jpg', '.jpeg', '.bmp', '.webp')
#: The marker every complete JPEG ends with.
_JPEG_EOI = b'\xff\xd9'
#: The first bytes of every PNG file.
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
#: The type of the chunk every complete PNG ends with.
PNG_END = b'IEND'
#: Offset of the colour type byte in a PNG (signature, IHDR length and type, width, height, bit depth).
PNG_COLOUR_TYPE_OFFSET = 25
#: PNG colour type of a palette image.
PNG_PALETTE = 3
#: Bytes of signature + IHDR chunk (length, type, 13 data bytes, CRC): all a PNG header check reads.
PNG_HEADER_BYTES = 33
#: PNG colour type -> channels after decoding with the alpha channel dropped (gray, RGB, palette, gray+alpha, RGBA).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 1, 6: 3}
#: Pillow modes -> (bit depth, channels) as :func:`decode_raw` returns them (alpha dropped, palette expanded).
_PIL_FORMATS = {'1': (8, 1), 'L': (8, 1), 'LA': (8, 1), 'P': (8, 3), 'RGB': (8, 3), 'RGBA': (8, 3), 'CMYK': (8, 3),
                'YCbCr': (8, 3), 'I;16': (16, 1), 'I;16B': (16, 1), 'I;16L': (16, 1)}


@dataclasses.dataclass(frozen=True)
class ImageFormat:
    """Bit depth (8, 16 or 32 for float images) and channel count (1 or 3) of a stored image."""

    bit_depth: int
    channels: int


class ImageDecodeError(DatprlError, ValueError):
    """Raised when bytes cannot be decoded into an image."""


@dataclasses.dataclass(frozen=True)
class DecodedImage:
    """Stored pixels ``(H, W, C)`` (C in {1, 3}, BGR) and their format, the alpha channel ``(H, W)`` in the same
    dtype when the image has one, and whether the file was a palette PNG (expanded to colour on decoding)."""

    pixels: np.ndarray
    fmt: ImageFormat
    alpha: Optional[np.ndarray] = None
    palette: bool = False


def _is_png(content) -> bool:
    return bytes(content[:len(PNG_SIGNATURE)]) == PNG_SIGNATURE


def png_colour_type(content) -> Optional[int]:
    """The IHDR colour type of PNG bytes (3: palette), None for other formats or a header too short to say."""
    if not _is_png(content) or len(content) <= PNG_COLOUR_TYPE_OFFSET:
        return None
    return content[PNG_COLOUR_TYPE_OFFSET]


def decode_image(content, where: str = '<bytes>', verify: bool = False) -> DecodedImage:
    """Decode image bytes to their stored pixels (uint8, uint16 or float32; BGR), format and alpha channel.

    An empty file and a PNG that ends before its ``IEND`` chunk are named before OpenCV sees them (it would raise an
    assertion, or libpng would print a raw error line); with ``verify``, a PNG's chunk checksums are checked too
    (:func:`verify_png`), so damaged data is named rather than reported by libpng. ``where`` names the file in error
    messages.
    """
    if content is None:
        raise ImageDecodeError(f'{where}: no data (missing file or LMDB key).')
    if not len(content):
        raise ImageDecodeError(f'{where}: empty file (0 bytes); expected an image (PNG, TIFF, JPEG or BMP).')
    png = _is_png(content)
    if png and bytes(content).rfind(PNG_END) < 0:
        raise ImageDecodeError(f'{where}: truncated or damaged PNG (it ends before its IEND chunk).')
    if png and verify:
        verify_png(content, where)
    try:
        img = cv2.imdecode(np.frombuffer(content, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        img = None
    if img is None:
        what = 'truncated or damaged PNG' if png else 'not a readable image (expected PNG, TIFF, JPEG or BMP)'
        raise ImageDecodeError(f'{where}: {what}.')
    if img.ndim == 2:
        img = img[..., None]
    alpha = None
    if img.shape[2] == 4:
        img, alpha = img[..., :3], img[..., 3]
    elif img.shape[2] == 2:  # gray + alpha
        img, alpha = img[..., :1], img[..., 1]
    palette = png_colour_type(content) == PNG_PALETTE
    if img.dtype in DTYPE_RANGE:
        return DecodedImage(img, ImageFormat(8 * img.dtype.itemsize, img.shape[2]), alpha, palette)
    if np.issubdtype(img.dtype, np.floating):
        return DecodedImage(img.astype(np.float32), ImageFormat(32, img.shape[2]),
                            None if alpha is None else alpha.astype(np.float32), palette)
    raise ImageDecodeError(f'{where}: unsupported pixel type {img.dtype} (expected uint8, uint16 or float).')


def decode_raw(content: bytes, where: str = '<bytes>') -> tuple[np.ndarray, ImageFormat]:
    """Decode image bytes to their stored pixels ``(H, W, C)`` (uint8, uint16 or float32; BGR) and format.

    An alpha channel is dropped (:func:`decode_image` keeps it). Cropping before :func:`to_unit` avoids converting
    pixels that are thrown away. ``where`` names the file in error messages.
    """
    decoded = decode_image(content, where)
    return decoded.pixels, decoded.fmt


def with_alpha(stored: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """A stored-format array (``(H, W)`` gray or ``(H, W, 3)`` BGR, e.g. from :func:`tensor_to_stored`) with
    ``alpha`` appended unchanged as a fourth channel (BGRA; gray is replicated, as image writers store no
    gray + alpha)."""
    colour = np.repeat(stored[..., None], 3, axis=2) if stored.ndim == 2 else stored
    return np.concatenate([colour, alpha.astype(colour.dtype, copy=False)[..., None]], axis=2)


def to_unit(img: np.ndarray) -> np.ndarray:
    """Stored pixels → float32 in ``[0, 1]``: 8-bit divided by 255, 16-bit by 65535, float kept."""
    if img.dtype in DTYPE_RANGE:
        return img.astype(np.float32) / DTYPE_RANGE[img.dtype]
    return img.astype(np.float32, copy=False)


def to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """Convert ``(H, W, C)`` to ``channels`` (1 or 3): grayscale is replicated, colour is converted to luma."""
    if channels not in NETWORK_CHANNELS:
        raise ValueError(f'channels must be one of {NETWORK_CHANNELS}, got {channels!r}.')
    if img.shape[2] == channels:
        return img
    if channels == 3:
        return np.repeat(img, 3, axis=2)
    return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)[..., None]


def to_stored(img: np.ndarray, fmt: ImageFormat) -> np.ndarray:
    """Float ``(H, W, C)`` in ``[0, 1]`` → array in ``fmt``'s bit depth and channels, ready for ``cv2.imwrite``."""
    img = to_channels(img, fmt.channels)
    if fmt.bit_depth == 32:
        out = img.astype(np.float32)
    else:
        dtype = np.uint8 if fmt.bit_depth == 8 else np.uint16
        out = np.clip(img * DTYPE_RANGE[np.dtype(dtype)], 0, DTYPE_RANGE[np.dtype(dtype)]).round().astype(dtype)
    return out[..., 0] if out.shape[2] == 1 else out


def tensor_to_stored(tensor, fmt: ImageFormat) -> np.ndarray:
    """Network output ``(C, H, W)`` or ``(1, C, H, W)`` tensor, RGB, in ``[0, 1]`` → stored-format BGR array."""
    arr = tensor.detach().float().cpu().squeeze(0).numpy().transpose(1, 2, 0)
    if arr.shape[2] == 3:
        arr = arr[..., ::-1]
    return to_stored(np.ascontiguousarray(arr), fmt)


def write(path: str, stored: np.ndarray) -> None:
    """Encode an array in its stored format (e.g. from :func:`tensor_to_stored`) by the file suffix and write it
    atomically (a temporary file, then a rename)."""
    ext = os.path.splitext(path)[1]
    ok, buf = cv2.imencode(ext, stored)
    if not ok:
        raise ValueError(f'Cannot encode an image as {ext!r} for {path}.')
    atomic_write_bytes(buf.tobytes(), path)


def png_header(data, where: str) -> tuple[int, int, ImageFormat]:
    """``(H, W, format)`` from the first :data:`PNG_HEADER_BYTES` of a PNG (signature, IHDR and its CRC checked);
    ``data`` may be longer (bytes or a memoryview). Raises :class:`ImageDecodeError` naming ``where``."""
    head = bytes(data[:PNG_HEADER_BYTES])
    if len(head) < PNG_HEADER_BYTES or head[:8] != PNG_SIGNATURE:
        raise ImageDecodeError(f'{where}: not a PNG image (no PNG signature).')
    length, kind = struct.unpack('>I4s', head[8:16])
    if kind != b'IHDR' or length != 13 or zlib.crc32(head[12:29]) != struct.unpack('>I', head[29:33])[0]:
        raise ImageDecodeError(f'{where}: damaged PNG header (IHDR chunk).')
    width, height, depth, colour = struct.unpack('>IIBB', head[16:26])
    if colour not in _PNG_CHANNELS or not width or not height:
        raise ImageDecodeError(f'{where}: damaged PNG header (colour type {colour}, size {width}x{height}).')
    return height, width, ImageFormat(16 if depth == 16 else 8, _PNG_CHANNELS[colour])


def verify_png(data, where: str) -> None:
    """Check every chunk CRC of a whole PNG (bytes or memoryview) up to ``IEND``: catches damaged or truncated
    image data without decoding it."""
    png_header(data, where)
    view, pos = memoryview(data), len(PNG_SIGNATURE)
    while pos + 12 <= len(view):
        length, kind = struct.unpack('>I4s', view[pos:pos + 8])
        end = pos + 8 + length
        if end + 4 > len(view):
            break
        if zlib.crc32(view[pos + 4:end]) != struct.unpack('>I', view[end:end + 4])[0]:
            raise ImageDecodeError(f'{where}: damaged PNG data (CRC mismatch in a {kind.decode("latin-1")} chunk).')
        if kind == b'IEND':
            return
        pos = end + 4
    raise ImageDecodeError(f'{where}: truncated PNG (no IEND chunk).')


def header_format(data, where: str) -> tuple[int, int, Optional[ImageFormat]]:
    """``(H, W, format)`` of encoded image bytes from their header only (PNG: IHDR; other formats: Pillow's
    header parser; format None when the mode says nothing about it). Raises :class:`ImageDecodeError`."""
    if bytes(data[:len(PNG_SIGNATURE)]) == PNG_SIGNATURE:
        return png_header(data, where)
    from PIL import Image  # Pillow ships with torchvision

    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            (w, h), mode = im.size, im.mode
    except Exception:  # Pillow raises several types for what it cannot parse
        raise ImageDecodeError(f'{where}: not a readable image (expected PNG, TIFF, JPEG or BMP).') from None
    fmt = _PIL_FORMATS.get(mode)
    return h, w, ImageFormat(*fmt) if fmt else None


def file_format(path: str) -> Optional[ImageFormat]:
    """Bit depth and channels of an image file as :func:`decode_raw` will return them, from its header (PNG) or
    Pillow's mode; None when the header does not tell (e.g. 32-bit TIFF) or the file is not readable."""
    try:
        with open(path, 'rb') as f:
            head = f.read(PNG_HEADER_BYTES)
        if head[:len(PNG_SIGNATURE)] == PNG_SIGNATURE:
            return png_header(head, path)[2]
        from PIL import Image
        with Image.open(path) as im:
            fmt = _PIL_FORMATS.get(im.mode)
    except Exception:  # reported by check_file, which runs on every file anyway
        return None
    return ImageFormat(*fmt) if fmt else None


def check_file(path: str, verify: bool = True) -> tuple[int, int]:
    """Cheap integrity check of an image file; returns ``(H, W)`` or raises :class:`ImageDecodeError`.

    Reads the header with Pillow (no decoding). With ``verify``, PNG chunk checksums are checked (catches truncation)
    and a JPEG must end with its end-of-image marker. Formats Pillow cannot parse are fully decoded with OpenCV.
    """
    from PIL import Image  # Pillow ships with torchvision

    try:
        im = Image.open(path)
    except FileNotFoundError:
        raise ImageDecodeError(f'{path}: file not found.') from None
    except Exception:  # not a format Pillow knows (or an empty file): OpenCV decides below, naming the file
        im = None
    if im is None:
        with open(path, 'rb') as f:
            return decode_image(f.read(), path).pixels.shape[:2]
    with im:
        w, h = im.size
        fmt = im.format
        try:
            if verify and fmt == 'PNG':
                im.verify()
        except Exception as err:  # Pillow raises several types for damaged files
            raise ImageDecodeError(f'{path}: truncated or damaged PNG ({err}).') from None
    if verify and fmt == 'JPEG':
        with open(path, 'rb') as f:
            f.seek(-len(_JPEG_EOI), os.SEEK_END)
            if f.read() != _JPEG_EOI:
                raise ImageDecodeError(f'{path}: truncated JPEG (no end-of-image marker).')
    return h, w
