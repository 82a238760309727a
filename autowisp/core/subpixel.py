"""Sub-pixel sensitivity maps: how light falling inside a channel's pixel is detected.

A channel of a mosaic (:class:`autowisp.core.bayer.Channel`) samples the sky on a grid
of super-pixels ``step × step`` full pixels wide. A channel pixel at full-frame position
``(py, px)`` owns the super-pixel ``[px − 0.5, px − 0.5 + step] × [py − 0.5, py − 0.5 +
step]`` shifted so that the pixel itself sits at its offset ``(y0, x0)`` inside it; only
the part of the super-pixel behind the channel's filter is sensitive. For one Bayer
channel that is one quarter, so a map of 2 × 2 cells with value 4 on the channel's
quarter and 0 elsewhere (mean 1); a monochrome sensor's map is one cell of value 1.

The map is piecewise constant on ``ny × nx`` equal cells and has mean 1, so a star of
flux ``A`` whose light is uniform over the super-pixel gives the channel pixel ``A``
times the super-pixel's share of the light: ``A`` is the flux the channel collects on
average over sub-pixel phases, and a well-sampled star's pixels sum to ``A``.

:meth:`SensitivityMap.cells` lists the sensitive cells as rectangles relative to the
channel pixel's centre, the form the PSF integrals of :mod:`autowisp.core.psf` and
:mod:`autowisp.core.aperture` take.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autowisp.core.bayer import Channel

__all__ = ["SensitivityMap", "channel_map", "uniform_map"]


@dataclass(frozen=True)
class SensitivityMap:
    """A piecewise-constant sensitivity over one super-pixel.

    Attributes
    ----------
    values : (ny, nx) float64
        Sensitivity of each cell, mean 1; ``values[0, 0]`` is the super-pixel's corner
        with the smallest x and y.
    step : int
        Super-pixel size in full pixels (2 for a Bayer channel, 1 for monochrome).
    y0, x0 : int
        Position of the channel's own pixel within the super-pixel (full pixels).
    """

    values: np.ndarray
    step: int
    y0: int = 0
    x0: int = 0

    def __post_init__(self) -> None:
        values = np.asarray(self.values, dtype=float)
        if values.ndim != 2 or values.size == 0:
            raise ValueError(f"a sensitivity map is a 2-D array, got shape {values.shape}")
        if not np.all(np.isfinite(values)) or np.any(values < 0):
            raise ValueError("sensitivity map values must be finite and non-negative")
        if not np.isclose(values.mean(), 1.0, rtol=1e-9):
            raise ValueError(f"a sensitivity map has mean 1, this one {values.mean():.6g}")
        if self.step < 1 or not (0 <= self.y0 < self.step and 0 <= self.x0 < self.step):
            raise ValueError(
                f"offset ({self.y0}, {self.x0}) must lie within a super-pixel of {self.step}"
            )
        object.__setattr__(self, "values", values)

    @property
    def uniform(self) -> bool:
        """True when every cell is equally sensitive (no sub-pixel structure)."""
        return bool(np.all(self.values == self.values.flat[0]))

    def cells(self) -> np.ndarray:
        """Sensitive cells as rows ``(dx0, dx1, dy0, dy1, weight)``.

        Offsets (full pixels) are relative to the centre of the channel's own pixel;
        ``weight`` is the cell's sensitivity. Cells of zero sensitivity are left out.
        """
        ny, nx = self.values.shape
        width, height = self.step / nx, self.step / ny
        left = -0.5 - self.x0
        bottom = -0.5 - self.y0
        rows = []
        for j in range(ny):
            for i in range(nx):
                weight = self.values[j, i]
                if weight > 0:
                    x_lo = left + i * width
                    y_lo = bottom + j * height
                    rows.append((x_lo, x_lo + width, y_lo, y_lo + height, weight))
        return np.array(rows, dtype=float).reshape(-1, 5)

    def extent(self) -> np.ndarray:
        """The whole super-pixel as ``(dx0, dx1, dy0, dy1)`` relative to the pixel centre."""
        left, bottom = -0.5 - self.x0, -0.5 - self.y0
        return np.array([left, left + self.step, bottom, bottom + self.step])


def uniform_map(step: int = 1, y0: int = 0, x0: int = 0) -> SensitivityMap:
    """A map with no sub-pixel structure (monochrome sensors; plain photometry)."""
    return SensitivityMap(np.ones((1, 1)), step, y0, x0)


def channel_map(channel: Channel) -> SensitivityMap:
    """The map of one channel of a mosaic: its own full pixel sensitive, the rest blind.

    A monochrome channel (``step`` 1) is the uniform map.
    """
    step = channel.step
    if step == 1:
        return uniform_map()
    values = np.zeros((step, step))
    values[channel.y0, channel.x0] = step * step
    return SensitivityMap(values, step, channel.y0, channel.x0)
