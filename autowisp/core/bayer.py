"""Bayer mosaic layouts and colour channels.

Pixel convention (used throughout AutoWISP): a 2-D image is a numpy array indexed
``image[y, x]``; pixel ``(y, x)`` covers ``x - 0.5 .. x + 0.5`` and ``y - 0.5 .. y + 0.5``
so its centre sits at integer coordinates, counted from 0. FITS/WCS headers use the
same grid shifted by one (``CRPIX = x + 1``).

A layout such as ``"RGGB"`` lists the filters of one 2×2 super-pixel in row-major
order: ``image[0, 0]`` is R, ``image[0, 1]`` is G1, ``image[1, 0]`` is G2 and
``image[1, 1]`` is B. A monochrome camera is the one-channel layout ``"MONO"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "LAYOUTS",
    "Channel",
    "channel_index_map",
    "channels",
    "colour_of_channels",
    "validate_layout",
]

#: The four Bayer layouts of colour cameras, plus the monochrome case.
LAYOUTS: tuple[str, ...] = ("RGGB", "BGGR", "GRBG", "GBRG", "MONO")

#: Colours in the order used for per-colour arrays (e.g. a star's flux per colour).
COLOURS: tuple[str, ...] = ("R", "G", "B")


@dataclass(frozen=True)
class Channel:
    """One sub-grid of a mosaic.

    Attributes
    ----------
    name : str
        ``"R"``, ``"G1"``, ``"G2"``, ``"B"`` (or ``"L"`` for a monochrome camera).
    colour : str
        The filter colour: ``"R"``, ``"G"``, ``"B"`` (``"L"`` for monochrome).
    y0, x0 : int
        Offset of the channel's first pixel within the super-pixel; the channel's
        pixels are ``image[y0::step, x0::step]``.
    step : int
        2 for a Bayer mosaic, 1 for a monochrome sensor.
    """

    name: str
    colour: str
    y0: int
    x0: int
    step: int

    def view(self, image: np.ndarray) -> np.ndarray:
        """Return the channel's sub-image (a view, no copy)."""
        return image[self.y0 :: self.step, self.x0 :: self.step]


def validate_layout(layout: str) -> str:
    """Return the layout in upper case, or raise ``ValueError`` naming it."""
    normalised = str(layout).strip().upper()
    if normalised not in LAYOUTS:
        raise ValueError(f"unknown Bayer layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    return normalised


def channels(layout: str) -> tuple[Channel, ...]:
    """The channels of a layout, in the order R, G1, G2, B (or the single L)."""
    layout = validate_layout(layout)
    if layout == "MONO":
        return (Channel("L", "L", 0, 0, 1),)
    found: dict[str, Channel] = {}
    greens = 0
    for position, colour in enumerate(layout):
        y0, x0 = divmod(position, 2)
        if colour == "G":
            greens += 1
            name = f"G{greens}"
        else:
            name = colour
        found[name] = Channel(name, colour, y0, x0, 2)
    return tuple(found[name] for name in ("R", "G1", "G2", "B"))


def colour_of_channels(layout: str) -> np.ndarray:
    """Index into :data:`COLOURS` of each channel of :func:`channels` (``[0]`` for MONO)."""
    return np.array(
        [COLOURS.index(ch.colour) if ch.colour in COLOURS else 0 for ch in channels(layout)],
        dtype=np.intp,
    )


def channel_index_map(layout: str, shape: tuple[int, int]) -> np.ndarray:
    """Per-pixel index into :func:`channels` for an image of ``shape`` (rows, columns)."""
    ny, nx = shape
    result = np.zeros((ny, nx), dtype=np.int8)
    for index, channel in enumerate(channels(layout)):
        channel.view(result)[...] = index
    return result
