"""The controller's per-version SLO windows and the judgement that rolls a canary back."""

from __future__ import annotations

from mass.lifecycle.slo import Figures, Window, judge, merge, note, p95
from mass.serving.args import SloArgs


def test_a_window_merges_reports_and_forgets_what_left_it():
    window = Window(window_s=60)
    window.add({"n": 10, "errors": 2, "latency_ms": [10.0] * 8, "ttft_ms": [5.0] * 8}, now=100.0)
    window.add({"n": 10, "errors": 0, "latency_ms": [20.0] * 10, "ttft_ms": []}, now=130.0)
    assert window.figures(now=131.0) == Figures(20, 2, 20.0, 5.0)
    assert window.figures(since=120.0, now=131.0) == Figures(10, 0, 20.0, None)  # since the step began
    assert window.figures(now=161.0) == Figures(10, 0, 20.0, None)  # the first report left the window
    assert window.figures(now=500.0) == Figures(0, 0, None, None)


def test_p95_is_the_nearest_rank():
    assert p95(range(1, 101)) == 95 and p95([3.0]) == 3.0 and p95([]) is None


def test_the_bounds_name_what_broke_and_by_how_much():
    slo = SloArgs()
    production = Figures(200, 2, 40.0, 10.0)  # 1 % errors
    assert judge(Figures(100, 2, 45.0, 11.0), production, slo) is None
    breach = judge(Figures(100, 4, 45.0, 11.0), production, slo)  # 4 % > 2 x 1 % + 1 %
    assert breach == "error rate 4.0% (4/100) > 2 x production's 1.0% + 1% = 3.0%"
    assert judge(Figures(100, 0, 85.0, 11.0), production, slo) is None  # 85 < 40 + 50 ms: noise on a fast model
    assert judge(Figures(100, 0, 95.0, 11.0), production, slo) == (
        "p95 latency 95 ms > 1.5 x production's 40 ms (and at least 50 ms more) = 90 ms")
    slow = Figures(200, 0, 400.0, 100.0)
    assert "p95 time to first token 200 ms > 1.5 x production's 100 ms" in judge(Figures(100, 0, 400.0, 200.0),
                                                                                 slow, slo)


def test_too_few_requests_are_not_judged():
    slo = SloArgs(min_requests=20)
    assert judge(Figures(19, 19, None, None), Figures(500, 0, 10.0, None), slo) is None
    # production with too few requests: errors are judged against a 0 % production, latency not at all
    assert judge(Figures(30, 0, 900.0, None), Figures(5, 0, 10.0, None), slo) is None
    assert judge(Figures(30, 3, 10.0, None), Figures(5, 0, 10.0, None), slo).startswith("error rate 10.0%")


def test_reports_count_calls_and_merge_an_sdks_into_a_gateways():
    gateway: dict = {}
    note(gateway, "m", "1", False, 12.345, ttft_ms=3.0)
    note(gateway, "m", "1", True, 900.0)  # a failure counts, its latency does not
    sdk: dict = {}
    note(sdk, "m", 1, False, 20.0)
    note(sdk, "m", 2, False, 30.0)
    merge(gateway, sdk)
    assert gateway == {"m": {"1": {"n": 3, "errors": 1, "latency_ms": [12.35, 20.0], "ttft_ms": [3.0]},
                             "2": {"n": 1, "errors": 0, "latency_ms": [30.0], "ttft_ms": []}}}
    window = Window(60)
    window.add(gateway["m"]["1"], now=0)
    window.add(gateway["m"]["1"], now=100)  # the first report left the window; the total keeps it
    assert (window.figures(now=100).requests, window.total) == (3, 6)
