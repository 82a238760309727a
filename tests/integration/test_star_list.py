"""The star_list step on simulated nights, through the pipeline, against the truth.

The truth knows every star (Gaia's to G = 10 and the synthetic ones to G = 13.5) with its
position on every frame, so the list's completeness, purity and positions are measured,
and the identities across nights and cameras checked against the truth's own ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree
from sqlalchemy import func, select

from autowisp.db.models import Field, FieldStar, Star
from autowisp.db.session import session_scope
from autowisp.db.stars import field_stars
from autowisp.io.night_star_list import read_star_list
from autowisp.simulate.night import NightConfig, simulate_night
from autowisp.simulate.truth import read_truth
from autowisp.steps.astrometry import Astrometry
from autowisp.steps.calibrate import Calibrate
from autowisp.steps.frame_qc import FrameQC
from autowisp.steps.masters import MasterBias, MasterDark, MasterFlat
from autowisp.steps.registry import Registry
from autowisp.steps.star_list import StarList
from autowisp.vocabulary import StarFlag, TaskState
from tests.integration.conftest import process_upload

REGISTRY = Registry([FrameQC, MasterBias, MasterDark, MasterFlat, Calibrate, Astrometry,
                     StarList])  # fmt: skip
WIDTH, HEIGHT, SCALE = 768, 512, 10.3


def _simulate(directory: Path, **overrides) -> Path:
    config = {"frames": 8, "width": WIDTH, "height": HEIGHT, "seed": 11, "cloudy_fraction": 0.1}
    config.update(overrides)
    simulate_night(directory, NightConfig(**config))
    return directory


@pytest.fixture(scope="module")
def one_night(tmp_path_factory):
    home = tmp_path_factory.mktemp("star_list")
    upload = _simulate(home / "upload")
    rows = process_upload(home, home / "upload", REGISTRY)
    truth = read_truth(next(upload.rglob("truth.h5")))
    return home, rows, truth


def _reference_truth(truth, name: str):
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in truth.object["filename"]]
    return names.index(name)


#: The unblended S/N > 20 stars' position errors (px), from the first test.
_POSITION_ERRORS: dict[str, np.ndarray] = {}


@dataclass(frozen=True)
class Against:
    """A night's list against the truth on its reference frame."""

    wanted: int  # unblended true stars with S/N > 20 on the stack, 8 px from the edges
    found: float  # the fraction of them in the list
    unmatched: float  # the fraction of detections within the match radius of no true star
    # (nor at the flux-weighted centre of an unresolved group of them)
    error: np.ndarray  # the found stars' position errors on the sky, px
    detections: int


def against_truth(field, truth, width: int, height: int, scale: float) -> Against:
    k = _reference_truth(truth, field.reference_frame)
    tx, ty = truth.object["x"][k], truth.object["y"][k]
    flux = np.nansum(truth.object["flux"][k], axis=1)
    fwhm = float(np.nanmedian(truth.object["fwhm_major"][k]))
    # The truth's S/N on the stack: the theoretical noise of a 4 px aperture on one frame
    # (every channel's), over the square root of the frames the min/max-rejected mean keeps.
    signal = np.nansum(truth.object["aperture_signal"][k][:, :, 2], axis=1)
    noise = np.sqrt(np.nansum(truth.object["aperture_sigma"][k][:, :, 2] ** 2, axis=1))
    snr = signal / np.maximum(noise, 1e-9) * np.sqrt(max(field.frames - 2, 1))
    # Unblended: no star within 4 FWHM with a tenth of its light; 8 px from the edges.
    tree = cKDTree(np.column_stack([tx, ty]))
    near = tree.query_ball_point(np.column_stack([tx, ty]), 4 * fwhm)
    unblended = np.array(
        [all(flux[j] < 0.1 * flux[i] for j in group if j != i) for i, group in enumerate(near)]
    )
    inside = (tx > 8) & (tx < width - 9) & (ty > 8) & (ty < height - 9)
    wanted = np.flatnonzero(unblended & inside & (snr > 20))
    detected = field.columns["snr"] > 0
    x, y = field.columns["x"][detected], field.columns["y"][detected]
    distance, nearest = tree.query(np.column_stack([x, y]))
    radius = field.match_radius_deg * 3600 / scale
    matched = distance <= radius
    found = np.isin(wanted, nearest[matched])
    # A detection of an unresolved pair (or more: true stars within a FWHM of it) lies at
    # their flux-weighted centre, not on either: it is no spurious entry.
    unresolved = np.zeros(matched.size, bool)
    for i in np.flatnonzero(~matched):
        group = tree.query_ball_point([x[i], y[i]], fwhm)
        if len(group) >= 2:
            weight = flux[group] / flux[group].sum()
            centre = (np.sum(weight * tx[group]), np.sum(weight * ty[group]))
            unresolved[i] = np.hypot(centre[0] - x[i], centre[1] - y[i]) <= radius
    # Positions on the sky against the truth's (in pixels of the reference).
    ra = np.asarray(truth.stars["ra"])
    dec = np.asarray(truth.stars["dec"])
    row_of = {star: row for row, star in zip(np.flatnonzero(matched), nearest[matched],
                                               strict=True)}  # fmt: skip
    rows_found = np.array([row_of[s] for s in wanted[found]], int)
    stars_found = wanted[found]
    cos_dec = np.cos(np.radians(np.median(dec)))
    error = (
        np.hypot(
            (field.columns["ra"][detected][rows_found] - ra[stars_found]) * cos_dec,
            field.columns["dec"][detected][rows_found] - dec[stars_found],
        )
        * 3600
        / scale
    )
    spurious = ~matched & ~unresolved
    result = Against(int(wanted.size), float(found.mean()) if wanted.size else 0.0,
                     float(spurious.mean()) if matched.size else 0.0, error,
                     int(detected.sum()))  # fmt: skip
    print(f"detections {result.detections} ({unresolved.sum()} of unresolved true pairs), "
          "matching no true star: "
          f"{100 * result.unmatched:.2f} %; unblended S/N > 20: {result.wanted}, found "
          f"{100 * result.found:.1f} %; positions: median {np.median(error):.4f} px, 90 % "
          f"within {np.percentile(error, 90):.3f} px, 95 % {np.percentile(error, 95):.3f} "
          f"px, max {error.max():.3f} px")  # fmt: skip
    return result


