"""The astrometry step on a simulated night against the true WCS, and on PANOPTES data."""

from __future__ import annotations

import socket
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from scipy.spatial import cKDTree

from autowisp.core.astrometry import solve
from autowisp.core.extraction import extract_sources
from autowisp.core.projection import TanSip
from autowisp.io.catalogue import OfflineGaia
from autowisp.io.products import read_calibrated_frame
from autowisp.io.solution import read_astrometric_solution
from autowisp.simulate.night import NightConfig, simulate_night
from autowisp.simulate.truth import read_truth
from autowisp.steps.astrometry import Astrometry
from autowisp.steps.calibrate import Calibrate
from autowisp.steps.frame_qc import FrameQC
from autowisp.steps.masters import MasterBias, MasterDark, MasterFlat
from autowisp.steps.registry import Registry
from autowisp.vocabulary import TaskState
from tests.conftest import TEST_DATA
from tests.integration.conftest import process_upload

REGISTRY = Registry([FrameQC, MasterBias, MasterDark, MasterFlat, Calibrate, Astrometry])


@pytest.fixture(scope="module")
def solved_night(tmp_path_factory):
    """Six 768×512 frames, half of them under clouds (seed 5: frames 1, 2 and 4)."""
    home = tmp_path_factory.mktemp("astrometry")
    simulate_night(
        home / "upload",
        NightConfig(frames=6, width=768, height=512, seed=5, cloudy_fraction=0.5),
    )  # fmt: skip
    rows = [r for r in process_upload(home, home / "upload", REGISTRY) if r.name == "astrometry"]
    truth = read_truth(next((home / "upload").rglob("truth.h5")))
    return rows, truth


def test_every_frame_solves_clear_and_cloudy(solved_night):
    rows, truth = solved_night
    assert len(rows) == 6
    assert [row.state for row in rows] == [TaskState.DONE] * 6, [r.last_error for r in rows]
    cover = [
        float(np.mean(truth.object["transparency"][i][truth.object["rendered"][i]] < 0.7))
        for i in range(6)
    ]
    assert max(cover) > 0.5  # at least one frame more than half under cloud solved
    for row in rows:
        assert row.qc["matched"] >= 30 and row.qc["rms_px"] < 0.3
        assert row.qc["pixel_scale"] == pytest.approx(10.3, rel=2e-3)


def test_catalogue_positions_match_the_true_positions(solved_night):
    rows, truth = solved_night
    errors = []
    for frame, row in enumerate(rows):
        with fits.open(row.output_path) as hdus:
            wcs = TanSip.from_header(hdus[0].header)
            catalogue = hdus["CATALOGUE"].data
        # DS9 and astropy read the solution from the product's header.
        astropy_wcs = WCS(read_astrometric_solution(row.output_path).wcs_header)
        # Every star of the truth with S/N > 100 in its 3-px aperture, summed over channels.
        signal = np.nansum(truth.object["aperture_signal"][frame, :, :, 1], axis=1)
        noise = np.sqrt(np.nansum(truth.object["aperture_sigma"][frame, :, :, 1] ** 2, axis=1))
        rendered = truth.object["rendered"][frame]
        with np.errstate(invalid="ignore", divide="ignore"):
            bright = rendered & (signal / noise > 100)
        index = truth.object["star_index"] if "star_index" in truth.object else None
        stars = truth.stars
        ra = stars["ra"] if index is None else stars["ra"][index]
        dec = stars["dec"] if index is None else stars["dec"][index]
        x, y = wcs.sky_to_pixel(ra[bright], dec[bright])
        true_x = truth.object["x"][frame][bright]
        true_y = truth.object["y"][frame][bright]
        errors.append(np.hypot(x - true_x, y - true_y))
        # The header is standard TAN-SIP: astropy reads it to the same pixels.
        ax, ay = astropy_wcs.all_world2pix(ra[bright], dec[bright], 0)
        assert np.max(np.hypot(ax - x, ay - y)) < 1e-3
        # The catalogue table holds the projected positions for photometry.
        assert len(catalogue) >= row.qc["catalogue_stars"] > 0
    error = np.concatenate(errors)
    assert error.size > 200
    assert np.sqrt(np.mean(error**2)) < 0.05


