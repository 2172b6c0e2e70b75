"""Rendered resources and thumbnails (PS3.18 10.4.1.1.4 / 8.3.5, 10.7 Thumbnail).

A frame is decoded with pydicom, passed through the Modality LUT (rescale slope and
intercept) and a VOI window (PS3.3 C.11.2.1.2: ``linear``, ``linear-exact`` or ``sigmoid``)
taken from the ``window`` parameter, the object's own Window Center/Width, or the frame's
range, and encoded as JPEG or PNG by Pillow. ``viewport=w,h`` scales the image to fit
inside w x h keeping its aspect ratio; ``quality`` (1-100) sets JPEG quality.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_color_lut

from bastion.dicomweb import pixels
from bastion.dicomweb.negotiation import MediaRange, NotAcceptable
from bastion.errors import InvalidQuery

RENDERED_TYPES = ("image/jpeg", "image/png")
THUMBNAIL_SIZE = 128
_FUNCTIONS = ("linear", "linear-exact", "sigmoid")


@dataclass(frozen=True)
class RenderOptions:
    """Parsed rendering parameters (PS3.18 8.3.5.1)."""

    media_type: str = "image/jpeg"
    window: tuple[float, float, str] | None = None
    viewport: tuple[int, int] | None = None
    quality: int = 90


def _floats(text: str, name: str) -> list[str]:
    """The comma-separated items of parameter ``name``."""
    return [p.strip() for p in text.split(",")]


def parse_options(params: Mapping[str, str], accept: list[MediaRange], *,
                  thumbnail: bool = False) -> RenderOptions:
    """Parse ``window``, ``viewport``, ``quality`` and the Accept header; 400 / 406 on errors."""
    media_type = None
    for r in accept:
        for candidate in RENDERED_TYPES:
            if r.matches(candidate):
                media_type = candidate
                break
        if media_type:
            break
    if media_type is None:
        raise NotAcceptable("rendered resources are available as image/jpeg or image/png")
    window = None
    if params.get("window"):
        parts = _floats(params["window"], "window")
        try:
            center, width = float(parts[0]), float(parts[1])
        except (ValueError, IndexError):
            raise InvalidQuery("window must be center,width[,function]") from None
        function = parts[2].lower() if len(parts) > 2 and parts[2] else "linear"
        if not (math.isfinite(center) and math.isfinite(width)):
            raise InvalidQuery("window center and width must be finite numbers")
        if function not in _FUNCTIONS or width <= 0 or len(parts) > 3:
            raise InvalidQuery(f"window function must be one of {', '.join(_FUNCTIONS)} and width > 0")
        window = (center, width, function)
    viewport = (THUMBNAIL_SIZE, THUMBNAIL_SIZE) if thumbnail else None
    if params.get("viewport"):
        parts = _floats(params["viewport"], "viewport")
        try:
            vw, vh = int(parts[0]), int(parts[1])
        except (ValueError, IndexError):
            raise InvalidQuery("viewport must be width,height") from None
        if not (0 < vw <= 8192 and 0 < vh <= 8192) or len(parts) not in (2, 6):
            raise InvalidQuery("viewport width and height must be between 1 and 8192")
        viewport = (vw, vh)
    quality = 90
    if params.get("quality"):
        try:
            quality = int(params["quality"])
        except ValueError:
            quality = 0
        if not 1 <= quality <= 100:
            raise InvalidQuery("quality must be an integer from 1 to 100")
    return RenderOptions(media_type, window, viewport, quality)


def _voi(arr: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """Apply a VOI LUT function to 0..255 (PS3.3 C.11.2.1.2)."""
    if function == "linear-exact":
        out = (arr - center) / width + 0.5
    elif function == "sigmoid":
        out = 1.0 / (1.0 + np.exp(-4.0 * (arr - center) / width))
    else:
        if width <= 1:
            out = (arr > center - 0.5).astype(np.float64)
        else:
            out = (arr - (center - 0.5)) / (width - 1) + 0.5
    return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _first(value: object) -> float | None:
    """The first value of a possibly multi-valued DS/IS element as a float."""
    if isinstance(value, list | tuple | MultiValue):
        value = value[0] if len(value) else None
    if value is None:
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def to_image(ds: Dataset, frame: int, options: RenderOptions) -> Image.Image:
    """Frame ``frame`` (0-based) of ``ds`` as an 8-bit Pillow image."""
    arr = pixels.frame_array(ds, frame)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        if arr.dtype != np.uint8:
            arr = (arr >> 8).astype(np.uint8)
        return Image.fromarray(arr, "RGB")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        if arr.dtype != np.uint8:
            bits = int(ds.get("BitsStored", 16) or 16)
            arr = (arr.astype(np.float64) * 255.0 / (2**bits - 1)).clip(0, 255).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(arr[..., :3]), "RGB")
    values = arr.astype(np.float64)
    slope = _first(ds.get("RescaleSlope")) or 1.0
    intercept = _first(ds.get("RescaleIntercept")) or 0.0
    values = values * slope + intercept
    if options.window:
        center, width, function = options.window
    else:
        stored_center, stored_width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
        function = str(ds.get("VOILUTFunction", "LINEAR")).lower().replace("_", "-")
        if function not in _FUNCTIONS:
            function = "linear"
        if stored_center is None or stored_width is None or stored_width <= 0:
            low, high = float(values.min()), float(values.max())
            center, width, function = (low + high) / 2, max(high - low, 1.0), "linear-exact"
        else:
            center, width = stored_center, stored_width
    out = _voi(values, center, width, function)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return Image.fromarray(out, "L")


def render(ds: Dataset, frame: int, options: RenderOptions) -> bytes:
    """Frame ``frame`` (0-based) rendered and encoded as ``options.media_type``."""
    if pixels.number_of_frames(ds) == 0:
        raise NotAcceptable("the instance has no pixel data to render")
    image = to_image(ds, frame, options)
    if options.viewport:
        scale = min(options.viewport[0] / image.width, options.viewport[1] / image.height)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if options.media_type == "image/png":
        image.save(buf, "PNG")
    else:
        image.save(buf, "JPEG", quality=options.quality)
    return buf.getvalue()
