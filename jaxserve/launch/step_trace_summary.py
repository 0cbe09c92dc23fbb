"""Where served requests' time went, from `--step_trace` files: an instance's (arrival, first step's dispatch,
first token on the host, hand-over to the stream), the scheduler's (HTTP request in, routed, first tokens back,
first token written), or both joined by request id. Per prompt and cached length it prints the median (and
least) milliseconds of each span: front (HTTP in -> routed), to engine (-> the engine loop has it), queued
(-> first dispatch), compute (-> first token on the host), hand-over, back (-> the scheduler has it), write
(-> written to the client) and total (HTTP in -> first write).

    python -m jaxserve.launch.scheduler ... --step_trace=/tmp/scheduler.jsonl
    python -m jaxserve.launch.instance ... --step_trace=/tmp/steps.jsonl
    python -m jaxserve.launch.step_trace_summary /tmp/scheduler.jsonl /tmp/steps.jsonl"""

from __future__ import annotations

from absl import app

from jaxserve.engine import step_trace


def main(argv):
    if len(argv) < 2:
        raise app.UsageError("give one or more trace files: python -m jaxserve.launch.step_trace_summary FILE...")
    spans = step_trace.request_spans([e for path in argv[1:] for e in step_trace.read(path)])
    if not spans:
        raise app.UsageError(f"{', '.join(argv[1:])}: no request that got its first token")
    print(step_trace.summary(spans))


if __name__ == "__main__":
    app.run(main)
