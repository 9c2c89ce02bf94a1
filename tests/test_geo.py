from __future__ import annotations

import ipaddress
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import maxminddb
import pytest
from geoworld import (
    BEIJING_IP,
    BEIJING_IPV6,
    SAMPLE_IPS,
    UNLISTED_IP,
    US_COUNTRY_ONLY_IP,
    WORLD,
    GeoDBs,
    WorldRecord,
    build_asn_db,
    build_city_db,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import gateway.geo.locator
from gateway.config import GeoIPConfig
from gateway.geo.countries import CONTINENTS, country_table
from gateway.geo.locator import (
    UNKNOWN_LOCATION,
    DatabaseInfo,
    GeoDataError,
    GeoLocator,
    Location,
    MaxMindLocator,
    country_location,
    stale_database_warnings,
)

ip = ipaddress.ip_address
MakeLocator = Callable[[GeoIPConfig], MaxMindLocator]


@pytest.fixture
def make_locator() -> Iterator[MakeLocator]:
    """Build locators that are closed when the test ends."""
    made: list[MaxMindLocator] = []

    def make(config: GeoIPConfig) -> MaxMindLocator:
        locator = MaxMindLocator(config)
        made.append(locator)
        return locator

    yield make
    for locator in made:
        locator.close()


@pytest.fixture
def locator(make_locator: MakeLocator, geoip_config: GeoIPConfig) -> MaxMindLocator:
    return make_locator(geoip_config)


@pytest.fixture(scope="module")
def shared_locator(geo_dbs: GeoDBs) -> Iterator[MaxMindLocator]:
    """One locator for property tests (hypothesis dislikes function-scoped fixtures)."""
    with MaxMindLocator(GeoIPConfig(city_db=geo_dbs.city, asn_db=geo_dbs.asn)) as located:
        yield located


def expected(record: WorldRecord) -> Location:
    return Location(
        record.country,
        record.continent,
        record.latitude,
        record.longitude,
        record.asn,
        record.asn_org,
    )


def _addresses(record: WorldRecord) -> list[tuple[str, str]]:
    """(id, address) pairs in the record's network: two in its /24 or /48, plus mapped forms."""
    network = ipaddress.ip_network(record.network)
    first, last = network.network_address, network.broadcast_address
    cases = [("first", str(first + 4)), ("other", str(last - 1))]
    if network.version == 4:
        cases.append(("mapped", f"::ffff:{first + 4}"))
    return cases


WORLD_CASES = [
    pytest.param(address, expected(record), id=f"{record.network}-{kind}")
    for record in WORLD
    for kind, address in _addresses(record)
]


# --------------------------------------------------------------------------- the world


def test_location_defaults() -> None:
    assert not UNKNOWN_LOCATION.known
    assert Location() == UNKNOWN_LOCATION
    assert Location(country="CN").known
    assert not Location(asn=4134).known


def test_sample_ips_are_where_the_world_says() -> None:
    networks = [ipaddress.ip_network(record.network) for record in WORLD]
    listed = {name for name, addr in SAMPLE_IPS.items() if any(ip(addr) in n for n in networks)}
    assert listed == set(SAMPLE_IPS) - {"unlisted", "unlisted_v6", "private"}


@pytest.mark.parametrize(("address", "location"), WORLD_CASES)
def test_world(locator: MaxMindLocator, address: str, location: Location) -> None:
    assert locator.locate(ip(address)) == location


def test_country_level_record(locator: MaxMindLocator) -> None:
    location = locator.locate(ip(US_COUNTRY_ONLY_IP))
    assert location == Location("US", "NA", 37.751, -97.822)
    assert location.known
    assert location.asn is None


@pytest.mark.parametrize(
    "address",
    [
        "10.1.2.3",
        "172.16.5.4",
        "192.168.1.1",
        "100.64.1.1",
        "127.0.0.1",
        "169.254.1.1",
        "192.0.0.9",
        "198.18.0.1",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "0.0.0.0",
        "::",
        "::1",
        "fe80::1",
        "fd00::1",
        "fec0::1",
        "ff02::1",
        "64:ff9b::1.2.3.4",
        "::ffff:10.0.0.1",
        "::ffff:127.0.0.1",
        UNLISTED_IP,
        "2001:db8:3::1",
        "2a00:1450::1",
    ],
)
def test_unknown(locator: MaxMindLocator, address: str) -> None:
    assert locator.locate(ip(address)) is UNKNOWN_LOCATION


def test_special_addresses_are_not_looked_up(tmp_path: Path, make_locator: MakeLocator) -> None:
    special = [
        WorldRecord("10.0.0.0/8", "CN", "AS", "Beijing", 39.9, 116.4, 4134, "CHINANET"),
        WorldRecord("127.0.0.0/8", "CN", "AS", "Beijing", 39.9, 116.4, 4134, "CHINANET"),
        WorldRecord("fd00::/8", "CN", "AS", "Beijing", 39.9, 116.4, 4134, "CHINANET"),
    ]
    city, asn = tmp_path / "city.mmdb", tmp_path / "asn.mmdb"
    build_city_db(city, special)
    build_asn_db(asn, special)
    with maxminddb.open_database(city) as reader:
        assert reader.get("10.1.2.3") is not None  # the database would answer
    locator = make_locator(GeoIPConfig(city_db=city, asn_db=asn))
    for address in ("10.1.2.3", "127.0.0.1", "fd00::1", "::ffff:10.1.2.3"):
        assert locator.locate(ip(address)) is UNKNOWN_LOCATION


def test_asn_without_city(tmp_path: Path, geo_dbs: GeoDBs, make_locator: MakeLocator) -> None:
    asn = tmp_path / "asn.mmdb"
    build_asn_db(asn, [WorldRecord("9.9.9.0/24", "CH", "EU", None, 0, 0, 19281, "Quad9")])
    locator = make_locator(GeoIPConfig(city_db=geo_dbs.city, asn_db=asn))
    location = locator.locate(ip(UNLISTED_IP))
    assert location == Location(asn=19281, asn_org="Quad9")
    assert not location.known


def test_prefix_answer_comes_from_its_first_address(
    tmp_path: Path, make_locator: MakeLocator
) -> None:
    # Two countries inside one /24: the /24's answer is the first address's, whichever comes first.
    split = [
        WorldRecord("1.2.3.0/25", "CN", "AS", "Beijing", 39.9042, 116.4074, None, None),
        WorldRecord("1.2.3.128/25", "JP", "AS", "Tokyo", 35.6762, 139.6503, None, None),
    ]
    city = tmp_path / "split.mmdb"
    build_city_db(city, split)
    for order in (["1.2.3.200", "1.2.3.5"], ["1.2.3.5", "1.2.3.200"]):
        locator = make_locator(GeoIPConfig(city_db=city))
        assert {locator.locate(ip(a)).country for a in order} == {"CN"}


def test_implements_protocol(locator: MaxMindLocator) -> None:
    geo: GeoLocator = locator
    assert geo.locate(ip(BEIJING_IP)).country == "CN"


def test_databases(locator: MaxMindLocator, geo_dbs: GeoDBs) -> None:
    city, asn = locator.databases
    assert (city.role, city.path, city.database_type, city.bundled) == (
        "city",
        str(geo_dbs.city),
        "GeoLite2-City",
        False,
    )
    assert (asn.role, asn.path, asn.database_type) == ("asn", str(geo_dbs.asn), "GeoLite2-ASN")
    assert city.build_time.tzinfo is UTC
    assert abs(datetime.now(UTC) - city.build_time) < timedelta(days=1)
    assert locator.warnings == ()


def test_reads_with_the_memory_mapped_c_extension(locator: MaxMindLocator) -> None:
    assert type(locator._city_reader._db_reader).__module__ == "maxminddb.extension"


def test_falls_back_when_the_c_extension_is_missing(
    monkeypatch: pytest.MonkeyPatch, geoip_config: GeoIPConfig, make_locator: MakeLocator
) -> None:
    monkeypatch.delattr(maxminddb, "extension", raising=False)
    monkeypatch.setitem(sys.modules, "maxminddb.extension", None)
    assert gateway.geo.locator._open_mode() == maxminddb.MODE_AUTO
    assert make_locator(geoip_config).locate(ip(BEIJING_IP)).country == "CN"


@settings(max_examples=300, deadline=None)
@given(address=st.ip_addresses())
def test_locate_never_raises(
    shared_locator: MaxMindLocator, address: ipaddress.IPv4Address | ipaddress.IPv6Address
) -> None:
    location = shared_locator.locate(address)
    assert location.known == (location.country is not None)
    assert location.continent is None or location.continent in CONTINENTS


def test_locate_after_close_does_not_raise(geoip_config: GeoIPConfig) -> None:
    locator = MaxMindLocator(geoip_config)
    locator.close()
    assert locator.locate(ip(BEIJING_IP)) is UNKNOWN_LOCATION


# --------------------------------------------------------------------------- database problems


def test_missing_asn_db_is_not_fatal(
    geo_dbs: GeoDBs, tmp_path: Path, make_locator: MakeLocator
) -> None:
    missing = tmp_path / "nope" / "GeoLite2-ASN.mmdb"
    locator = make_locator(GeoIPConfig(city_db=geo_dbs.city, asn_db=missing))
    assert locator.locate(ip(BEIJING_IP)) == Location("CN", "AS", 39.9042, 116.4074)
    (warning,) = locator.warnings
    assert "geoip.asn_db" in warning
    assert str(missing) in warning
    assert "file not found" in warning
    assert [db.role for db in locator.databases] == ["city"]


def test_asn_db_that_is_a_city_db_is_not_fatal(geo_dbs: GeoDBs, make_locator: MakeLocator) -> None:
    locator = make_locator(GeoIPConfig(city_db=geo_dbs.city, asn_db=geo_dbs.city))
    assert locator.locate(ip(BEIJING_IP)).asn is None
    (warning,) = locator.warnings
    assert "geoip.asn_db" in warning
    assert "GeoLite2-City" in warning
    assert "not an ASN database" in warning


def test_asn_db_that_is_not_an_mmdb_is_not_fatal(
    geo_dbs: GeoDBs, tmp_path: Path, make_locator: MakeLocator
) -> None:
    junk = tmp_path / "junk.mmdb"
    junk.write_bytes(b"not a database\n" * 100)
    locator = make_locator(GeoIPConfig(city_db=geo_dbs.city, asn_db=junk))
    assert locator.locate(ip(BEIJING_IP)).country == "CN"
    (warning,) = locator.warnings
    assert "not a valid MaxMind DB" in warning


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("missing", "file not found"),
        ("junk", "not a valid MaxMind DB"),
        ("empty", "not a valid MaxMind DB"),
        ("directory", "not a valid MaxMind DB"),
        ("asn", "'GeoLite2-ASN' database, but a City or Country database is needed"),
    ],
)
def test_unusable_city_db_is_fatal(geo_dbs: GeoDBs, tmp_path: Path, kind: str, reason: str) -> None:
    path = {
        "missing": tmp_path / "GeoLite2-City.mmdb",
        "junk": tmp_path / "junk.mmdb",
        "empty": tmp_path / "empty.mmdb",
        "directory": tmp_path,
        "asn": geo_dbs.asn,
    }[kind]
    (tmp_path / "junk.mmdb").write_bytes(b"\x00garbage" * 1000)
    (tmp_path / "empty.mmdb").write_bytes(b"")
    with pytest.raises(GeoDataError) as error:
        MaxMindLocator(GeoIPConfig(city_db=path, asn_db=geo_dbs.asn))
    message = str(error.value)
    assert message.startswith("geoip.city_db: ")
    assert str(path) in message
    assert reason in message
    assert "set geoip.city_db to" in message
    assert "update_geoip.sh" in message


