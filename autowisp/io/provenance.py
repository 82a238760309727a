"""Where a product came from, written the same way into every product a step writes.

A person holding any product file can tell which raw frame it came from (its file name
and sha256), which code made it (the package and step versions), with which
configuration, whether it was calibrated, and which masters were used. In FITS these are
primary header keywords, in HDF5 root attributes, under the same names:

``STEP``, ``STEPVER``, ``AWVERS``, ``CONFIG``
    the step, its ``version``, ``autowisp.__version__`` and the configuration version.
``RAWFILE``, ``RAWSHA``
    the raw frame's file name and sha256 (image products only; a master lists its
    frames in HISTORY cards instead).
``UNCALIB``
    True for a frame calibrated without masters (and for what is made from it).
``MBIAS``, ``MDARK``, ``MFLAT``
    the masters used: ``'<night date> cfg=<configuration> <path>'``, the path relative to
    the storage root; values longer than a card continue on CONTINUE cards (astropy's
    long strings).
``CALFRAME``
    for products made from a calibrated frame, that frame, in the same form.
``ASTROM``
    for products made with an astrometric solution, that solution, in the same form.
``STARLIST``
    for products made with the night's star list, that list, in the same form.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from astropy.io import fits

import autowisp

__all__ = [
    "MASTER_KEYWORDS",
    "Provenance",
    "product_reference",
    "reference_path",
    "shown_path",
    "stamp",
]

#: Characters of value and comment that fit on one card (80 minus keyword and quoting).
CARD_ROOM = 60

#: Header keyword naming the master of each master step.
MASTER_KEYWORDS = {"master_bias": "MBIAS", "master_dark": "MDARK", "master_flat": "MFLAT"}


def shown_path(path: Path, storage_root: Path | None) -> str:
    """``path`` as a product reference shows it: relative to ``storage_root`` when it
    lies under it."""
    if storage_root is not None:
        try:
            return str(Path(path).relative_to(storage_root))
        except ValueError:
            pass
    return str(path)


def reference_path(reference: str) -> str:
    """The path part of a :func:`product_reference` (``''`` for an empty reference)."""
    parts = reference.split(" ", 2)
    return parts[2] if len(parts) == 3 else ""


def product_reference(product: Any, storage_root: Path | None) -> str:
    """``'<night date> cfg=<configuration version> <path>'`` of an upstream product.

    ``product`` is an :class:`autowisp.steps.base.InputProduct`; the path is given
    relative to ``storage_root`` when it lies under it.
    """
    path = Path(product.output_path) if product.output_path is not None else None
    shown = "" if path is None else shown_path(path, storage_root)
    night = product.night_date.isoformat() if product.night_date else "unknown-night"
    return f"{night} cfg={product.config_version or 'unknown'} {shown}"


@dataclass(frozen=True)
class Provenance:
    """The provenance of one product (see the module docstring for the keywords)."""

    step: str
    step_version: str
    config_version: str
    code_version: str = autowisp.__version__
    raw_file: str = ""
    raw_sha256: str = ""
    uncalibrated: bool | None = None
    references: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        context: Any,
        *,
        version: str,
        uncalibrated: bool | None = None,
        masters: Mapping[str, Any] | None = None,
        calibrated: Any = None,
        astrometry: Any = None,
        star_list: Any = None,
    ) -> Provenance:
        """The provenance of what a step writes for ``context`` (a StepContext).

        ``masters`` maps master step names to the InputProducts used, ``calibrated``
        is the calibrated frame's InputProduct for products made from it.
        """
        references = {
            MASTER_KEYWORDS[step]: product_reference(product, context.storage_root)
            for step, product in (masters or {}).items()
        }
        if calibrated is not None:
            references["CALFRAME"] = product_reference(calibrated, context.storage_root)
        if astrometry is not None:
            references["ASTROM"] = product_reference(astrometry, context.storage_root)
        if star_list is not None:
            references["STARLIST"] = product_reference(star_list, context.storage_root)
        image = context.image
        return cls(
            step=context.step,
            step_version=version,
            config_version=context.config_version,
            raw_file=image.path.name if image is not None else "",
            raw_sha256=image.sha256 if image is not None else "",
            uncalibrated=uncalibrated,
            references=references,
        )

    def items(self) -> list[tuple[str, Any, str]]:
        """(keyword, value, comment) of each keyword this provenance writes."""
        cards: list[tuple[str, Any, str]] = [
            ("STEP", self.step, "step that wrote this product"),
            ("STEPVER", self.step_version, "version of the step's code"),
            ("AWVERS", self.code_version, "autowisp version"),
            ("CONFIG", self.config_version, "configuration version of the step"),
        ]
        if self.raw_file:
            cards.append(("RAWFILE", self.raw_file, "raw frame this product comes from"))
            cards.append(("RAWSHA", self.raw_sha256, "sha256 of the raw frame"))
        if self.uncalibrated is not None:
            cards.append(("UNCALIB", self.uncalibrated, "True: no bias, dark or flat master"))
        for key, value in self.references.items():
            cards.append((key, value, ""))
        return cards

    @classmethod
    def read(cls, source: Mapping[str, Any]) -> Provenance:
        """The provenance stamped into a FITS header or HDF5 attributes."""

        def text(key: str) -> str:
            value = source.get(key, "")
            return value.decode() if isinstance(value, bytes) else str(value)

        uncalibrated = source.get("UNCALIB")
        references = {
            key: text(key)
            for key in (*MASTER_KEYWORDS.values(), "CALFRAME", "ASTROM", "STARLIST")
            if key in source
        }
        return cls(
            step=text("STEP"),
            step_version=text("STEPVER"),
            config_version=text("CONFIG"),
            code_version=text("AWVERS"),
            raw_file=text("RAWFILE"),
            raw_sha256=text("RAWSHA"),
            uncalibrated=None if uncalibrated is None else bool(uncalibrated),
            references=references,
        )


def stamp(target: fits.Header | MutableMapping[str, Any], provenance: Provenance) -> None:
    """Write ``provenance`` into a FITS header (keywords) or HDF5 attributes, in place.

    The one place where provenance is written: every product writer calls it.
    """
    for key, value, comment in provenance.items():
        if isinstance(target, fits.Header):
            # A comment goes only where it fits on the card beside the value.
            fits_card = comment and len(str(value)) + len(comment) <= CARD_ROOM
            target[key] = (value, comment) if fits_card else value
        else:
            target[key] = value
