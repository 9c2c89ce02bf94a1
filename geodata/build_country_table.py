"""Regenerate ``geodata/countries.tsv`` from a GeoIP2/GeoLite2 (or DB-IP Lite) City database.

Usage: ``python3 -m geodata.build_country_table [--db PATH] [--out PATH]``

Every record of the database is visited once (about 40 s for the bundled GeoLite2 City). For each
country (the record's ``country``, not its ``registered_country``):

* ``continent`` is the most common continent code among the country's records;
* ``latitude``/``longitude`` is the location of the country-level records (country, but no city
  and no subdivision: MaxMind puts the country's default location there; where those disagree
  the most common one wins), else the mean location of the country's city records, else the
  mean of whatever located records it has; rounded to 4 decimals;
* ``name`` is the English name.

Countries that do not occur in the database are absent from the table.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import maxminddb

DEFAULT_OUT = Path(__file__).with_name("countries.tsv")
HEADER = ("iso_code", "name", "continent", "latitude", "longitude")

GEOLITE2_ATTRIBUTION = (
    "Derived from GeoLite2 data, licensed CC BY-SA 4.0 (so is this table).",
    "This product includes GeoLite2 data created by MaxMind, available from",
    "https://www.maxmind.com",
)
DBIP_ATTRIBUTION = (
    "Derived from DB-IP Lite data, licensed CC BY 4.0.",
    "IP Geolocation by DB-IP (https://db-ip.com)",
)


@dataclass(frozen=True, slots=True)
class CountryRow:
    iso_code: str
    name: str
    continent: str
    latitude: float
    longitude: float


@dataclass(slots=True)
class _Tally:
    """What one pass over the database learns about one country."""

    name: str = ""
    continents: Counter[str] = field(default_factory=Counter)
    country_level: Counter[tuple[float, float]] = field(default_factory=Counter)
    city_sum: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    any_sum: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])

    def centre(self) -> tuple[float, float] | None:
        if self.country_level:
            # Most common location; ties broken by the coordinates so output is deterministic.
            return min(self.country_level.items(), key=lambda item: (-item[1], item[0]))[0]
        for lat_sum, lon_sum, count in (self.city_sum, self.any_sum):
            if count:
                return lat_sum / count, lon_sum / count
        return None


def bundled_database() -> str:
    """Path of the GeoLite2 City database shipped by ``maxminddb-geolite2``."""
    from _maxminddb_geolite2 import geolite2_database

    return str(geolite2_database())


def _dict(value: object) -> dict[str, object]:
    return value if isinstance(value, dict) else {}


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _coordinates(record: dict[str, object]) -> tuple[float, float] | None:
    location = _dict(record.get("location"))
    lat, lon = location.get("latitude"), location.get("longitude")
    if isinstance(lat, int | float) and isinstance(lon, int | float):
        return float(lat), float(lon)
    return None


def tally_records(records: Iterable[object]) -> dict[str, _Tally]:
    """Fold database records (GeoIP2 City/Country layout) into per-country tallies."""
    tallies: dict[str, _Tally] = {}
    for raw in records:
        record = _dict(raw)
        country = _dict(record.get("country"))
        iso_code = _str(country.get("iso_code"))
        if iso_code is None:
            continue
        iso_code = iso_code.upper()
        tally = tallies.get(iso_code)
        if tally is None:
            tally = tallies[iso_code] = _Tally()
        if not tally.name:
            tally.name = _str(_dict(country.get("names")).get("en")) or ""
        continent = _str(_dict(record.get("continent")).get("code"))
        if continent is not None:
            tally.continents[continent.upper()] += 1
        point = _coordinates(record)
        if point is None:
            continue
        for sums in (tally.any_sum, tally.city_sum) if "city" in record else (tally.any_sum,):
            sums[0] += point[0]
            sums[1] += point[1]
            sums[2] += 1
        if "city" not in record and "subdivisions" not in record:
            tally.country_level[point] += 1
    return tallies


def country_rows(tallies: dict[str, _Tally]) -> tuple[list[CountryRow], list[str]]:
    """Table rows sorted by ISO code, plus the codes skipped for want of continent or location."""
    rows: list[CountryRow] = []
    skipped: list[str] = []
    for iso_code in sorted(tallies):
        tally = tallies[iso_code]
        centre = tally.centre()
        if centre is None or not tally.continents:
            skipped.append(iso_code)
            continue
        continent = min(tally.continents.items(), key=lambda item: (-item[1], item[0]))[0]
        rows.append(
            CountryRow(
                iso_code=iso_code,
                name=tally.name or iso_code,
                continent=continent,
                # "+ 0.0" turns a rounded -0.0 into 0.0.
                latitude=round(centre[0], 4) + 0.0,
                longitude=round(centre[1], 4) + 0.0,
            )
        )
    return rows, skipped


def render_table(rows: Sequence[CountryRow], comments: Sequence[str]) -> str:
    out = io.StringIO()
    out.writelines(f"# {line}".rstrip() + "\n" for line in comments)
    writer = csv.writer(out, delimiter="\t", lineterminator="\n")
    writer.writerow(HEADER)
    for row in rows:
        writer.writerow(
            (row.iso_code, row.name, row.continent, f"{row.latitude:.4f}", f"{row.longitude:.4f}")
        )
    return out.getvalue()


def build(db_path: str, *, bundled: bool = False) -> tuple[str, int, list[str]]:
    """Read the database; return the TSV text, the number of countries and any skipped codes."""
    with maxminddb.open_database(db_path, maxminddb.MODE_AUTO) as reader:
        metadata = reader.metadata()
        networks = 0

        def records() -> Iterable[object]:
            nonlocal networks
            for _network, record in reader:
                networks += 1
                yield record

        tallies = tally_records(records())
    rows, skipped = country_rows(tallies)
    built = datetime.fromtimestamp(metadata.build_epoch, UTC)
    database_type = metadata.database_type
    attribution = DBIP_ATTRIBUTION if "DBIP" in database_type.upper() else GEOLITE2_ATTRIBUTION
    command = "python3 -m geodata.build_country_table"
    if bundled:
        source = f"the {database_type} database bundled with maxminddb-geolite2"
    else:
        command += f" --db {Path(db_path).name}"
        source = f"{Path(db_path).name} ({database_type})"
    comments = [
        "Country table read by gateway/countries.py. Do not edit by hand; regenerate with",
        f"  {command}",
        f"Source: {source}, built {built:%Y-%m-%d %H:%M:%S} UTC",
        f"  ({networks} networks, {len(rows)} countries).",
        "continent: the most common continent code among the country's records.",
        "latitude/longitude: the most common location of the country-level records (country but",
        "  no city or subdivision), else the mean of the country's city locations; 4 decimals.",
        *attribution,
    ]
    return render_table(rows, comments), len(rows), skipped


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m geodata.build_country_table",
        description="Regenerate the country table (continent, centre) from a GeoIP City mmdb.",
    )
    parser.add_argument(
        "--db",
        help="GeoIP2/GeoLite2/DB-IP Lite City mmdb (default: the bundled GeoLite2 City)",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output TSV (default: {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    db_path = args.db or bundled_database()
    try:
        text, count, skipped = build(db_path, bundled=args.db is None)
    except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
        print(f"error: cannot read {db_path}: {exc}", file=sys.stderr)
        return 1
    _write_atomically(args.out, text)
    print(f"wrote {count} countries to {args.out}", file=sys.stderr)
    if skipped:
        print(f"skipped (no continent or location): {', '.join(skipped)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
