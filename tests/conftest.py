"""Shared pytest fixtures."""

from __future__ import annotations

import pytest
from geoworld import GeoDBs, build_asn_db, build_city_db

from gateway.config import GeoIPConfig

# --------------------------------------------------------------------------- GeoIP


@pytest.fixture(scope="session")
def geo_dbs(tmp_path_factory: pytest.TempPathFactory) -> GeoDBs:
    """The tests/geoworld.py world as GeoLite2-City and GeoLite2-ASN files, built once."""
    directory = tmp_path_factory.mktemp("geoip")
    dbs = GeoDBs(city=directory / "GeoLite2-City.mmdb", asn=directory / "GeoLite2-ASN.mmdb")
    build_city_db(dbs.city)
    build_asn_db(dbs.asn)
    return dbs


@pytest.fixture
def geoip_config(geo_dbs: GeoDBs) -> GeoIPConfig:
    return GeoIPConfig(city_db=geo_dbs.city, asn_db=geo_dbs.asn)