def test_the_night_list_finds_the_stars_the_stack_can_see(one_night):
    _, rows, truth = one_night
    (task,) = [r for r in rows if r.name == "star_list"]
    assert task.state == TaskState.DONE, task.last_error
    (field,) = read_star_list(Path(task.output_path)).fields
    assert field.frames == 8 and task.qc["fields"][str(field.field_id)]["frames_stacked"] == 8
    result = against_truth(field, truth, WIDTH, HEIGHT, SCALE)
    assert result.wanted > 300
    assert result.unmatched <= 0.01  # purity: at most 1 % of the detections are no star
    assert result.found >= 0.95  # completeness: 95 % of the unblended stars, S/N > 20
    _POSITION_ERRORS["one_night"] = result.error
    assert np.median(result.error) < 0.05
    assert np.percentile(result.error, 90) < 0.1
    k = _reference_truth(truth, field.reference_frame)
    tx, ty = truth.object["x"][k], truth.object["y"][k]
    detected = field.columns["snr"] > 0
    x, y = field.columns["x"][detected], field.columns["y"][detected]
    # The list reaches beyond the offline catalogue (G = 10), and its Gaia ids are right.
    gaia = field.columns["gaia_source_id"][detected]
    assert (gaia >= 0).sum() > 30 and (gaia < 0).mean() > 0.9
    truth_id = np.asarray(truth.stars["star_id"])
    index_of = {int(star): i for i, star in enumerate(truth_id)}
    assert all(int(g) in index_of for g in gaia[gaia >= 0])
    star = np.array([index_of[int(g)] for g in gaia[gaia >= 0]])
    offset = np.hypot(x[gaia >= 0] - tx[star], y[gaia >= 0] - ty[star])
    assert np.median(offset) < 0.05  # the catalogue star it names is the one there


@pytest.mark.xfail(
    strict=True,
    reason=(
        "every unblended S/N > 20 star within 0.1 px of the truth: 95 % are (0.086 px), "
        "the worst is 0.50 px (seed 11, 768x512, 8 frames)"
    ),
)
def test_every_unblended_position_within_a_tenth_of_a_pixel(one_night):
    error = _POSITION_ERRORS["one_night"]
    print(f"within 0.1 px: {100 * (error < 0.1).mean():.1f} %, max {error.max():.3f} px")
    assert error.max() < 0.1