@pytest.mark.parametrize(
    "database_type", ["GeoLite2-Country", "GeoIP2-Country", "DBIP-Country-Lite"]
)
def test_country_database(tmp_path: Path, make_locator: MakeLocator, database_type: str) -> None:
    path = tmp_path / "country.mmdb"
    build_city_db(path, database_type=database_type)
    locator = make_locator(GeoIPConfig(city_db=path))
    assert locator.databases[0].database_type == database_type
    # No coordinates in a Country database: the country table's centre stands in.
    assert locator.locate(ip(BEIJING_IP)) == country_location("CN")
    assert locator.locate(ip(BEIJING_IPV6)) == country_location("CN")
    assert locator.locate(ip(UNLISTED_IP)) is UNKNOWN_LOCATION


@pytest.mark.parametrize(
    ("city_type", "asn_type"),
    [("GeoIP2-City", "GeoLite2-ASN"), ("DBIP-City-Lite", "DBIP-ASN-Lite (compat=GeoLite2-ASN)")],
)
def test_other_vendors_database_types(
    tmp_path: Path, make_locator: MakeLocator, city_type: str, asn_type: str
) -> None:
    city, asn = tmp_path / "city.mmdb", tmp_path / "asn.mmdb"
    build_city_db(city, database_type=city_type)
    build_asn_db(asn, database_type=asn_type)
    locator = make_locator(GeoIPConfig(city_db=city, asn_db=asn))
    assert locator.warnings == ()
    assert locator.locate(ip(BEIJING_IP)) == expected(WORLD[0])


