"""One process of a multi-process (or, with --num_processes=1, single-process) offline instance, for
tests/test_multihost.py. Prints `RESULT <json>` (leader / single process) with the greedy outputs."""

from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--coordinator", default=None)
    ap.add_argument("--num_processes", type=int, default=1)
    ap.add_argument("--process_id", type=int, default=0)
    ap.add_argument("--local_devices", type=int, default=4)
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1, help="> 1: mesh seq x tp, sequence-parallel prefill")
    ap.add_argument("--sp_threshold", type=int, default=16, help="with --seq > 1: suffixes this long take the SP path")
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
    # A small device tier (23 usable pages) over a host tier: round 3 evicts the cached prefixes to the host
    # tier, round 4 brings the shared one back from it.
    ops = multihost.connect() if args.num_processes > 1 else None  # collective: every process, before the engine
    llm = LLM(cfg, ops=ops, tp=args.tp, page_size=8, num_pages=24, num_host_pages=32, max_num_batched_tokens=64,
              max_num_seqs=8, seed=0, enable_prefix_caching=True,
              sequence_parallel=args.seq, sp_threshold=args.sp_threshold)
    assert len(llm.engine.mesh.devices.flat) == args.seq * args.tp, llm.engine.mesh
    system = list(range(1, 41))  # a shared prefix (5 pages of 8)
    prompts = [system + [50, 51, 52], system + [60, 61], list(range(100, 113)), system + [70, 71, 72, 73],
               list(range(120, 200)), list(range(130, 210)), system + [90, 91]]
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    if multihost.is_multiprocess() and jax.process_index() != 0:
        steps = multihost.follower_loop(llm.engine)
        print(f"FOLLOWER steps={steps} sp_prefills={llm.stats()['num_sequence_parallel_prefills']}", flush=True)
        return 0
    # Rounds: the second hits the prefix cache of the first; the third fills the device tier (the cached
    # prefixes go to the host tier); the fourth matches the shared prefix there and swaps it back in.
    outs = (llm.generate(prompts[:2], sp) + llm.generate(prompts[2:4], sp) + llm.generate(prompts[4:6], sp)
            + llm.generate(prompts[6:], sp))
    if args.seq > 1:  # a long suffix after the cached shared prefix: the ring reads that prefix from the pool
        outs += llm.generate([system + list(range(210, 230))], sp)
    pool = llm.engine.pool.stats()
    if multihost.is_multiprocess():
        multihost.stop_followers(llm.engine)
    print("RESULT " + json.dumps({"tokens": [o.token_ids for o in outs],
                                  "cached": [o.num_cached_tokens for o in outs],
                                  "swapped": [pool["swapped_out_pages"], pool["swapped_in_pages"]],
                                  "host_heads": llm.engine.pool.host_cache.shape[3],
                                  "sp_prefills": llm.stats()["num_sequence_parallel_prefills"],
                                  "processes": jax.process_count(), "devices": len(jax.devices())}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
