"""Country table and GeoIP database tooling shipped alongside the gateway."""