def test_stale_world_is_reported(tmp_path: Path, make_locator: MakeLocator) -> None:
    city, asn = tmp_path / "city.mmdb", tmp_path / "asn.mmdb"
    old = int((datetime.now(UTC) - timedelta(days=400)).timestamp())
    build_city_db(city, build_epoch=old)
    build_asn_db(asn)
    locator = make_locator(GeoIPConfig(city_db=city, asn_db=asn, stale_after_days=30))
    (warning,) = locator.warnings
    assert str(city) in warning
    assert "400 days ago" in warning
    assert locator.locate(ip(BEIJING_IP)).country == "CN"  # stale still works


# --------------------------------------------------------------------------- the prefix cache


def test_cache_hits_within_a_prefix(locator: MaxMindLocator) -> None:
    assert locator.cache_info() == (0, 0, 0)
    for address in ("1.2.3.4", "1.2.3.200", "::ffff:1.2.3.9", "1.2.3.4"):
        assert locator.locate(ip(address)).asn == 4134
    assert locator.cache_info() == (3, 1, 1)
    locator.locate(ip("2001:db8:1::1"))
    locator.locate(ip("2001:db8:1:ffff::99"))
    assert locator.cache_info() == (4, 2, 2)
    locator.locate(ip("1.2.4.4"))
    assert locator.cache_info() == (4, 3, 3)


