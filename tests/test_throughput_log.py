"""The instance's periodic status line (issue 17): rates over the interval, silent while idle."""

from jaxserve.instance.throughput_log import ThroughputLog


def test_status_line_reports_rates_over_the_interval_and_is_silent_when_idle():
    now = [0.0]
    lines = []
    tl = ThroughputLog("colocated-0", interval_s=5.0, clock=lambda: now[0], emit=lines.append)
    load = dict(num_running_requests=3, num_queued_requests=1, num_free_pages=75, num_total_pages=100)
    counters = dict(prompt_tokens=1000, cached_tokens=250, generated_tokens=400)
    now[0] = 2.0
    assert tl.observe(counters, load) is None  # not an interval yet
    now[0] = 5.0
    line = tl.observe(counters, load)
    assert line == ("colocated-0: prompt 200.0 tok/s, generation 80.0 tok/s, running 3, waiting 1, KV usage 25.0%, "
                    "prefix hit rate 25.0%")
    idle = dict(num_running_requests=0, num_queued_requests=0, num_free_pages=100, num_total_pages=100)
    now[0] = 11.0
    assert tl.observe(counters, idle) is None  # nothing happened, nothing running: no line
    assert lines == [line]
