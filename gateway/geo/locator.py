"""Client IP -> location (country, continent, coordinates, ASN) from memory-mapped GeoIP databases.

``locate`` never raises: special-purpose and unlisted addresses give ``UNKNOWN_LOCATION``. Only an
unusable City database is fatal (``GeoDataError``); ASN database trouble is just a warning. Results
are cached per /24 or /48, looked up at the prefix's first address so they don't depend on arrival.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, Protocol

import geoip2.database
import geoip2.errors
import geoip2.models
import maxminddb

from gateway.config import GeoIPConfig
from gateway.geo.countries import lookup_country
from gateway.lru import LRUCache

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

UPDATE_SCRIPT = "geodata/update_geoip.sh"


@dataclass(frozen=True, slots=True)
class Location:
    country: str | None = None  # ISO 3166-1 alpha-2, upper-case
    continent: str | None = None  # AF AN AS EU NA OC SA
    latitude: float | None = None
    longitude: float | None = None
    asn: int | None = None
    asn_org: str | None = None

    @property
    def known(self) -> bool:
        return self.country is not None


UNKNOWN_LOCATION = Location()


class GeoDataError(Exception):
    """The City database cannot be opened or used; the message says which file, why, and what to
    set instead."""


@dataclass(frozen=True, slots=True)
class DatabaseInfo:
    role: Literal["city", "asn"]
    path: str
    database_type: str
    build_time: datetime  # aware, UTC; from the metadata's build_epoch
    bundled: bool


class GeoLocator(Protocol):
    databases: tuple[DatabaseInfo, ...]

    def locate(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Location: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- special addresses

#: IPv4 ranges that never carry a geolocatable client: this-network, private, shared (CGNAT),
#: loopback, link-local, IETF protocol assignments, benchmarking, multicast, reserved/broadcast.
#: All are /24 or wider, so a cached /24 is either entirely special or not at all. Documentation
#: ranges (TEST-NET-*) are deliberately looked up: real databases do not list them, and test
#: databases may.
_SPECIAL_V4 = tuple(
    ipaddress.IPv4Network(net)
    for net in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
)

# IPv6 keys are the top 48 bits; IPv4 keys are the top 24 bits with this flag above them.
_V4_KEY = 1 << 48
_V4_SHIFT = 8  # /24
_V6_SHIFT = 80  # /48
_V4_MAPPED = 0xFFFF  # ::ffff:0:0/96, after shifting out the low 32 bits


def _is_special(address: IPAddress) -> bool:
    if address.version == 4:
        return any(address in net for net in _SPECIAL_V4)
    # Only 2000::/3 is allocated global unicast; everything else is unspecified, loopback,
    # IPv4-compatible/-mapped, IETF-reserved, unique-local (fc00::/7), link-local (fe80::/10)
    # or multicast (ff00::/8). 2001:db8::/32 (documentation) is looked up, as for IPv4.
    return int(address) >> 125 != 1


# --------------------------------------------------------------------------- opening databases


def _open_mode() -> int:
    """The C memory-mapped reader if it is available, else whatever maxminddb can do."""
    try:
        from maxminddb import extension
    except ImportError:
        return maxminddb.MODE_AUTO
    return maxminddb.MODE_MMAP_EXT if hasattr(extension, "Reader") else maxminddb.MODE_AUTO


def _bundled_city_db() -> str:
    try:
        from _maxminddb_geolite2 import geolite2_database
    except ImportError:
        raise GeoDataError(
            "geoip.city_db is not set and the bundled GeoLite2 City database "
            "(Python package maxminddb-geolite2) is not installed; install it, or set "
            f"geoip.city_db to a GeoLite2/GeoIP2/DB-IP Lite City mmdb (see {UPDATE_SCRIPT})"
        ) from None
    return str(geolite2_database())


def _open(path: str) -> tuple[geoip2.database.Reader, str, datetime]:
    """Open a database; return the reader, its database_type and its build time.

    Raises OSError, ValueError or maxminddb.InvalidDatabaseError with the reader's own reason.
    """
    reader = geoip2.database.Reader(path, locales=["en"], mode=_open_mode())
    try:
        metadata = reader.metadata()
        database_type = str(metadata.database_type)
        built = datetime.fromtimestamp(int(metadata.build_epoch), UTC)
    except BaseException:
        reader.close()
        raise
    return reader, database_type, built


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, maxminddb.InvalidDatabaseError):
        return "not a valid MaxMind DB (.mmdb) file"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc).strip().rstrip(".") or type(exc).__name__


# --------------------------------------------------------------------------- staleness


def stale_database_warnings(
    databases: Iterable[DatabaseInfo], now: datetime, stale_after_days: int
) -> list[str]:
    """One sentence per database built more than ``stale_after_days`` days before ``now``."""
    warnings: list[str] = []
    for db in databases:
        age = now - db.build_time
        if age <= timedelta(days=stale_after_days):
            continue
        built = f"{db.build_time:%Y-%m-%d}"
        key = f"geoip.{db.role}_db"
        if db.bundled:
            what = (
                f"The GeoIP {db.role} database in use is the bundled {db.build_time:%B %Y} "
                f"GeoLite2 build shipped by maxminddb-geolite2 ({db.path}, {db.database_type}, "
                f"built {built}, {age.days} days ago)"
            )
        else:
            what = (
                f"The GeoIP {db.role} database {db.path} ({db.database_type}) was built on "
                f"{built}, {age.days} days ago"
            )
        kind = "City" if db.role == "city" else "ASN"
        warnings.append(
            f"{what}, older than geoip.stale_after_days={stale_after_days}: networks move "
            f"between owners and countries, so locations may be wrong. Point {key} at a "
            f"current GeoLite2 or DB-IP Lite {kind} mmdb; see {UPDATE_SCRIPT}."
        )
    return warnings


# --------------------------------------------------------------------------- the locator


class MaxMindLocator:
    """``GeoLocator`` over a GeoIP2/GeoLite2/DB-IP Lite City (or Country) and optional ASN mmdb.

    Meant to be called from one thread (the event loop); lookups only touch the memory map.
    """

    warnings: tuple[str, ...]
    databases: tuple[DatabaseInfo, ...]

    def __init__(self, config: GeoIPConfig) -> None:
        warnings: list[str] = []
        bundled = config.city_db is None
        city_path = _bundled_city_db() if config.city_db is None else str(config.city_db)
        self._city_reader, city_info, self._city_lookup = self._open_city(city_path, bundled)
        databases = [city_info]

        self._asn_reader: geoip2.database.Reader | None = None
        if config.asn_db is not None:
            asn_path = str(config.asn_db)
            try:
                reader, database_type, built = _open(asn_path)
            except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
                warnings.append(
                    f"geoip.asn_db: cannot open {asn_path}: {_reason(exc)}. Continuing without "
                    "ASN data (no ASN-tier routing); point geoip.asn_db at a GeoLite2-ASN or "
                    f"DB-IP ASN Lite mmdb (see {UPDATE_SCRIPT}) or remove it."
                )
            else:
                # geoip2's Reader.asn() accepts exactly the databases whose type names
                # GeoLite2-ASN (DB-IP's ASN Lite says "compat=GeoLite2-ASN").
                if "GeoLite2-ASN" in database_type:
                    self._asn_reader = reader
                    databases.append(DatabaseInfo("asn", asn_path, database_type, built, False))
                else:
                    reader.close()
                    warnings.append(
                        f"geoip.asn_db: {asn_path} is a {database_type!r} database, not an "
                        "ASN database (GeoLite2-ASN or DB-IP ASN Lite). Continuing without "
                        "ASN data (no ASN-tier routing); fix or remove geoip.asn_db."
                    )

        self.databases = tuple(databases)
        warnings.extend(
            stale_database_warnings(self.databases, datetime.now(UTC), config.stale_after_days)
        )
        self.warnings = tuple(warnings)

        self._cache: LRUCache[int, Location] | None = (
            LRUCache(config.cache_size) if config.cache_size > 0 else None
        )
        self._hits = 0
        self._misses = 0

    @staticmethod
    def _open_city(
        path: str, bundled: bool
    ) -> tuple[
        geoip2.database.Reader,
        DatabaseInfo,
        Callable[[IPAddress], geoip2.models.Country],
    ]:
        fix = (
            "set geoip.city_db to a GeoLite2/GeoIP2/DB-IP Lite City or Country mmdb "
            f"(see {UPDATE_SCRIPT})"
        )
        if not bundled:
            fix += ", or remove it to use the bundled GeoLite2 City"
        try:
            reader, database_type, built = _open(path)
        except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
            raise GeoDataError(
                f"geoip.city_db: cannot open {path}: {_reason(exc)}; {fix}"
            ) from None
        lookup: Callable[[IPAddress], geoip2.models.Country]
        if "City" in database_type:
            lookup = reader.city
        elif "Country" in database_type:
            lookup = reader.country
        else:
            reader.close()
            raise GeoDataError(
                f"geoip.city_db: {path} is a {database_type!r} database, but a City or Country "
                f"database is needed; {fix}"
            )
        return reader, DatabaseInfo("city", path, database_type, built, bundled), lookup

    def locate(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Location:
        n = int(ip)
        if ip.version == 4 or n >> 32 == _V4_MAPPED:
            key = (n & 0xFFFF_FFFF) >> _V4_SHIFT | _V4_KEY
        else:
            key = n >> _V6_SHIFT
        cache = self._cache
        if cache is not None:
            hit = cache.get(key)
            if hit is not None:
                self._hits += 1
                return hit
        self._misses += 1
        location = self._resolve(key)
        if cache is not None:
            cache.put(key, location)
        return location

    def _resolve(self, key: int) -> Location:
        """Look up the first address of the prefix that ``key`` stands for."""
        address: IPAddress
        if key & _V4_KEY:
            address = ipaddress.IPv4Address((key ^ _V4_KEY) << _V4_SHIFT)
        else:
            address = ipaddress.IPv6Address(key << _V6_SHIFT)
        if _is_special(address):
            return UNKNOWN_LOCATION

        asn: int | None = None
        asn_org: str | None = None
        if self._asn_reader is not None:
            try:
                record = self._asn_reader.asn(address)
            except (ValueError, geoip2.errors.AddressNotFoundError, maxminddb.InvalidDatabaseError):
                pass
            else:
                asn = record.autonomous_system_number
                asn_org = record.autonomous_system_organization

        try:
            response = self._city_lookup(address)
        except (ValueError, geoip2.errors.AddressNotFoundError, maxminddb.InvalidDatabaseError):
            response = None
        country = response.country.iso_code if response is not None else None
        if response is None or not country:
            return UNKNOWN_LOCATION if asn is None else Location(asn=asn, asn_org=asn_org)

        country = country.upper()
        continent = response.continent.code
        latitude = longitude = None
        if isinstance(response, geoip2.models.City):
            latitude = response.location.latitude
            longitude = response.location.longitude
        if continent is None or latitude is None or longitude is None:
            # Country databases (and the odd City record) lack these: use the country table.
            known = lookup_country(country)
            if known is not None:
                continent = continent or known.continent
                if latitude is None or longitude is None:
                    latitude, longitude = known.latitude, known.longitude
        return Location(
            country=country,
            continent=continent,
            latitude=latitude,
            longitude=longitude,
            asn=asn,
            asn_org=asn_org,
        )

    def cache_info(self) -> tuple[int, int, int]:
        """(hits, misses, current size) of the prefix cache."""
        return self._hits, self._misses, len(self._cache) if self._cache is not None else 0

    def close(self) -> None:
        if self._cache is not None:
            self._cache.clear()
        self._city_reader.close()
        if self._asn_reader is not None:
            self._asn_reader.close()

    def __enter__(self) -> MaxMindLocator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def country_location(iso_code: str) -> Location:
    """Where a client is when all we know is its country (e.g. from a trusted CDN header)."""
    known = lookup_country(iso_code)
    if known is None:
        return UNKNOWN_LOCATION
    return Location(
        country=known.iso_code,
        continent=known.continent,
        latitude=known.latitude,
        longitude=known.longitude,
    )


__all__ = [
    "UNKNOWN_LOCATION",
    "DatabaseInfo",
    "GeoDataError",
    "GeoLocator",
    "Location",
    "MaxMindLocator",
    "country_location",
    "stale_database_warnings",
]