def test_cache_is_a_bounded_lru(geo_dbs: GeoDBs, make_locator: MakeLocator) -> None:
    locator = make_locator(GeoIPConfig(city_db=geo_dbs.city, asn_db=geo_dbs.asn, cache_size=2))
    a, b, c = ip("1.2.3.4"), ip("1.2.4.4"), ip("1.2.5.5")
    locator.locate(a)
    locator.locate(b)
    locator.locate(a)  # a is now the most recently used
    locator.locate(c)  # evicts b
    assert locator.cache_info() == (1, 3, 2)
    locator.locate(a)
    assert locator.cache_info() == (2, 3, 2)
    assert locator.locate(b).asn == 4837
    assert locator.cache_info() == (2, 4, 2)


def test_cache_size_zero_disables_the_cache(geo_dbs: GeoDBs, make_locator: MakeLocator) -> None:
    locator = make_locator(GeoIPConfig(city_db=geo_dbs.city, cache_size=0))
    for _ in range(3):
        assert locator.locate(ip(BEIJING_IP)).country == "CN"
    assert locator.cache_info() == (0, 3, 0)


def test_close_empties_the_cache(geoip_config: GeoIPConfig) -> None:
    locator = MaxMindLocator(geoip_config)
    locator.locate(ip(BEIJING_IP))
    locator.close()
    assert locator.cache_info()[2] == 0


# --------------------------------------------------------------------------- staleness


NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def _db(
    days_old: float,
    *,
    role: Literal["city", "asn"] = "city",
    bundled: bool = False,
    path: str = "/geo/City.mmdb",
) -> DatabaseInfo:
    database_type = "GeoLite2-City" if role == "city" else "GeoLite2-ASN"
    return DatabaseInfo(role, path, database_type, NOW - timedelta(days=days_old), bundled)


