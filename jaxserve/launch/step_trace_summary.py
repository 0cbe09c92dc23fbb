"""Where served requests' time went, from an instance's `--step_trace` file: per prompt length, the median (and
least) milliseconds from arrival to the first step's dispatch, from then to the first token on the host, and
from then to its hand-over to the stream.

    python -m jaxserve.launch.instance ... --step_trace=/tmp/steps.jsonl
    python -m jaxserve.launch.step_trace_summary /tmp/steps.jsonl"""

from __future__ import annotations

from absl import app

from jaxserve.engine import step_trace


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("give one trace file: python -m jaxserve.launch.step_trace_summary FILE")
    spans = step_trace.request_spans(step_trace.read(argv[1]))
    if not spans:
        raise app.UsageError(f"{argv[1]} holds no request that got its first token")
    print(step_trace.summary(spans))


if __name__ == "__main__":
    app.run(main)
