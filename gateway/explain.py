"""A route as plain data: why the chosen node won and why every other node did not."""

from __future__ import annotations

from typing import Any

from gateway.policy import Candidate, Exclusion
from gateway.router import Route


def _candidate(candidate: Candidate, chosen_id: str | None) -> dict[str, Any]:
    return {
        "node": candidate.node.id,
        "chosen": candidate.node.id == chosen_id,
        "tier": candidate.tier.config_name,
        "distance_km": None if candidate.distance_km is None else round(candidate.distance_km, 1),
        "score": round(candidate.score, 3),
        "weight": candidate.node.weight,
    }


def _exclusion(exclusion: Exclusion) -> dict[str, Any]:
    return {"node": exclusion.node.id, "reason": exclusion.reason, "detail": exclusion.detail}


def route_report(route: Route) -> dict[str, Any]:
    decision = route.decision
    chosen_id = decision.node.id if decision.node else None
    location = route.location
    return {
        "client": {
            "ip": None if route.client.ip is None else str(route.client.ip),
            "ip_source": route.client.source,
            "cdn_country": route.client.cdn_country,
            "country": location.country,
            "continent": location.continent,
            "latitude": location.latitude,
            "longitude": location.longitude,
            "asn": location.asn,
            "asn_org": location.asn_org,
        },
        "decision": {
            "target": chosen_id or "upstream",
            "reason": decision.reason,
            "location": route.url,
            "shared_cacheable": route.shared_cacheable,
        },
        "candidates": [_candidate(c, chosen_id) for c in decision.candidates],
        "excluded": [_exclusion(e) for e in decision.excluded],
    }
