"""Time to ready of `jaxserve serve MODEL`, with an empty and then a warm persistent compilation cache, split
into phases (process start + model load, compiling step shapes, cost-model profile + registration), and the
first request's latency after ready (no compile left for it).

    python -m jaxserve.launch.bench_ready --model=/tmp/ckpt_issue14 --out=out/bench_ready.json
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from absl import app, flags

flags.DEFINE_string("model", "demo", "model folder (or 'demo')")
flags.DEFINE_list("serve_args", [], "extra `jaxserve serve` arguments, comma-separated")
flags.DEFINE_string("out", "out/bench_ready.json", "JSON output")
FLAGS = flags.FLAGS

READY = re.compile(r"ready in ([\d.]+) s: OpenAI API at (http://\S+)/v1")
LOADED = re.compile(r"model loaded in ([\d.]+) s")
COMPILED = re.compile(r"precompiled \{.*'step_shapes': (\d+).*'seconds': ([\d.]+)")


def one_start(cache_dir: str) -> dict:
    cmd = [sys.executable, "-m", "jaxserve.cli", "serve", FLAGS.model, "--port", "0", "--compilation-cache",
           cache_dir, *FLAGS.serve_args]
    t0 = time.monotonic()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    row: dict = {}
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            for part in line.split("\r"):
                if m := LOADED.search(part):
                    row["load_s"] = float(m.group(1))
                if m := COMPILED.search(part):
                    row["step_shapes"], row["compile_s"] = int(m.group(1)), float(m.group(2))
            if m := READY.search(line):
                row["ready_s"] = time.monotonic() - t0
                url = m.group(2)
                break
        else:
            raise RuntimeError("jaxserve serve exited before ready:\n" + "".join(lines[-20:]))
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep draining
        body = json.dumps(dict(model=FLAGS.model, prompt="def main():", max_tokens=8, temperature=0)).encode()
        t1 = time.monotonic()
        req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as resp:
            json.load(resp)
        row["first_request_s"] = time.monotonic() - t1
    finally:
        proc.terminate()
        proc.wait()
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the whole process tree (instances included), start to shutdown: less sensitive than the
    # wall clock to other jobs on a shared box.
    row["cpu_s"] = round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 1)
    row["other_s"] = row["ready_s"] - row.get("load_s", 0.0) - row.get("compile_s", 0.0)
    return row


def main(argv):
    del argv
    rows = {"load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as cache:
        for name in ("cold", "warm"):
            rows[name] = one_start(cache)
    print(f"{'cache':6s} {'ready s':>8s} {'load s':>7s} {'compile s':>10s} {'shapes':>7s} {'other s':>8s} "
          f"{'1st request s':>14s} {'CPU s':>6s}")
    for name, r in rows.items():
        if name == "load_before":
            continue
        print(f"{name:6s} {r['ready_s']:8.1f} {r.get('load_s', 0):7.1f} {r.get('compile_s', 0):10.1f} "
              f"{r.get('step_shapes', 0):7d} {r['other_s']:8.1f} {r['first_request_s']:14.2f} {r['cpu_s']:6.1f}")
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(dict(model=FLAGS.model, serve_args=FLAGS.serve_args, load=os.getloadavg(), rows=rows), f,
                  indent=1)


if __name__ == "__main__":
    app.run(main)