def test_the_database_holds_the_list_with_one_id_per_star(one_night):
    home, rows, _ = one_night
    (task,) = [r for r in rows if r.name == "star_list"]
    (field,) = read_star_list(Path(task.output_path)).fields
    with session_scope(f"sqlite:///{home / 'db.sqlite'}") as session:
        stars = field_stars(session, field.field_id)
        assert session.scalar(select(func.count()).select_from(Star)) == len(field)
        name = session.scalar(select(Field.name).where(Field.id == field.field_id))
        indices = session.scalars(
            select(FieldStar.star_index).where(FieldStar.field_id == field.field_id)
        ).all()
    assert len(stars.star_id) == len(field) == task.qc["new_stars"]
    assert sorted(indices) == list(range(len(field)))  # append-only 0, 1, 2...
    assert np.unique(stars.star_id).size == len(field)
    assert name == field.field_name
    catalogue_only = (stars.flags & int(StarFlag.CATALOGUE_ONLY)) != 0
    assert catalogue_only.sum() == task.qc["fields"][str(field.field_id)]["catalogue_only"]
    assert set(stars.gaia_source_id[stars.gaia_source_id >= 0]) == set(
        field.columns["gaia_source_id"][field.columns["gaia_source_id"] >= 0]
    )
    # Instrumental magnitudes per channel came along for the detections.
    assert set(stars.instrumental) == {"R", "G1", "G2", "B"}
    assert np.isfinite(stars.instrumental["G1"][~catalogue_only]).mean() > 0.95


def _process(url: str, home: Path, uploads: list[Path]) -> None:
    from autowisp.db.migrate import upgrade
    from autowisp.ingest.ingest import ingest_paths
    from autowisp.pipeline.local import run_local

    upgrade(url)
    ingest_paths(url, uploads, close=True)
    run_local(url, home / "storage", REGISTRY, jobs=2)


def _star_list_tasks(url: str) -> list:
    from autowisp.db.models import Configuration, Task
    from autowisp.db.models import Step as StepRow

    with session_scope(url) as session:
        return session.execute(
            select(Task.night_id, Task.state, Task.output_path, Task.qc, Task.last_error)
            .join(StepRow, StepRow.id == Task.step_id)
            .join(Configuration, Configuration.id == Task.configuration_id)
            .where(StepRow.name == "star_list", Configuration.active.is_(True))
            .order_by(Task.night_id)
        ).all()


def _duplicates(url: str, radius_px: float = 0.5) -> tuple[int, int]:
    """(stars, pairs of the star table closer than ``radius_px``, a quarter of the
    seeing, that are not two Gaia stars): one star registered twice would be such a
    pair (its two entries measured at the same place); no Gaia id is there twice."""
    with session_scope(url) as session:
        ra, dec, gaia = (np.array(c) for c in zip(*session.execute(
            select(Star.ra, Star.dec, Star.gaia_source_id)).all(), strict=True))  # fmt: skip
    known = np.array([g for g in gaia if g is not None])
    assert np.unique(known).size == known.size
    cos_dec = np.cos(np.radians(np.median(dec)))
    pairs = cKDTree(np.column_stack([ra * cos_dec, dec])).query_pairs(radius_px * SCALE / 3600)
    close = [(i, j) for i, j in pairs if gaia[i] is None or gaia[j] is None]
    return ra.size, len(close)


