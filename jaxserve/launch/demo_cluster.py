"""The served demo: start a local cluster (scheduler + instances) on the demo model, run a multi-turn chat
through `jaxserve.client`, print each completion and a per-turn table of cached tokens and TTFT, stop it.

    python -m jaxserve.launch.demo_cluster --num_instances=2 --sessions=2 --turns=3

Cluster flags are `jaxserve.launch.local`'s. Each session keeps its own history; every turn resends it, so from the
second turn on the locality policy sends the session to the instance that holds its prefix and the prompt
is mostly served from the prefix cache."""

from __future__ import annotations

import asyncio
import time

from absl import app, flags

from jaxserve.launch.chat_script import SYSTEM, TURNS, USERS

from jaxserve.launch import local  # noqa: F401 - defines the cluster flags

flags.DEFINE_integer("sessions", 2, "concurrent chat sessions")
flags.DEFINE_integer("turns", 3, "turns per session")
flags.DEFINE_integer("max_tokens", 28, "new tokens per turn")
FLAGS = flags.FLAGS
# The demo shows caching and TTFT; calibrating the cost model would only lengthen the start-up.
FLAGS.set_default("profile_instances", False)



async def chat(address: str, header: str = "", show: bool = True) -> list[tuple]:
    from jaxserve.client import AsyncClient

    rows = []
    histories = [header + USERS[s % len(USERS)] + SYSTEM for s in range(FLAGS.sessions)]
    async with AsyncClient(address) as client:
        for turn in range(FLAGS.turns):
            prompts = [h + TURNS[turn % len(TURNS)] for h in histories]
            outs = await asyncio.gather(*(
                client.generate(p, max_tokens=FLAGS.max_tokens, stop=["\n\n\n"], session_id=f"{header}session-{s}",
                                temperature=0.7, top_p=0.95, seed=s,  # as jaxserve.launch.demo: seeded sampling
                                timeout_s=120) for s, p in enumerate(prompts)))
            for s, (p, out) in enumerate(zip(prompts, outs)):
                if show:
                    print(f"\n=== session {s} turn {turn} ({out.usage.instance_id}) ===\n"
                          f"{TURNS[turn % len(TURNS)]}\033[1m{out.text}\033[0m")
                histories[s] = p + out.text + "\n\n"
                u = out.usage
                rows.append((s, turn, u.instance_id, u.prompt_tokens, u.cached_tokens, u.ttft_s * 1e3))
    return rows


async def run() -> None:
    t0 = time.perf_counter()
    async with local.cluster_from_flags(port=0, quiet=True) as cluster:
        print(f"cluster of {cluster.num_instances} instances up in {time.perf_counter() - t0:.1f}s; "
              f"scheduler at {cluster.address}")
        t1 = time.perf_counter()
        # Same shapes, different prefixes: compiles every instance's buckets without warming the prefix cache.
        await chat(cluster.address, header="# warm-up\n", show=False)
        print(f"compile warm-up: {time.perf_counter() - t1:.1f}s")
        rows = await chat(cluster.address)
    print("\nsession turn  instance       prompt_tokens  cached_tokens  ttft_ms")
    for s, turn, inst, n, c, ttft in rows:
        print(f"{s:7d} {turn:4d}  {inst:12s} {n:14d} {c:14d} {ttft:8.1f}")
    total = sum(r[3] for r in rows)
    cached = sum(r[4] for r in rows)
    print(f"\nprefix cache hit rate: {cached / total:.1%} of {total} prompt tokens")


def main(argv):
    del argv
    asyncio.run(run())


if __name__ == "__main__":
    app.run(main)
