"""Camera language -> blur strength K (the Genfocus paper's Eq. 3), and EXIF reading.

Thin lens, focal length f, f-number N (aperture diameter f/N), focused at distance z_f. A point at
distance z is imaged as a blur disc whose *radius* on the sensor is

    r_sensor = f^2 * z_f / (2 N (z_f - f)) * |1/z - 1/z_f|        (all lengths in metres)

so with disparity = 1/z (1/m) the CoC radius in pixels of an image ``W`` px wide taken on a sensor
``S`` wide is ``K * |disparity - disparity_focus|`` with

    K = f^2 * z_f / (2 N (z_f - f)) * W / S                      (px*m)

which is Eq. 3 of the paper (``K ~ f^2 D_focus / (2F (D_focus - f)) x pixel_ratio``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from ._checks import check_number
from .errors import GenRefocusInputError

__all__ = [
    "FULL_FRAME_WIDTH_MM",
    "SENSOR_WIDTHS_MM",
    "Camera",
    "ExifLens",
    "bokeh_k",
    "camera_from_exif",
    "f_number_for_k",
    "read_exif",
]

logger = logging.getLogger(__name__)

#: Width of a 35 mm "full-frame" sensor, mm.
FULL_FRAME_WIDTH_MM = 36.0


def _check_lens(focal_length_mm, focus_distance_m, sensor_width_mm, image_width_px):
    f = check_number("focal_length_mm", focal_length_mm, lo=0.0, lo_open=True)
    z = check_number("focus_distance_m", focus_distance_m, lo=0.0, lo_open=True)
    s = check_number("sensor_width_mm", sensor_width_mm, lo=0.0, lo_open=True)
    w = check_number("image_width_px", image_width_px, lo=1.0)
    if z <= f / 1000.0:
        raise GenRefocusInputError(
            f"focus_distance_m must be beyond the focal length ({f / 1000.0:g} m), got {z:g}: a lens cannot "
            "focus closer than its focal length"
        )
    return f / 1000.0, z, s / 1000.0, w


def bokeh_k(
    focal_length_mm: float,
    f_number: float,
    focus_distance_m: float,
    sensor_width_mm: float,
    image_width_px: float,
) -> float:
    """Blur strength K (px*m) of a real lens setting, for metric disparity (1/m).

    The CoC radius in pixels is ``K * |1/z - 1/z_focus|`` with ``z`` in metres: the thin-lens
    blur-circle radius on the sensor converted to pixels of an image ``image_width_px`` wide.

    Args:
        focal_length_mm: real (not 35 mm-equivalent) focal length, mm, ``> 0``.
        f_number: aperture f-number N, ``> 0`` (e.g. 1.8).
        focus_distance_m: distance of the focal plane, metres, beyond the focal length.
        sensor_width_mm: sensor width, mm (36 for full frame; 36 / crop factor otherwise).
        image_width_px: width of the image the disparity map belongs to, px.

    Returns:
        K in px*m.

    Raises:
        GenRefocusInputError: for non-positive or non-finite values, or focus inside the focal length.

    Example:
        >>> round(bokeh_k(85, 1.8, 2.0, 36, 1024), 2)  # 85 mm f/1.8 at 2 m, full frame, 1024 px wide
        59.62
    """
    f, z, s, w = _check_lens(focal_length_mm, focus_distance_m, sensor_width_mm, image_width_px)
    n = check_number("f_number", f_number, lo=0.0, lo_open=True)
    return f * f * z / (2.0 * n * (z - f)) * w / s


def f_number_for_k(
    k: float, focal_length_mm: float, focus_distance_m: float, sensor_width_mm: float, image_width_px: float
) -> float:
    """The f-number that gives blur strength ``k`` (px*m): the inverse of :func:`bokeh_k`.

    Example:
        >>> round(f_number_for_k(bokeh_k(50, 2.8, 3.0, 23.5, 2000), 50, 3.0, 23.5, 2000), 6)
        2.8
    """
    f, z, s, w = _check_lens(focal_length_mm, focus_distance_m, sensor_width_mm, image_width_px)
    k = check_number("k", k, lo=0.0, lo_open=True)
    return f * f * z / (2.0 * k * (z - f)) * w / s


@dataclass(frozen=True)
class ExifLens:
    """Lens settings read from a photo's EXIF; ``None`` where the file does not say."""

    focal_length_mm: float | None = None
    f_number: float | None = None
    focal_length_35mm: float | None = None
    make: str | None = None
    model: str | None = None
    width_px: int | None = None
    height_px: int | None = None

    @property
    def crop_factor(self) -> float | None:
        """35 mm-equivalent focal length / real focal length, when both are known."""
        if self.focal_length_mm and self.focal_length_35mm:
            return self.focal_length_35mm / self.focal_length_mm
        return None

    @property
    def sensor_width_mm(self) -> float | None:
        """Sensor width derived from the crop factor (36 mm / crop), when known."""
        crop = self.crop_factor
        return FULL_FRAME_WIDTH_MM / crop if crop else None


def _num(v) -> float | None:
    if v is None:
        return None
    try:
        x = float(v)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return x if math.isfinite(x) and x > 0 else None


