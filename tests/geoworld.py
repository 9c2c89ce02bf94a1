"""The small GeoIP world every test shares: its records, sample addresses and mmdb builders.

Build the files with ``build_city_db`` / ``build_asn_db``, or use the ``geo_dbs`` and
``geoip_config`` fixtures from ``conftest.py``, which build them once per session.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from mmdb_writer import MmdbF64, MmdbU32, MMDBWriter
from netaddr import IPSet


class WorldRecord(NamedTuple):
    network: str
    country: str
    continent: str
    city: str | None  # None: a country-level record (no city), as MaxMind has them
    latitude: float
    longitude: float
    asn: int | None  # None: no record in the ASN database
    asn_org: str | None


WORLD: tuple[WorldRecord, ...] = (
    WorldRecord("1.2.3.0/24", "CN", "AS", "Beijing", 39.9042, 116.4074, 4134, "CHINANET"),
    WorldRecord("1.2.4.0/24", "CN", "AS", "Shanghai", 31.2304, 121.4737, 4837, "CHINA UNICOM"),
    WorldRecord("1.2.5.0/24", "CN", "AS", "Guangzhou", 23.1291, 113.2644, 9808, "China Mobile"),
    WorldRecord("3.3.3.0/24", "US", "NA", "Ashburn", 39.0438, -77.4874, 14618, "AMAZON-AES"),
    WorldRecord("5.5.5.0/24", "DE", "EU", "Frankfurt", 50.1109, 8.6821, 3320, "Deutsche Telekom"),
    WorldRecord("6.6.6.0/24", "JP", "AS", "Tokyo", 35.6762, 139.6503, 2516, "KDDI"),
    WorldRecord("7.7.7.0/24", "HK", "AS", "Hong Kong", 22.3193, 114.1694, 4760, "HKT"),
    WorldRecord("8.8.8.0/24", "US", "NA", None, 37.751, -97.822, None, None),
    WorldRecord("2001:db8:1::/48", "CN", "AS", "Beijing", 39.9042, 116.4074, 4134, "CHINANET"),
    WorldRecord(
        "2001:db8:2::/48", "DE", "EU", "Frankfurt", 50.1109, 8.6821, 3320, "Deutsche Telekom"
    ),
)

# One address in each network, plus a few that are deliberately not in the world.
BEIJING_IP = "1.2.3.4"
SHANGHAI_IP = "1.2.4.4"
GUANGZHOU_IP = "1.2.5.5"
ASHBURN_IP = "3.3.3.3"
FRANKFURT_IP = "5.5.5.5"
TOKYO_IP = "6.6.6.6"
HONG_KONG_IP = "7.7.7.7"
US_COUNTRY_ONLY_IP = "8.8.8.8"  # country-level record: no city, no ASN
BEIJING_IPV6 = "2001:db8:1::1"
FRANKFURT_IPV6 = "2001:db8:2::1"
UNLISTED_IP = "9.9.9.9"  # public, but in neither database
UNLISTED_IPV6 = "2001:db8:3::1"
PRIVATE_IP = "10.1.2.3"

#: The same addresses by name, for parametrizing.
SAMPLE_IPS: dict[str, str] = {
    "beijing": BEIJING_IP,
    "shanghai": SHANGHAI_IP,
    "guangzhou": GUANGZHOU_IP,
    "ashburn": ASHBURN_IP,
    "frankfurt": FRANKFURT_IP,
    "tokyo": TOKYO_IP,
    "hong_kong": HONG_KONG_IP,
    "us_country_only": US_COUNTRY_ONLY_IP,
    "beijing_v6": BEIJING_IPV6,
    "frankfurt_v6": FRANKFURT_IPV6,
    "unlisted": UNLISTED_IP,
    "unlisted_v6": UNLISTED_IPV6,
    "private": PRIVATE_IP,
}

COUNTRY_NAMES = {
    "CN": "China",
    "DE": "Germany",
    "HK": "Hong Kong",
    "JP": "Japan",
    "US": "United States",
}
CONTINENT_NAMES = {
    "AF": "Africa",
    "AN": "Antarctica",
    "AS": "Asia",
    "EU": "Europe",
    "NA": "North America",
    "OC": "Oceania",
    "SA": "South America",
}


class GeoDBs(NamedTuple):
    """Paths of the built world databases (the ``geo_dbs`` fixture)."""

    city: Path
    asn: Path


class _Writer(MMDBWriter):
    """MMDBWriter with a chosen build_epoch (it always stamps the current time)."""

    def __init__(self, database_type: str, build_epoch: int | None) -> None:
        super().__init__(
            ip_version=6,
            ipv4_compatible=True,
            database_type=database_type,
            languages=["en"],
            description=f"Test {database_type} database (tests/geoworld.py)",
        )
        self._build_epoch = int(time.time()) if build_epoch is None else build_epoch

    def _build_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = super()._build_meta()
        meta["build_epoch"] = self._build_epoch
        return meta


def _names(name: str) -> dict[str, Any]:
    return {"names": {"en": name}}


def city_record(record: WorldRecord, *, country_only: bool = False) -> dict[str, Any]:
    """A GeoIP2 City record for one world row; a Country record (no city, no location) if
    ``country_only``."""
    country = {"iso_code": record.country, **_names(COUNTRY_NAMES[record.country])}
    data: dict[str, Any] = {
        "continent": {"code": record.continent, **_names(CONTINENT_NAMES[record.continent])},
        "country": country,
        "registered_country": country,
        "location": {"latitude": MmdbF64(record.latitude), "longitude": MmdbF64(record.longitude)},
    }
    if country_only:
        del data["location"]
    elif record.city is not None:
        data["city"] = _names(record.city)
    return data


def build_city_db(
    path: str | os.PathLike[str],
    records: Iterable[WorldRecord] = WORLD,
    *,
    database_type: str = "GeoLite2-City",
    build_epoch: int | None = None,
) -> None:
    """Write a GeoIP2 City mmdb, or a Country one (no city, no location) if ``database_type``
    names a Country database. ``build_epoch`` defaults to now, so the database is fresh."""
    writer = _Writer(database_type, build_epoch)
    country_only = "Country" in database_type
    for record in records:
        writer.insert_network(
            IPSet([record.network]), city_record(record, country_only=country_only)
        )
    writer.to_db_file(os.fspath(path))


def build_asn_db(
    path: str | os.PathLike[str],
    records: Iterable[WorldRecord] = WORLD,
    *,
    database_type: str = "GeoLite2-ASN",
    build_epoch: int | None = None,
) -> None:
    """Write a GeoLite2-ASN mmdb; rows without an ASN get no record."""
    writer = _Writer(database_type, build_epoch)
    for record in records:
        if record.asn is None:
            continue
        writer.insert_network(
            IPSet([record.network]),
            {
                "autonomous_system_number": MmdbU32(record.asn),
                "autonomous_system_organization": record.asn_org or "",
            },
        )
    writer.to_db_file(os.fspath(path))