def test_the_solution_is_its_own_product_and_names_its_frames(solved_night):
    rows, _ = solved_night
    solution = read_astrometric_solution(rows[0].output_path)
    for key in ("CTYPE1", "CRVAL1", "CRVAL2", "CD1_1", "A_ORDER", "AP_ORDER"):
        assert key in solution.wcs_header
    assert solution.qc["matched"] == rows[0].qc["matched"]
    assert len(solution.catalogue["x"]) == rows[0].qc["catalogue_stars"]
    calibrated = _calibrated(rows[0].output_path)
    # The calibrated frame is not touched: no WCS in it.
    assert "CTYPE1" not in fits.getheader(calibrated)
    frame = read_calibrated_frame(calibrated, with_error=False)
    assert solution.provenance.raw_file == frame.provenance.raw_file
    assert solution.provenance.raw_file.startswith("object_")
    assert solution.provenance.raw_sha256 == frame.provenance.raw_sha256
    assert solution.provenance.uncalibrated is False
    storage = Path(rows[0].output_path).parents[3]
    assert (storage / solution.provenance.references["CALFRAME"].split(" ", 2)[2]) == calibrated


def _calibrated(solution_path):
    """The calibrated frame of an astrometry output (same storage, same target)."""
    storage = Path(solution_path).parents[3]
    (found,) = (storage / "calibrate").rglob(Path(solution_path).name)
    return found


# -- the real PANOPTES frame ---------------------------------------------------------------

PANOPTES = TEST_DATA / "panoptes"


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network use in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_panoptes_frame_solves_offline_to_gaia(no_network):
    raw = fits.getdata(PANOPTES / "unsolved.fits").astype(float)
    header = fits.getheader(PANOPTES / "unsolved.fits")
    sources = extract_sources(raw, "RGGB", saturated=raw >= header["WHTLVLN"])
    hint = (header["RA-MNT"], header["DEC-MNT"])
    stars = OfflineGaia().cone(*hint, 10.0 + 1.5, epoch=2016.7)
    solution = solve(sources.x, sources.y, stars.ra, stars.dec, raw.shape, hint=hint,
                     pixel_scale=10.3)  # fmt: skip
    assert solution.pointing_offset_deg == pytest.approx(1.94, abs=0.05)
    # Every Gaia star with G < 10 in the field against the nearest extracted centroid.
    ny, nx = raw.shape
    px, py = solution.wcs.sky_to_pixel(stars.ra, stars.dec)
    inside = (px > 2) & (px < nx - 3) & (py > 2) & (py < ny - 3)
    assert inside.sum() >= 125
    distance, _ = cKDTree(np.column_stack([sources.x, sources.y])).query(
        np.column_stack([px[inside], py[inside]]), distance_upper_bound=3.0
    )
    found = np.isfinite(distance)
    assert found.mean() > 0.97
    rms = float(np.sqrt(np.mean(distance[found] ** 2)))
    assert rms <= 0.35, rms
    # Coarse check against astrometry.net's solution of the neighbouring exposure: after
    # the exposures' own shift, within 4 px everywhere in the frame.
    with fits.open(PANOPTES / "solved.fits.fz") as hdus, warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)  # its header lacks MJD-OBS
        other = WCS(next(h.header for h in hdus if h.header.get("CTYPE1")))
    grid_y, grid_x = np.mgrid[0:ny:35, 0:nx:35]
    ra, dec = solution.wcs.pixel_to_sky(grid_x.ravel(), grid_y.ravel())
    ox, oy = other.all_world2pix(ra, dec, 0)
    dx, dy = ox - grid_x.ravel(), oy - grid_y.ravel()
    assert np.hypot(np.median(dx), np.median(dy)) < 3.0
    assert np.max(np.hypot(dx - np.median(dx), dy - np.median(dy))) < 4.0


# -- frames without a pointing: solve-field, or a reason ----------------------------------


