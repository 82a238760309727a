"""Comparing products whose layout follows the field's star indices.

A field's star indices are given in the order nights register their stars (a reopened
night registers its new stars again, another night may come first), so two runs of the
same frames may order a magnitude fit's star columns differently and still hold the same
fit. :func:`magfit_by_star` reads such a file with its star axis in a fixed order (the
stars' list rows, then their Gaia ids), so files from two runs compare dataset by dataset.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

#: Datasets of a field group (``FIELD<id>`` and its channels) with a star axis: which.
STAR_AXIS = {
    "source_id": 0, "list_row": 0, "ra": 0, "dec": 0,
    "master": 0, "master_scatter": 0, "master_count": 0, "variable": 0,
    "x": 1, "y": 1, "flags": 1, "airmass": 1, "background": 1, "psf_s": 1, "psf_d": 1,
    "psf_k": 1, "magnitude": 1, "magnitude_err": 1, "fitted": 1,
}  # fmt: skip


def magfit_by_star(path: Path | str) -> dict[str, np.ndarray]:
    """Every dataset of a magfit file (``FIELD1/R/fitted``, ...), star axes in list-row
    order (then Gaia id) whatever the file's column order."""
    found: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as hdf5:
        for name, item in hdf5.items():
            if not isinstance(item, h5py.Group):
                found[name] = item[()]
                continue
            order = np.lexsort((item["source_id"][()], item["list_row"][()]))

            def visit(member: str, dataset: object, field: str = name, order=order) -> None:
                if not isinstance(dataset, h5py.Dataset):
                    return
                values = dataset[()]
                axis = STAR_AXIS.get(member.rsplit("/", 1)[-1])
                if axis is not None:
                    values = np.take(values, order, axis=axis)
                found[f"{field}/{member}"] = values

            item.visititems(visit)
    return found
