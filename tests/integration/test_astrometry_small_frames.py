"""The astrometry step on small and sparse simulated frames, against the true WCS.

A 256-px frame at 10.3"/px holds only 7-12 catalogue stars (G ≤ 10) among ~200-280
sources: the pattern match's votes, the sources it uses and the fit's acceptance scale
with the catalogue stars expected in the frame (``autowisp.core.astrometry.matching_plan``).
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from autowisp.core.astrometry import SolveError, solve
from autowisp.core.calibration import MaskBit
from autowisp.core.extraction import extract_sources
from autowisp.core.projection import TanSip, tan_deproject
from autowisp.io.catalogue import OfflineGaia
from autowisp.io.keywords import header_pixel_scale, header_pointing
from autowisp.io.products import read_calibrated_frame
from autowisp.io.solution import read_astrometric_solution
from autowisp.simulate.night import NightConfig, simulate_night
from autowisp.simulate.truth import read_truth
from autowisp.vocabulary import TaskState
from tests.integration.conftest import process_upload
from tests.integration.test_astrometry_step import REGISTRY

SMALL = {
    "mono-256x200": {"width": 256, "height": 200, "layout": "MONO"},
    "rggb-256x256": {"width": 256, "height": 256, "layout": "RGGB"},
}


def _night(home, **config):
    simulate_night(home / "upload", NightConfig(frames=2, seed=3, **config))
    rows = [r for r in process_upload(home, home / "upload", REGISTRY) if r.name == "astrometry"]
    truth = read_truth(next((home / "upload").rglob("truth.h5")))
    return rows, truth


@pytest.fixture(scope="module", params=sorted(SMALL))
def small_night(request, tmp_path_factory):
    home = tmp_path_factory.mktemp(request.param)
    return (*_night(home, **SMALL[request.param]), home)


def _true_wcs(truth, raw_file) -> TanSip:
    frame = list(truth.object["filename"]).index(raw_file)
    return TanSip.from_header(fits.Header.fromstring(truth.object["wcs_header"][frame], sep="\n"))


def test_small_frames_solve_to_the_true_positions(small_night):
    rows, truth, _ = small_night
    assert [row.state for row in rows] == [TaskState.DONE] * 2, [r.last_error for r in rows]
    for row in rows:
        solution = read_astrometric_solution(row.output_path)
        catalogue = solution.catalogue
        assert 6 <= row.qc["matched"] <= row.qc["catalogue_stars"] <= 16
        assert row.qc["rms_px"] < 0.3
        # Every catalogue star the product places on the frame, against the true WCS.
        true_x, true_y = _true_wcs(truth, solution.provenance.raw_file).sky_to_pixel(
            catalogue["ra"], catalogue["dec"]
        )
        error = np.hypot(catalogue["x"] - true_x, catalogue["y"] - true_y)
        assert error.size >= 6
        assert error.max() < 0.3, error


def test_a_pointing_far_off_fails_with_its_reason_not_a_false_solution(small_night):
    """Header pointings 15-60° off (the step searches 10°): no solution, and the reason
    says how many catalogue stars were expected."""
    _, _, home = small_night
    offline = OfflineGaia()
    for path in sorted((home / "storage" / "calibrate").rglob("image-*.fits")):
        frame = read_calibrated_frame(path, with_error=False)
        if not frame.provenance.raw_file.startswith("object_"):
            continue
        header = fits.getheader(next((home / "upload").rglob(frame.provenance.raw_file)))
        hint0, scale = header_pointing(header), header_pixel_scale(header)
        assert hint0 is not None and scale
        saturated = (frame.mask & (MaskBit.SATURATED | MaskBit.BLEED)) != 0
        data = np.asarray(frame.image, float)
        sources = extract_sources(data, frame.layout, saturated=saturated)
        for k, distance in enumerate((15.0, 25.0, 40.0, 60.0)):
            angle = np.radians(70.0 * k + 20.0)
            offset = np.degrees(np.tan(np.radians(distance)))
            ra, dec = tan_deproject(offset * np.cos(angle), offset * np.sin(angle), *hint0)
            hint = (float(ra) % 360.0, float(dec))
            stars = offline.cone(*hint, 10.6, epoch=2024.7)
            with pytest.raises(SolveError, match=r"no match.*catalogue stars expected in the"):
                solve(sources.x, sources.y, stars.ra, stars.dec, data.shape, hint=hint,
                      pixel_scale=scale, max_rms=1.0)  # fmt: skip


def test_a_frame_too_sparse_for_the_catalogue_fails_with_its_reason(tmp_path):
    """256×200 px at Dec −60 holds one G ≤ 10 star (about 3 expected): it cannot be
    matched, and the error says so instead of only 'best match 4 stars, 8 needed'."""
    rows, _ = _night(tmp_path, width=256, height=200, layout="MONO", ra=10.0, dec=-60.0)
    assert [row.state for row in rows] == [TaskState.DEAD] * 2
    for row in rows:
        assert "about 3 catalogue stars expected in the frame" in row.last_error
        assert "too few catalogue stars can fall on the frame" in row.last_error
