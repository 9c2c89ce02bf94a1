"""How load readings become the load routing uses: the deadband that keeps noise from
re-ranking, the smoothing of redirect counts over windows, and the expected load (redirects
sent since a reading, fading with the download duration; a prior before any)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import Capacity, NodeConfig
from gateway.state.live import LiveState, LoadRecord, SmoothedRedirects, within_deadband

NODE = NodeConfig(id="n", base_url="https://n.example", capacity=Capacity(connections=1000))


@pytest.mark.parametrize(
    ("current", "new", "deadband", "ignored"),
    [
        (0.30, 0.33, 0.05, True),
        (0.30, 0.27, 0.05, True),
        (0.30, 0.36, 0.05, False),
        (0.30, 0.24, 0.05, False),
        # Crossing full capacity is never noise: it decides whether the node takes clients.
        (0.98, 1.00, 0.05, False),
        (1.02, 0.99, 0.05, False),
        (1.00, 1.04, 0.05, True),
        (None, 0.01, 0.05, False),
        (0.01, None, 0.05, False),
        (None, None, 0.05, True),
        # No deadband: every move counts.
        (0.30, 0.3001, 0.0, False),
    ],
)
def test_within_deadband(
    current: float | None, new: float | None, deadband: float, ignored: bool
) -> None:
    assert within_deadband(current, new, deadband) is ignored


def load(connections: float, at: float) -> LoadRecord:
    return LoadRecord("n", "redirects", active_connections=connections, measured_at=at)


def test_small_load_moves_keep_the_load_in_use_and_the_version() -> None:
    live = LiveState([NODE], vantage="v", probing=False, load_deadband=0.05)
    live.apply_load(load(300, 1.0))
    assert live.statuses["n"].load == pytest.approx(0.30)
    version = live.version
    live.changed.clear()

    live.apply_load(load(330, 2.0))
    assert live.statuses["n"].load == pytest.approx(0.30)
    assert live.version == version and not live.changed.is_set()
    # The record itself is the newest reading, whatever load is in use.
    assert live.load_record("n") == load(330, 2.0)

    live.apply_load(load(360, 3.0))
    assert live.statuses["n"].load == pytest.approx(0.36)
    assert live.version == version + 1 and live.changed.is_set()


def test_deadband_is_measured_from_the_load_in_use_not_the_last_reading() -> None:
    live = LiveState([NODE], vantage="v", probing=False, load_deadband=0.05)
    live.apply_load(load(300, 1.0))
    for step, connections in enumerate((320, 340), start=2):
        live.apply_load(load(connections, float(step)))
        assert live.statuses["n"].load == pytest.approx(0.30)
    live.apply_load(load(360, 4.0))
    # Each step was under 0.05, the drift was not: a slow climb is still followed.
    assert live.statuses["n"].load == pytest.approx(0.36)


@given(
    deadband=st.sampled_from([0.0, 0.02, 0.05, 0.2]),
    readings=st.lists(st.integers(min_value=0, max_value=1200), min_size=1, max_size=30),
)
def test_load_in_use_stays_within_the_deadband_of_the_latest_reading(
    deadband: float, readings: list[int]
) -> None:
    live = LiveState([NODE], vantage="v", probing=False, load_deadband=deadband)
    for at, connections in enumerate(readings):
        before, version = live.statuses["n"].load, live.version
        live.apply_load(load(connections, float(at)))
        latest, in_use = connections / 1000, live.statuses["n"].load
        assert in_use is not None
        assert abs(in_use - latest) < deadband or in_use == pytest.approx(latest)
        assert (in_use >= 1.0) == (latest >= 1.0)
        # A version bump is a change of the load in use, and only that.
        assert (live.version != version) == (in_use != before)


@pytest.mark.parametrize(
    ("weight", "windows", "expected"),
    [
        (0.3, [10], 10.0),  # the first window is all there is
        (0.3, [10, 20], 13.0),
        (0.3, [10, 20, 0], 9.1),
        (1.0, [10, 20, 0], 0.0),  # the newest window alone
        # A node that draws everyone in one window and no one in the next: the estimate
        # stays between the two rather than swinging from one to the other.
        (0.3, [0, 100, 0, 100, 0, 100], 51.903),
    ],
)
def test_smoothed_redirects(weight: float, windows: list[int], expected: float) -> None:
    smoothed = SmoothedRedirects(weight)
    for count in windows:
        result = smoothed.add("n", count)
    assert result == pytest.approx(expected)


def test_smoothed_redirects_forget_dropped_nodes() -> None:
    smoothed = SmoothedRedirects(0.5)
    smoothed.add("a", 10)
    smoothed.add("b", 10)
    smoothed.keep_only(["a"])
    assert smoothed.add("a", 0) == 5.0
    assert smoothed.add("b", 0) == 0.0  # starts afresh


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def expecting(clock: Clock, *, prior: float | None = 0.5) -> LiveState:
    return LiveState(
        [NODE], vantage="v", probing=False, load_prior=prior, download_s=60.0, clock=clock
    )


def reading(connections: float, at: float) -> LoadRecord:
    return LoadRecord("n", "status-json", active_connections=connections, measured_at=at)


def test_redirects_count_against_a_node_between_readings() -> None:
    clock = Clock()
    live = expecting(clock)
    live.apply_load(reading(400, clock.now))
    version = live.version
    for _ in range(100):
        live.count_redirect("n")
    # Counted, but taken up only by the next fading (each change makes cells score again).
    assert (live.statuses["n"].load, live.version) == (0.4, version)
    live.fade_loads()
    assert live.statuses["n"].load == pytest.approx(0.5)
    # A new reading counts those downloads itself.
    live.apply_load(reading(480, clock.now))
    assert live.statuses["n"].load == pytest.approx(0.48)


def test_redirects_fade_with_the_download_duration() -> None:
    clock = Clock()
    live = expecting(clock)
    live.apply_load(reading(0, clock.now))
    for _ in range(300):
        live.count_redirect("n")
    clock.now += 60.0  # one mean download duration: e^-1 of them still under way
    live.fade_loads()
    assert live.statuses["n"].load == pytest.approx(0.3 * math.exp(-1))


def test_a_node_turned_full_by_redirects_stays_full_until_its_next_reading() -> None:
    clock = Clock()
    live = expecting(clock)
    live.apply_load(reading(900, clock.now))
    for _ in range(100):
        live.count_redirect("n")
    assert live.statuses["n"].load == pytest.approx(1.0)
    clock.now += 60.0  # most of those downloads would have ended, if they last the mean
    live.fade_loads()
    assert live.statuses["n"].load == pytest.approx(1.0)
    live.apply_load(reading(700, clock.now))
    assert live.statuses["n"].load == pytest.approx(0.7)


def test_a_node_without_a_reading_starts_from_the_prior() -> None:
    clock = Clock()
    assert expecting(clock).statuses["n"].load == 0.5
    assert expecting(clock, prior=None).statuses["n"].load is None
    live = expecting(clock)
    for count in range(1, 501):
        live.count_redirect("n")
        # Taken up at once when the node turns full (the rule stops sending to it), not
        # before.
        assert live.statuses["n"].load == (0.5 if count < 500 else pytest.approx(1.0))
    # No capacity, nothing to expect.
    bare = LiveState([replace(NODE, capacity=Capacity())], vantage="v", probing=False,
                     load_prior=0.5)  # fmt: skip
    assert bare.statuses["n"].load is None


def test_an_estimate_from_redirect_windows_is_a_floor_not_a_reset() -> None:
    """The windows of a node that publishes no load lag behind; the redirects this instance
    sent count until the estimate exceeds them, and are not reset by it."""
    clock = Clock()
    live = expecting(clock)
    for _ in range(200):
        live.count_redirect("n")
    live.apply_load(load(50, clock.now))
    assert live.statuses["n"].load == pytest.approx(0.2)
    live.apply_load(load(300, clock.now + 1))
    assert live.statuses["n"].load == pytest.approx(0.3)