def test_a_second_night_of_the_field_keeps_the_ids_and_adds_only_fainter_stars(tmp_path):
    first = _simulate(tmp_path / "first")
    # The same sky, camera and pointing a night later, with twice the frames: deeper.
    second = _simulate(tmp_path / "second", date="2024-09-11", frames=16)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    # The second night arrives once the first is processed: ingested together, either
    # night's list may register first (two jobs), and the deeper one then has most stars.
    _process(url, tmp_path, [first])
    _process(url, tmp_path, [second])
    tasks = _star_list_tasks(url)
    assert [t.state for t in tasks] == [TaskState.DONE] * 2, [t.last_error for t in tasks]
    night_a, night_b = tasks
    (list_a,) = read_star_list(Path(night_a.output_path)).fields
    (list_b,) = read_star_list(Path(night_b.output_path)).fields
    assert list_a.field_id == list_b.field_id  # one field: the same pointing
    radius = list_a.match_radius_deg
    with session_scope(url) as session:
        stars = field_stars(session, list_a.field_id)
    assert stars.star_id.size == night_a.qc["new_stars"] + night_b.qc["new_stars"]
    assert 0 < night_b.qc["new_stars"] < 0.6 * night_a.qc["new_stars"]
    # Each candidate of either night is one star of the field: the nearest within the
    # match radius, and the stars both nights saw have one id.
    cos_dec = np.cos(np.radians(np.median(stars.dec)))
    tree = cKDTree(np.column_stack([stars.ra * cos_dec, stars.dec]))

    def ids(candidates):
        d, i = tree.query(np.column_stack([candidates.columns["ra"] * cos_dec,
                                           candidates.columns["dec"]]))  # fmt: skip
        assert (d <= radius * 1.0001).mean() > 0.995
        return stars.star_id[i], d <= radius

    ids_a, ok_a = ids(list_a)
    ids_b, ok_b = ids(list_b)
    both = np.intersect1d(ids_a[ok_a], ids_b[ok_b])
    assert both.size > 0.9 * len(list_a)
    # The second night's new stars are stars the first could not see: the true star at
    # each is not in the first night's list (the simulated sky ends at G = 13.5, which
    # both nights reach, so what the deeper night adds are mostly close companions it
    # resolves).
    new_b = stars.first_night_id == night_b.night_id
    assert new_b.sum() == night_b.qc["new_stars"]
    truth = read_truth(next(first.rglob("truth.h5")))
    true_sky = np.column_stack([np.asarray(truth.stars["ra"]) * cos_dec,
                                np.asarray(truth.stars["dec"])])  # fmt: skip
    true_tree = cKDTree(true_sky)
    d_new, star_new = true_tree.query(np.column_stack([stars.ra[new_b] * cos_dec,
                                                       stars.dec[new_b]]))  # fmt: skip
    real = d_new <= radius
    in_a = cKDTree(np.column_stack([list_a.columns["ra"] * cos_dec, list_a.columns["dec"]]))
    seen_by_a = np.array([len(in_a.query_ball_point(true_sky[k], radius)) > 0
                          for k in star_new[real]], bool)  # fmt: skip
    print(f"first night {night_a.qc['new_stars']} stars, the second adds {new_b.sum()}: "
          f"{real.sum()} true stars, of which the first listed {seen_by_a.sum()} within "
          f"{radius * 3600 / SCALE:.1f} px")  # fmt: skip
    assert real.mean() >= 0.9
    assert seen_by_a.mean() <= 0.1
    total, close = _duplicates(url)
    assert total == stars.star_id.size and close == 0


def test_two_cameras_overlapping_share_stars_when_registered_concurrently(tmp_path, pg_url):
    upload = _simulate(tmp_path / "upload", cameras=2, frames=6, seed=5)
    _process(pg_url, tmp_path, [upload])  # two worker processes, one star_list per camera
    tasks = _star_list_tasks(pg_url)
    assert [t.state for t in tasks] == [TaskState.DONE] * 2, [t.last_error for t in tasks]
    lists = [read_star_list(Path(t.output_path)).fields[0] for t in tasks]
    assert lists[0].field_id != lists[1].field_id  # one field per camera
    with session_scope(pg_url) as session:
        a = field_stars(session, lists[0].field_id)
        b = field_stars(session, lists[1].field_id)
    shared = np.intersect1d(a.star_id, b.star_id)
    print(f"fields of {a.star_id.size} and {b.star_id.size} stars share {shared.size}")
    assert shared.size > 0.3 * min(a.star_id.size, b.star_id.size)
    # Each field numbers its stars on its own: 0, 1, 2...
    assert sorted(a.star_index) == list(range(a.star_id.size))
    assert sorted(b.star_index) == list(range(b.star_id.size))
    total, close = _duplicates(pg_url)
    assert close == 0
    assert total == np.union1d(a.star_id, b.star_id).size


