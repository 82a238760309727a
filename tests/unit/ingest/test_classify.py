import datetime as dt
from pathlib import Path

import pytest

from autowisp.errors import IngestError
from autowisp.ingest.classify import classify, night_date
from autowisp.vocabulary import ImageType

BASE = {"DATE-OBS": "2024-09-11T07:00:00", "EXPTIME": 120.0, "CAMSN": "42"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Light Frame", ImageType.OBJECT),
        ("BIAS", ImageType.BIAS),
        ("zero", ImageType.BIAS),
        ("Dark Frame", ImageType.DARK),
        ("Flat Field", ImageType.FLAT),
        ("skyflat", ImageType.FLAT),
    ],
)
def test_type_synonyms(value, expected):
    assert classify(BASE | {"IMAGETYP": value}, Path("x.fits"), {}).image_type is expected


def test_night_is_the_local_evening_date():
    # Hawaii (UTC-10:22 in mean solar time): 07:00 UTC is 20:38 the evening before.
    assert night_date(dt.datetime(2024, 9, 11, 7, tzinfo=dt.UTC), -155.58) == dt.date(2024, 9, 10)
    # 16:00 UTC is 05:38 local, still the night of the 10th.
    assert night_date(dt.datetime(2024, 9, 11, 16, tzinfo=dt.UTC), -155.58) == dt.date(2024, 9, 10)
    # Greenwich, 23:00 and 02:00 belong to the same night.
    assert night_date(dt.datetime(2024, 9, 10, 23, tzinfo=dt.UTC), 0.0) == night_date(
        dt.datetime(2024, 9, 11, 2, tzinfo=dt.UTC), 0.0
    )


def test_facts_from_header():
    facts = classify(
        BASE
        | {
            "IMAGETYP": "object",
            "INSTRUME": "Canon EOS 100D",
            "BAYERPAT": "gbrg",
            "LONG-OBS": -155.58,
            "LAT-OBS": 19.54,
        },
        Path("x.fits"),
        {},
    )
    assert facts.layout == "GBRG" and facts.make == "Canon" and facts.serial == "42"
    assert facts.night == dt.date(2024, 9, 10)
    assert facts.jd_mid == pytest.approx(2460564.7916667 + 60 / 86400, abs=1e-6)


def test_reasons():
    with pytest.raises(IngestError, match="DATE-OBS 'yesterday'"):
        classify(BASE | {"IMAGETYP": "object", "DATE-OBS": "yesterday"}, Path("x"), {})
    with pytest.raises(IngestError, match="negative"):
        classify(BASE | {"IMAGETYP": "object", "EXPTIME": -1}, Path("x"), {})