@pytest.mark.parametrize(
    ("databases", "stale_after_days", "fragments"),
    [
        pytest.param([], 45, [], id="none"),
        pytest.param([_db(10)], 45, [], id="fresh"),
        pytest.param([_db(45)], 45, [], id="exactly-at-limit"),
        pytest.param(
            [_db(100)],
            45,
            [
                [
                    "/geo/City.mmdb",
                    "2025-02-21",
                    "100 days ago",
                    "geoip.city_db",
                    "GeoLite2 or DB-IP Lite City mmdb",
                    "geodata/update_geoip.sh",
                    "stale_after_days=45",
                ]
            ],
            id="stale-city",
        ),
        pytest.param(
            [_db(10), _db(50, role="asn", path="/geo/ASN.mmdb")],
            45,
            [["/geo/ASN.mmdb", "50 days ago", "geoip.asn_db", "DB-IP Lite ASN mmdb"]],
            id="fresh-city-stale-asn",
        ),
        pytest.param([_db(100), _db(100, role="asn")], 365, [], id="long-limit"),
        pytest.param(
            [_db(100), _db(100, role="asn", path="/geo/ASN.mmdb")],
            45,
            [["/geo/City.mmdb", "geoip.city_db"], ["/geo/ASN.mmdb", "geoip.asn_db"]],
            id="both-stale",
        ),
        pytest.param(
            [_db(2525, bundled=True, path="/site/GeoLite2-City.mmdb")],
            45,
            [
                [
                    "bundled",
                    "July 2018 GeoLite2 build shipped by maxminddb-geolite2",
                    "2018-07-03",
                    "2525 days ago",
                    "geoip.city_db",
                    "geodata/update_geoip.sh",
                ]
            ],
            id="bundled",
        ),
    ],
)
def test_stale_database_warnings(
    databases: list[DatabaseInfo], stale_after_days: int, fragments: list[list[str]]
) -> None:
    warnings = stale_database_warnings(databases, NOW, stale_after_days)
    assert len(warnings) == len(fragments)
    for warning, expected_fragments in zip(warnings, fragments, strict=True):
        for fragment in expected_fragments:
            assert fragment in warning


# --------------------------------------------------------------------------- the country table


def test_country_location() -> None:
    china = country_location("CN")
    assert (china.country, china.continent, china.asn) == ("CN", "AS", None)
    assert china.latitude == pytest.approx(34.77, abs=0.05)
    assert china.longitude == pytest.approx(113.73, abs=0.05)
    assert country_location("de") == country_location("DE")
    assert country_location("DE").continent == "EU"


@pytest.mark.parametrize("code", ["ZZ", "", "XX", "china"])
def test_country_location_unknown(code: str) -> None:
    assert country_location(code) is UNKNOWN_LOCATION


def test_country_table_file() -> None:
    table = country_table()
    assert len(table) >= 240
    continents = {code: table[code].continent for code in ("CN", "US", "DE", "AU", "BR")}
    assert continents == {"CN": "AS", "US": "NA", "DE": "EU", "AU": "OC", "BR": "SA"}
    for code, country in table.items():
        assert code == country.iso_code
        assert len(code) == 2
        assert code.isupper()
        assert country.name
        assert country.continent in CONTINENTS
        assert -90 <= country.latitude <= 90
        assert -180 <= country.longitude <= 180
    assert list(table) == sorted(table)


# --------------------------------------------------------------------------- the bundled database


def test_bundled_database(make_locator: MakeLocator) -> None:
    locator = make_locator(GeoIPConfig())
    beijing = locator.locate(ip("202.106.0.20"))
    assert (beijing.country, beijing.continent) == ("CN", "AS")
    assert locator.locate(ip("8.8.8.8")).country == "US"
    (city,) = locator.databases
    assert city.bundled
    assert city.database_type == "GeoLite2-City"
    (warning,) = locator.warnings
    assert "July 2018 GeoLite2 build shipped by maxminddb-geolite2" in warning
    assert "geoip.city_db" in warning