def _panoptes_context(tmp_path, **parameters):
    """A StepContext for the PANOPTES crop as a calibrated frame whose raw header lost its
    pointing."""
    import datetime as dt

    from autowisp.steps.base import ImageInfo, InputProduct, StepContext
    from autowisp.vocabulary import ImageType

    raw = fits.getdata(PANOPTES / "unsolved.fits").astype(np.float32)
    header = dict(fits.getheader(PANOPTES / "unsolved.fits"))
    for key in ("RA-MNT", "DEC-MNT", "HA-MNT"):
        header.pop(key)
    calibrated = tmp_path / "calibrated.fits"
    mask = (raw >= header["WHTLVLN"]).astype(np.uint8)  # MaskBit.SATURATED
    _write_calibrated(calibrated, raw - 2048.0, mask)
    image = ImageInfo(
        1, PANOPTES / "unsolved.fits", ImageType.OBJECT, 120.4,
        dt.datetime(2016, 9, 9, 8, 12, 26, tzinfo=dt.UTC), 2457640.8433, "RGGB",
        "012070048413", header,
    )  # fmt: skip
    values = {p.name: p.default for p in Astrometry.parameters} | {"pixel_scale": 10.3}
    return StepContext(
        task_id=1, step="astrometry", target="image:1", config_version="test",
        parameters=values | parameters, storage_root=tmp_path / "storage", image=image,
        inputs={"calibrate": (InputProduct("image:1", 1, calibrated, {}),)},
    )  # fmt: skip


def _write_calibrated(path, image, mask):
    """A calibrated frame product holding ``image`` (e⁻) and ``mask``."""
    from autowisp.io.products import CalibratedFrame, write_calibrated_frame
    from autowisp.io.provenance import Provenance

    provenance = Provenance("calibrate", "1", "test", raw_file="unsolved.fits", uncalibrated=False)
    write_calibrated_frame(
        path,
        CalibratedFrame(
            image=image, mask=mask, gain=1.0, read_noise=5.0, exptime=120.4, layout="RGGB",
            provenance=provenance,
        ),
    )  # fmt: skip


def _with_pointing(context, pointing):
    header = dict(context.image.header) | {"RA-MNT": pointing[0], "DEC-MNT": pointing[1]}
    return replace(context, image=replace(context.image, header=header))


def test_without_pointing_or_solver_the_reason_says_what_to_do(tmp_path):
    from autowisp.errors import PermanentError

    context = _panoptes_context(tmp_path, blind_solver="no-such-solve-field")
    with pytest.raises(PermanentError, match=r"no pointing.*install astrometry\.net"):
        Astrometry().run(context)


def test_without_pointing_solve_field_solves_blind(tmp_path):
    import os
    import shutil

    if shutil.which("solve-field") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must install astrometry.net (see .ci/run)")
        pytest.skip("solve-field is not installed (apt-get install astrometry.net)")
    result = Astrometry().run(_panoptes_context(tmp_path))
    assert result.qc["solver"] == "solve-field"
    assert result.qc["matched"] >= 100 and result.qc["rms_px"] < 0.2
    assert result.qc["pixel_scale"] == pytest.approx(10.3, rel=0.01)
    header = read_astrometric_solution(result.output_path).wcs_header
    assert header["CTYPE1"] == "RA---TAN-SIP"


def test_a_frame_of_empty_sky_fails_with_its_reason(tmp_path):
    from autowisp.errors import PermanentError

    context = _panoptes_context(tmp_path)
    rng = np.random.default_rng(8)
    noise = rng.normal(300.0, 20.0, (700, 700)).astype(np.float32)
    _write_calibrated(tmp_path / "calibrated.fits", noise, np.zeros((700, 700), np.uint8))
    context = _with_pointing(context, (301.56, 44.46))
    with pytest.raises(PermanentError, match=r"too few sources|no match"):
        Astrometry().run(context)
    assert not (tmp_path / "storage").exists() or not list((tmp_path / "storage").rglob("*.fits"))


