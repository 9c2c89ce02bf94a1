"""Country facts the routing policy needs: continent and an approximate centre.

The table lives in ``geodata/countries.tsv`` (built by ``geodata/build_country_table.py`` from
a GeoIP City database) so operators can regenerate it alongside their GeoIP data.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cache
from importlib import resources

CONTINENTS = frozenset({"AF", "AN", "AS", "EU", "NA", "OC", "SA"})


@dataclass(frozen=True, slots=True)
class Country:
    iso_code: str
    name: str
    continent: str
    latitude: float
    longitude: float


@cache
def country_table() -> dict[str, Country]:
    """All known countries keyed by upper-case ISO 3166-1 alpha-2 code."""
    text = resources.files("geodata").joinpath("countries.tsv").read_text(encoding="utf-8")
    rows = csv.DictReader(
        (line for line in text.splitlines() if not line.startswith("#")), delimiter="\t"
    )
    return {
        row["iso_code"]: Country(
            iso_code=row["iso_code"],
            name=row["name"],
            continent=row["continent"],
            latitude=float(row["latitude"]),
            longitude=float(row["longitude"]),
        )
        for row in rows
    }


def lookup_country(iso_code: str) -> Country | None:
    return country_table().get(iso_code.upper())
