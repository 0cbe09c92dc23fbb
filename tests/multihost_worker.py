"""One process of a multi-process (or, with --num_processes=1, single-process) offline instance, for
tests/test_multihost.py. Prints `RESULT <json>` (leader / single process) with the greedy outputs."""

from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--coordinator", default=None)
    ap.add_argument("--num_processes", type=int, default=1)
    ap.add_argument("--process_id", type=int, default=0)
    ap.add_argument("--local_devices", type=int, default=4)
    ap.add_argument("--tp", type=int, default=8)
    args = ap.parse_args()

    import jax
    from jaxserve.engine import multihost
    if args.num_processes > 1:
        multihost.initialize(args.coordinator, args.num_processes, args.process_id,
                             local_device_count=args.local_devices)
    else:
        jax.config.update("jax_num_cpu_devices", args.local_devices)

    from jaxserve.config import ModelConfig
    from jaxserve.engine.llm import LLM
    from jaxserve.engine.sampling import SamplingParams
    cfg = ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                      num_kv_heads=8, head_dim=16, max_position_embeddings=512)
    llm = LLM(cfg, tp=args.tp, page_size=8, num_pages=64, max_num_batched_tokens=64, max_num_seqs=8,
              seed=0, compilation_cache="off", enable_prefix_caching=True)
    assert len(llm.engine.mesh.devices.flat) == args.tp, llm.engine.mesh
    system = list(range(1, 41))  # a shared prefix (5 pages of 8)
    prompts = [system + [50, 51, 52], system + [60, 61], list(range(100, 113)), system + [70, 71, 72, 73]]
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    if multihost.is_multiprocess() and jax.process_index() != 0:
        steps = multihost.follower_loop(llm.engine)
        print(f"FOLLOWER steps={steps}", flush=True)
        return 0
    if multihost.is_multiprocess():
        multihost.make_leader(llm.engine)
    # Two rounds: the second hits the prefix cache of the first.
    outs = llm.generate(prompts[:2], sp) + llm.generate(prompts[2:], sp)
    if multihost.is_multiprocess():
        multihost.stop_followers(llm.engine)
    print("RESULT " + json.dumps({"tokens": [o.token_ids for o in outs],
                                  "cached": [o.num_cached_tokens for o in outs],
                                  "processes": jax.process_count(), "devices": len(jax.devices())}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