@pytest.mark.parametrize(
    "camera",
    [
        # a mono camera at twice the pixel scale on a sparse field (stars to G 12)
        pytest.param({"layout": "MONO", "width": 384, "height": 320, "pixel_scale": 20.6,
                      "faint_limit": 12.0, "seeing": 1.6, "seed": 21}, id="mono-sparse"),
        # another Bayer layout, wider seeing
        pytest.param({"layout": "BGGR", "width": 640, "height": 448, "pixel_scale": 10.3,
                      "seeing": 2.8, "seed": 22}, id="bggr-wide-seeing"),
        # a small frame at a fine scale: 8 catalogue stars (G <= 10) on it
        pytest.param(
            {"layout": "GRBG", "width": 448, "height": 320, "pixel_scale": 6.0, "seeing": 3.0,
             "seed": 22},
            id="grbg-small-fine",
            marks=pytest.mark.xfail(strict=True, reason=(
                "the frames' solutions rest on 7 catalogue stars, so they are linear: the "
                "list's sky positions are off by 1.1 px (median; 2.2 px at 90 %) and 1.6 % "
                "of its entries match no true star; the online catalogue (G 13) would "
                "give the solutions stars enough"
            )),
        ),
    ],
)  # fmt: skip
def test_unlike_cameras_get_their_star_list_and_its_photometry(tmp_path, camera):
    """Cameras unlike the default: the list reaches the same purity and completeness,
    and the photometry measures its stars beyond the catalogue."""
    from autowisp.core.photometry import SPOILING
    from autowisp.io.photometry import read_frame_photometry
    from autowisp.steps.photometry import Photometry

    registry = Registry([*REGISTRY, Photometry])
    upload = _simulate(tmp_path / "upload", frames=6, cloudy_fraction=0.0, **camera)
    # A mono sensor is not told from a Bayer one by its headers yet (the any-camera
    # issue): its operator says so in the ingest rules.
    rules = {"default_layout": "MONO"} if camera["layout"] == "MONO" else None
    rows = process_upload(tmp_path, upload, registry, rules=rules)
    truth = read_truth(next(upload.rglob("truth.h5")))
    (task,) = [r for r in rows if r.name == "star_list"]
    assert task.state == TaskState.DONE, task.last_error
    (field,) = read_star_list(Path(task.output_path)).fields
    result = against_truth(field, truth, camera["width"], camera["height"],
                           camera["pixel_scale"])  # fmt: skip
    assert result.wanted >= 20
    assert result.unmatched <= 0.01 and result.found >= 0.95
    assert np.median(result.error) < 0.05 and np.percentile(result.error, 90) < 0.1
    photometry = [r for r in rows if r.name == "photometry"]
    assert [r.state for r in photometry] == [TaskState.DONE] * 6, [
        r.last_error for r in photometry
    ]
    # The magnitudes photometry gives the stars beyond the catalogue (the stack's
    # instrumental ones moved to G by the catalogue stars'): they order the PSF map's
    # shape stars and are its magnitude term, so they must follow the truth's G.
    from astropy.io import fits

    from autowisp.io.solution import read_astrometric_solution
    from autowisp.steps.photometry import frame_stars

    solved = next(r for r in rows if r.name == "astrometry" and r.output_path)
    solution = read_astrometric_solution(Path(solved.output_path))
    stars = frame_stars(solution, (camera["height"], camera["width"]), Path(task.output_path),
                        field.field_id)  # fmt: skip
    k = _reference_truth(truth, str(fits.getheader(solved.output_path)["RAWFILE"]))
    tx, ty = truth.object["x"][k], truth.object["y"][k]
    distance, nearest = cKDTree(np.column_stack([tx, ty])).query(
        np.column_stack([stars.x, stars.y])
    )
    deep = (stars.source_id < 0) & (distance < 0.5)
    offset = stars.mag[deep] - np.asarray(truth.stars["gmag"])[nearest[deep]]
    print(f"{camera['layout']}: estimated G of {deep.sum()} stars beyond the catalogue minus "
          f"the truth's: median {np.median(offset):+.2f}, 10-90 % "
          f"{np.percentile(offset, 10):+.2f} .. {np.percentile(offset, 90):+.2f}")  # fmt: skip
    assert deep.sum() > 50
    assert abs(np.median(offset)) < 0.3
    # The spread is the one band's colour term and blends' joined light (measured: 90 %
    # within 0.82 mag on the mono night, 0.52 on the BGGR one): it only orders the stars.
    assert np.percentile(np.abs(offset), 90) < 1.0
    # Light-curve ready: finite fluxes and errors in every channel and aperture, no flag
    # that spoils them (crowded stars are measured too). Stars beyond the catalogue must
    # be as ready as the catalogue's (their own flags: saturation, edges, masked pixels).
    counts = np.zeros((2, 2), int)  # (catalogue, beyond) x (measured, ready)
    for row in photometry:
        assert row.qc["star_list"] and row.qc["stars_from_list"] > 0
        product = read_frame_photometry(Path(row.output_path))
        deep = np.asarray(product.source_id) < 0
        ready = np.ones(deep.size, bool)
        for channel in product.channels.values():
            ready &= (channel.flags & SPOILING) == 0
            ready &= np.all(np.isfinite(channel.flux), axis=1)
            ready &= np.all(channel.flux_err > 0, axis=1)
        for kind, which in enumerate((~deep, deep)):
            counts[kind] += (int(which.sum()), int((which & ready).sum()))
    fraction = counts[:, 1] / np.maximum(counts[:, 0], 1)
    print(f"{camera['layout']}: light-curve ready: {counts[1, 1]} of {counts[1, 0]} "
          f"measurements of stars beyond the catalogue ({100 * fraction[1]:.1f} %), "
          f"{100 * fraction[0]:.1f} % of the catalogue's")  # fmt: skip
    assert counts[1, 0] > 2 * counts[0, 0]  # most stars on the frames are beyond it
    assert fraction[1] >= fraction[0] - 0.05
