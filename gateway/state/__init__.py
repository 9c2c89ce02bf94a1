"""Live node state: health, latency and load (probes, redirect counts), shared through Redis or
held in process, and which revisions each node holds (manifests, verification)."""
