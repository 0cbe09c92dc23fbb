"""Time to ready: load the model, then serve a small multi-turn workload, in a fresh process with an empty
and then with a warm persistent compilation cache. Reports load time, first-token latency, total time and
the number of compilations (shape buckets) the workload triggered.

    python -m jaxserve.launch.bench_startup --model=demo --out=out/bench_startup.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

flags.DEFINE_string("model", "demo", "model to load")
flags.DEFINE_string("out", "out/bench_startup.json", "JSON output")
flags.DEFINE_bool("child", False, "internal: run one measurement and print JSON")
flags.DEFINE_string("cache_dir", "", "internal: compilation cache folder for the child")
FLAGS = flags.FLAGS


def child():
    t0 = time.perf_counter()
    from jaxserve import LLM, SamplingParams
    llm = LLM(model=FLAGS.model, compilation_cache=FLAGS.cache_dir, num_pages=256)
    t_load = time.perf_counter() - t0
    prompts = ["def main():\n", "import os\nimport sys\n\n\nclass Config:\n"]
    first = llm.generate(prompts[:1], SamplingParams(max_tokens=1))[0]
    t_first = time.perf_counter() - t0
    history = prompts
    for _ in range(3):  # a few chat-like turns touch the usual buckets
        outs = llm.generate(history, SamplingParams(max_tokens=24))
        history = [h + o.text + "\n" for h, o in zip(history, outs)]
    print(json.dumps(dict(load_s=t_load, first_token_s=t_first, total_s=time.perf_counter() - t0,
                          compilations=llm.stats()["num_compilations"], ttft_first_request_s=first.ttft_s)))


def main(argv):
    del argv
    if FLAGS.child:
        return child()
    rows = {}
    with tempfile.TemporaryDirectory() as cache:
        for name in ("cold", "warm"):
            out = subprocess.run([sys.executable, "-m", "jaxserve.launch.bench_startup", "--child", f"--model={FLAGS.model}",
                                  f"--cache_dir={cache}"], capture_output=True, text=True, check=True)
            rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'start':6s} {'load s':>7s} {'first token s':>14s} {'workload total s':>17s} {'compilations':>13s}")
    for name, r in rows.items():
        print(f"{name:6s} {r['load_s']:7.2f} {r['first_token_s']:14.2f} {r['total_s']:17.2f} {r['compilations']:13d}")
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    app.run(main)