def read_exif(path: str | Path) -> ExifLens:
    """Read focal length, f-number, 35 mm focal length, make/model and size from an image's EXIF.

    Missing tags become ``None``; a file without EXIF gives an :class:`ExifLens` with only the size.

    Raises:
        GenRefocusInputError: if the file does not exist or is not an image.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise GenRefocusInputError(f"path {str(p)!r} does not exist")
    try:
        with Image.open(p) as img:
            exif = img.getexif()
            size = img.size
    except (UnidentifiedImageError, OSError) as e:
        raise GenRefocusInputError(f"path {str(p)!r} is not a readable image: {e}") from e
    sub = exif.get_ifd(0x8769)  # Exif IFD: the lens tags live here
    tags = {**dict(exif), **dict(sub)}
    make, model = tags.get(0x010F), tags.get(0x0110)
    return ExifLens(
        focal_length_mm=_num(tags.get(0x920A)),
        f_number=_num(tags.get(0x829D)),
        focal_length_35mm=_num(tags.get(0xA405)),
        make=str(make).strip("\x00 ") if make else None,
        model=str(model).strip("\x00 ") if model else None,
        width_px=int(size[0]),
        height_px=int(size[1]),
    )


#: Sensor widths (mm) of common formats, for nodes and the CLI.
SENSOR_WIDTHS_MM = {
    "full frame (36 mm)": 36.0,
    "APS-C (23.5 mm)": 23.5,
    "APS-C Canon (22.3 mm)": 22.3,
    "Micro Four Thirds (17.3 mm)": 17.3,
    "1-inch (13.2 mm)": 13.2,
    "phone 1/1.3-inch (9.8 mm)": 9.8,
}


@dataclass(frozen=True)
class Camera:
    """A lens setting to render with: what travels on the nodes' CAMERA socket.

    Attributes:
        focal_length_mm: real focal length, mm, ``> 0``.
        f_number: aperture to render, ``> 0``; ``None`` when unknown (EXIF without FNumber).
        sensor_width_mm: sensor width, mm, ``> 0``.
        shot_f_number: the f-number the photo was taken at (EXIF), for messages; ``None`` if unknown.
        source: where the numbers came from (``"exif"``, ``"manual"``, ``"exif+manual"``).
    """

    focal_length_mm: float
    f_number: float | None
    sensor_width_mm: float
    shot_f_number: float | None = None
    source: str = "manual"

    def __post_init__(self) -> None:
        check_number("focal_length_mm", self.focal_length_mm, lo=0.0, lo_open=True)
        check_number("sensor_width_mm", self.sensor_width_mm, lo=0.0, lo_open=True)
        if self.f_number is not None:
            check_number("f_number", self.f_number, lo=0.0, lo_open=True)

    def k(self, focus_distance_m: float, image_width_px: float) -> float:
        """:func:`bokeh_k` of this setting (px*m).

        Example:
            >>> round(Camera(85.0, 1.8, 36.0).k(2.0, 1024), 2)
            59.62
        """
        if self.f_number is None:
            raise GenRefocusInputError(
                "f_number must be set to compute K, got None (the photo's EXIF has no FNumber); "
                "set the aperture on a Camera Settings node"
            )
        return bokeh_k(self.focal_length_mm, self.f_number, focus_distance_m, self.sensor_width_mm,
                       image_width_px)

    def describe(self) -> str:
        """One line: ``85 mm f/1.8 on a 36 mm sensor (exif; shot at f/8)``."""
        n = "f/?" if self.f_number is None else f"f/{self.f_number:g}"
        shot = "" if self.shot_f_number is None else f"; shot at f/{self.shot_f_number:g}"
        lens = f"{self.focal_length_mm:g} mm {n} on a {self.sensor_width_mm:g} mm sensor"
        return f"{lens} ({self.source}{shot})"


def camera_from_exif(lens: ExifLens, sensor_width_mm: float | None = None) -> Camera:
    """A :class:`Camera` from EXIF: real focal length, the shot f-number, sensor from the crop factor.

    Args:
        lens: what :func:`read_exif` found.
        sensor_width_mm: used when the file has no 35 mm-equivalent focal length (no crop factor);
            ``None`` or 0 = none given.

    Raises:
        GenRefocusInputError: without a focal length, or without any way to know the sensor width.

    Example:
        >>> lens = ExifLens(focal_length_mm=50.0, f_number=8.0, focal_length_35mm=75.0)  # crop 1.5
        >>> camera_from_exif(lens).sensor_width_mm
        24.0
    """
    if lens.focal_length_mm is None:
        raise GenRefocusInputError(
            "the photo's EXIF has no FocalLength tag, got None; enter the lens on a Camera Settings node"
        )
    sensor = lens.sensor_width_mm
    if sensor is None:
        if not sensor_width_mm:
            raise GenRefocusInputError(
                "sensor_width_mm must be given: the photo's EXIF has no FocalLengthIn35mmFilm tag to derive "
                "the sensor from, got 0 (36 for full frame, 23.5 for APS-C, 17.3 for Micro Four Thirds)"
            )
        sensor = check_number("sensor_width_mm", sensor_width_mm, lo=0.0, lo_open=True)
    return Camera(lens.focal_length_mm, lens.f_number, sensor, shot_f_number=lens.f_number, source="exif")