def test_online_catalogue_gives_the_positions_and_is_cached(tmp_path, monkeypatch):
    """catalogue = 'online': the archive is asked once per field (here a stand-in that
    answers from the offline catalogue with zero proper motions: no network in tests)."""
    from autowisp.io import catalogue as catalogue_module
    from autowisp.io.gaia import cone_search

    asked = []

    def archive(query):
        asked.append(query)
        inside = query.split("CIRCLE('ICRS', ")[1].split(")")[0]
        ra, dec, radius = (float(v) for v in inside.split(","))
        stars = cone_search(ra, dec, radius)
        return {
            "source_id": stars.source_id.tolist(), "ra": stars.ra.tolist(),
            "dec": stars.dec.tolist(), "pmra": [0.0] * len(stars), "pmdec": [None] * len(stars),
            "phot_g_mean_mag": stars.gmag.tolist(), "phot_bp_mean_mag": stars.bp.tolist(),
            "phot_rp_mean_mag": stars.rp.tolist(),
        }  # fmt: skip

    monkeypatch.setattr(catalogue_module, "_astroquery_fetch", archive)
    for attempt in range(2):
        (tmp_path / str(attempt)).mkdir()
        context = _panoptes_context(tmp_path / str(attempt), catalogue="online")
        context = replace(
            _with_pointing(context, (301.56439, 44.456875)), storage_root=tmp_path / "storage"
        )
        result = Astrometry().run(context)
        assert result.qc["catalogue"] == "gaia-dr3-tap"
        assert result.qc["catalogue_stars"] >= 125
    assert len(asked) == 1  # the second frame of the field came from the cache
    assert len(list((tmp_path / "storage" / "catalogue-cache").glob("gaia-*.json"))) == 1


@pytest.mark.parametrize(
    ("offset", "scale_factor", "flip"),
    [((6.0, -7.0), 1.0, False), ((-9.0, 3.0), 1.18, False), ((-6.0, -6.0), 0.85, True)],
)
def test_panoptes_frame_solves_far_from_its_pointing(offset, scale_factor, flip, no_network):
    """Hints 7–9.5° from the field, the scale 15–18 % off, a mirrored copy."""
    raw = fits.getdata(PANOPTES / "unsolved.fits").astype(float)
    header = fits.getheader(PANOPTES / "unsolved.fits")
    if flip:
        raw = np.ascontiguousarray(raw[:, ::-1])
    sources = extract_sources(raw, "RGGB", saturated=raw >= header["WHTLVLN"])
    hint = (header["RA-MNT"] + offset[0], header["DEC-MNT"] + offset[1])
    stars = OfflineGaia().cone(*hint, 10.0 + 1.5, epoch=2016.7)
    solution = solve(sources.x, sources.y, stars.ra, stars.dec, raw.shape, hint=hint,
                     pixel_scale=10.3 * scale_factor)  # fmt: skip
    assert solution.pointing_offset_deg > 7.0
    assert solution.matched >= 110 and solution.rms_px < 0.2
    assert solution.parity == (-1 if flip else 1)
    assert solution.wcs.pixel_scale == pytest.approx(10.306, abs=0.01)


def test_an_unreachable_archive_is_retried_later(tmp_path, monkeypatch):
    from autowisp.errors import TransientError
    from autowisp.io import catalogue as catalogue_module

    def unreachable(query):
        raise OSError("Name or service not known")

    monkeypatch.setattr(catalogue_module, "_astroquery_fetch", unreachable)
    context = _with_pointing(
        _panoptes_context(tmp_path, catalogue="online"), (301.56439, 44.456875)
    )
    with pytest.raises(TransientError, match="could not be reached"):
        Astrometry().run(context)
    assert not list((tmp_path / "storage").rglob("*.fits"))


def test_astrometry_leaves_the_calibrated_frame_byte_for_byte_unchanged(tmp_path):
    """Two configurations solve the same frame: each writes its own product, and the
    calibrated frame's bytes are the same before and after."""
    import hashlib

    def sha256(path):
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()

    context = _with_pointing(_panoptes_context(tmp_path), (301.56439, 44.456875))
    before = sha256(tmp_path / "calibrated.fits")
    first = Astrometry().run(context)
    second = Astrometry().run(replace(context, config_version="other", parameters={
        **context.parameters, "sip_order": 4}))  # fmt: skip
    assert sha256(tmp_path / "calibrated.fits") == before
    assert first.output_path != second.output_path
    one, two = (read_astrometric_solution(r.output_path) for r in (first, second))
    assert one.wcs_header["A_ORDER"] == 3 and two.wcs_header["A_ORDER"] == 4
    assert one.provenance.config_version == "test" and two.provenance.config_version == "other"
    assert one.wcs_header.count("CRVAL1") == 1
