"""Helpers of ``scripts/bench``: the processes it runs, the world it routes, the load it sends.

- ``procs``: servers in their own process groups (always cleaned up), Redis, /proc readings.
- ``hub``: a local HF-compatible upstream API, so the catalog is warmed without internet.
- ``world``: client IPs, an ASN database, nodes, their live state in Redis, the gateway config.
- ``baseline``: the bare aiohttp + uvloop app that answers a fixed 302 (the yardstick).
- ``load``: the wrk runs (``load.lua`` plus a generated data file) and their results.
- ``profiling``: py-spy over a gateway worker, summarised by self time.
"""
