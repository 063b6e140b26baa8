"""Images of the real benchmarks: decoding upstream image values, and LLaVA-1.5's pad-to-square preprocessing.

LLaVA-1.5 (``image_aspect_ratio: pad`` in the released configs) does not let the CLIP image processor crop a
non-square image: ``llava/mm_utils.py`` ``process_images`` first pastes it, centred, on a square canvas of side
``max(width, height)`` filled with the image processor's mean colour as integers,
``tuple(int(m * 255) for m in image_processor.image_mean)`` (truncation, not rounding: CLIP's mean
(0.48145466, 0.4578275, 0.40821073) gives (122, 116, 104)), and only then runs the processor, whose resize and
centre crop are no-ops on a square. The llava-hf processor alone resizes the shortest edge to 336 and centre-crops
336 x 336, cutting off the long side. :data:`IMAGE_MODES`: ``pad`` (LLaVA-1.5, the real path's default) or
``crop`` (the processor's own preprocessing: llava-hf's centre crop).
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any

#: How an image reaches the processor: ``pad`` (square canvas in the mean colour, LLaVA-1.5's expand2square)
#: or ``crop`` (unchanged: the processor's own resize and centre crop).
IMAGE_MODES: tuple[str, ...] = ("pad", "crop")


class ImageDecodeError(ValueError):
    """An upstream image value that cannot be decoded (the message is the loader's skip reason)."""


def default_image_mode(data: str) -> str:
    """``pad`` for the real benchmarks (LLaVA-1.5's evaluation), ``crop`` (no change) for the synthetic suites,
    whose images are square already."""
    return "pad" if data == "real" else "crop"


def mean_fill(image_processor: Any) -> tuple[int, ...]:
    """The padding colour of LLaVA-1.5: ``int(m * 255)`` for each channel mean ``m`` of ``image_processor``."""
    mean = getattr(image_processor, "image_mean", None)
    if mean is None:
        raise ValueError(f"{type(image_processor).__name__} has no image_mean to pad with")
    return tuple(int(float(m) * 255) for m in mean)


def expand_to_square(image: Any, fill: tuple[int, ...]) -> Any:
    """``image`` centred on a ``s x s`` canvas of colour ``fill``, ``s = max(w, h)``; a square image is returned
    as is. The offset is ``((s - w) // 2, (s - h) // 2)``: the original pixels are kept unchanged."""
    import PIL.Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = PIL.Image.new(image.mode, (side, side), fill if len(fill) > 1 else fill[0])
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def prepare_image(image: Any, processor: Any, mode: str) -> Any:
    """The image handed to ``processor`` under ``mode`` (:data:`IMAGE_MODES`); ``processor`` is a LLaVA processor
    (its ``image_processor`` gives the mean colour) or an image processor itself."""
    if mode not in IMAGE_MODES:
        raise ValueError(f"image mode must be one of {', '.join(IMAGE_MODES)}, got {mode!r}")
    if mode == "crop" or image is None:
        return image
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return expand_to_square(rgb, mean_fill(getattr(processor, "image_processor", processor)))


def decode_image(value: Any) -> Any:
    """An upstream image (``{"bytes", "path"}`` struct, raw bytes, or PIL image) as an RGB PIL image.

    Mirrors ``datasets.Image.decode_example`` (full decode, EXIF orientation) but never fetches remote
    paths. Raises :class:`ImageDecodeError` (``"missing field: image"`` / ``"undecodable image: ..."``).
    """
    import PIL.Image
    import PIL.ImageOps

    if value is None:
        raise ImageDecodeError("missing field: image")
    try:
        if isinstance(value, PIL.Image.Image):
            image = value
        else:
            if isinstance(value, (bytes, bytearray)):
                data, path = bytes(value), None
            else:
                data, path = value.get("bytes"), value.get("path")
            if data is None:
                if not path or not Path(path).is_file():
                    raise ImageDecodeError(f"undecodable image: no bytes and no local file (path={path!r})")
                data = Path(path).read_bytes()
            image = PIL.Image.open(BytesIO(data))
            image.load()
            if image.getexif().get(PIL.Image.ExifTags.Base.Orientation) is not None:
                image = PIL.ImageOps.exif_transpose(image)
        return image if image.mode == "RGB" else image.convert("RGB")
    except ImageDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
        raise ImageDecodeError(f"undecodable image: {type(exc).__name__}: {exc}") from None
