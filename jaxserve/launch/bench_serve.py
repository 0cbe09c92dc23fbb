"""Served latency and throughput over the OpenAI HTTP API, jaxserve beside a second OpenAI-compatible server
(vLLM, say) in the same run (issue 14's side-by-side).

    python -m jaxserve.launch.bench_serve --make_checkpoint=/tmp/ckpt_issue14          # the random test Llama, once
    python -m jaxserve.launch.bench_serve --model=/tmp/ckpt_issue14 --out=out/bench_serve.json          # jaxserve only
    python -m jaxserve.launch.bench_serve --model=/tmp/ckpt_issue14 --other_url=http://127.0.0.1:8100 --other_name=vllm \
        --repeats=2 --out=out/bench_serve.json

The jaxserve side is started here: `jaxserve.launch.scheduler` with the HTTP front and one colocated `jaxserve.launch.instance`
(with `--precompile`, so no request waits on a compilation) as child processes on 127.0.0.1; the benchmark
waits until `/health` answers and `/v1/models` lists the model, and stops both at the end (SIGTERM, then
SIGKILL; also on error, Ctrl-C or SIGTERM, and the children get SIGTERM if this process dies). Their logs go
to `<out>.logs/`. The other server is started by hand beforehand, e.g. vLLM's CPU build:

    /tmp/vllm-venv/bin/python -m vllm.entrypoints.openai.api_server --model=/tmp/ckpt_issue14 \
        --dtype=bfloat16 --max-model-len=2048 --port=8100

Workloads (every prompt is token ids, greedy, streamed, fixed output lengths through `ignore_eos`; every
"cold" prompt is fresh random ids, so nothing is cached from earlier runs or repeats):
  cold_ttft       TTFT of one 544-token prompt
  cached_ttft     TTFT of a 512-token prefix + 32 new tokens, the prefix sent once just before (+ 32 others)
  burst_cold      median TTFT of 8 concurrent requests sharing a fresh 512-token prefix (+ 32 own tokens each)
  burst_primed    median TTFT of 8 more with the same (now cached) prefix and new 32-token suffixes
  decode_b8/b32   8 / 32 concurrent 32-token prompts, 64 new tokens each: tok/s = tokens after each request's
                  first / (last token of any request - first token of any request); TPOT = per-request
                  (last - first token) / (tokens - 1), median over requests
TTFT is the time from sending the request to the first streamed chunk that carries a token. Each engine first
runs every workload once unmeasured (warm-up), then the workloads alternate A B A B (`--repeats` times each;
the table shows the median over repeats, the JSON every request).

The checkpoint (`--make_checkpoint`) is the Llama of issue 14's report with random weights, saved in bf16:
hidden 256, intermediate 1024, 4 layers, 2 heads / 1 KV head of 128, vocab 8192, context 2048. Its tokenizer
is a word-level `tokenizer.json` (id i decodes to the word `t<i>`; 0-2 are <unk>/<s>/</s>) with a
`tokenizer_config.json`, which jaxserve (`HFTokenizer`) and vLLM (`PreTrainedTokenizerFast`) both load, so
vLLM needs no `--skip-tokenizer-init`. A `ByteTokenizer(vocab_size=8192)` would not do here: ids >= 258 decode
to nothing, so a random model's tokens would mostly produce no streamed text and no chunk to time.

`--precompile` of the default shapes (1024-token budget x 2048 context: ~290 step shapes) needs Linux's
vm.max_map_count above its default 65530 on XLA:CPU (~350 memory mappings per compiled shape; past the limit
the instance dies in LLVM with "Cannot allocate memory"): `sysctl -w vm.max_map_count=262144`, or lower
--max_num_batched_tokens / --max_model_len. The benchmark warns when the limit is lower.

Timings are within one run on a shared machine: the load average is recorded at the start and the end."""

from __future__ import annotations

import os

# The scheduler and instance are started with fork + exec while nothing here runs gRPC, but keep the setting
# the other launchers use in case a future import brings gRPC threads in.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import asyncio  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from absl import app, flags, logging  # noqa: E402

from jaxserve.bench.offline_decode import OfflineDecode, cpu_seconds  # noqa: E402
from jaxserve.bench.openai_client import (Endpoint, decode_stats, format_table, free_port, get_json,  # noqa: E402
                                          metric_list, random_prompt, stream_completion, wait_other)
from jaxserve.util import die_with_parent  # noqa: E402

flags.DEFINE_string("model", None, "Hugging Face folder served by jaxserve (and by the other server)")
flags.DEFINE_string("make_checkpoint", None, "write issue 14's random Llama (bf16) + tokenizer to this folder "
                    "and exit")
flags.DEFINE_string("other_url", None, "base URL of a second OpenAI-compatible server (e.g. http://127.0.0.1:8100); "
                    "unset: jaxserve only")
flags.DEFINE_string("other_name", "other", "name of the second server in the table")
flags.DEFINE_string("other_model", None, "model name sent to the second server (default: the first one its "
                    "/v1/models lists)")
flags.DEFINE_string("other_extra_body", '{"ignore_eos": true}', "JSON merged into every request to the second "
                    "server (vLLM: ignore_eos / min_tokens)")
flags.DEFINE_integer("repeats", 2, "measured A/B alternations of every workload")
flags.DEFINE_float("settle_s", 2.0, "idle seconds before each measured unit, so the engine measured before it has "
                   "gone quiet (vLLM 0.32's CPU engine keeps a core busy for ~1 s after its last request)")
flags.DEFINE_bool("warmup", True, "run every workload once, unmeasured, on each engine first")
flags.DEFINE_string("out", "out/bench_serve.json", "JSON output (jaxserve logs in <out>.logs/)")
flags.DEFINE_integer("seed", None, "prompt seed (default: fresh entropy, so no prompt is cached from earlier runs)")
# Workload shape (issue 14's defaults).
flags.DEFINE_integer("cold_len", 544, "cold TTFT prompt tokens")
flags.DEFINE_integer("prefix_len", 512, "shared prefix tokens (cached TTFT, bursts)")
flags.DEFINE_integer("suffix_len", 32, "new tokens after the shared prefix")
flags.DEFINE_integer("burst", 8, "concurrent requests of a burst")
flags.DEFINE_integer("ttft_max_tokens", 4, "new tokens of the TTFT requests")
flags.DEFINE_list("decode_batches", ["8", "32"], "concurrent requests of the decode workloads")
flags.DEFINE_bool("decode_only", False, "run only the decode workloads (served TPOT vs the offline reference)")
UNITS = ("cold_ttft", "cached_ttft", "bursts", "decode")
flags.DEFINE_multi_enum("units", list(UNITS), UNITS, "workload units to run (e.g. --units=bursts with more --repeats "
                        "for an A/B of one row); --decode_only means --units=decode")
flags.DEFINE_integer("decode_prompt_len", 32, "prompt tokens of a decode request")
flags.DEFINE_integer("decode_tokens", 64, "new tokens of a decode request")
flags.DEFINE_float("request_timeout_s", 300.0, "deadline of every request (whole stream)")
flags.DEFINE_float("run_timeout_s", 3600.0, "deadline of the whole benchmark after the servers are up")
# jaxserve processes.
flags.DEFINE_integer("http_port", 0, "jaxserve HTTP port (0: a free one)")
flags.DEFINE_integer("grpc_port", 0, "jaxserve scheduler gRPC port (0: a free one)")
flags.DEFINE_integer("page_size", 16, "jaxserve: tokens per KV page")
flags.DEFINE_integer("num_pages", 2048, "jaxserve: KV pages")
flags.DEFINE_integer("max_num_batched_tokens", 1024, "jaxserve: token budget per engine step (the 544-token "
                     "prompt in one step)")
flags.DEFINE_integer("max_num_seqs", 32, "jaxserve: requests per engine step")
flags.DEFINE_integer("max_model_len", 2048, "jaxserve: context length")
flags.DEFINE_string("dtype", None, "jaxserve compute dtype (default: the instance's: float32 on CPU)")
flags.DEFINE_bool("precompile", True, "jaxserve instance compiles every step shape before registering")
flags.DEFINE_bool("async_scheduling", True, "jaxserve instance overlaps host and device (async scheduling)")
flags.DEFINE_list("instance_flags", [], "more flags for the jaxserve instance, as given (e.g. --cut_padding=false)")
flags.DEFINE_list("scheduler_flags", [], "more flags for the jaxserve scheduler, as given (e.g. --step_trace=FILE)")
flags.DEFINE_bool("offline_reference", True, "after the servers stop, time the decode workloads offline "
                  "(`LLM.generate` on the same checkpoint and settings, async scheduling on and off): the served "
                  "TPOT over the offline one is the serving overhead")
flags.DEFINE_bool("offline_interleaved", False, "with --offline_reference: time each decode workload offline (async "
                  "scheduling, in this process, servers idle) right after its served run, so both see the same load "
                  "on a shared machine; prints the per-repeat served / offline TPOT ratios")
flags.DEFINE_float("ready_timeout_s", 1200.0, "how long jaxserve gets to start (load, precompile, register)")
flags.DEFINE_float("shutdown_timeout_s", 10.0, "how long a jaxserve process gets to exit before SIGKILL")
FLAGS = flags.FLAGS

ROOT = Path(__file__).resolve().parents[2]  # the repository (jaxserve/launch/ -> ../..)
MIN_MAP_COUNT = 262144  # vm.max_map_count that fits --precompile of the default shapes (see max_map_count())
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 of the test tokenizer; prompts use ids from 3 on


# ------------------------------------------------------------------------------------------------ checkpoint
def make_checkpoint(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Issue 14's random Llama in bfloat16 plus a word-level tokenizer both engines read (module docstring)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = 8192
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=128, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()  # config.json then records the bf16 dtype
    model.save_pretrained(folder, safe_serialization=True)
    words = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    words.update({f"t{i}": i for i in range(len(SPECIAL_TOKENS), vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>", model_max_length=cfg.max_position_embeddings)
    fast.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------ workloads
class Workloads:
    def __init__(self, session, rng, vocab: int):
        self.session, self.rng, self.vocab = session, rng, vocab

    def _prompt(self, n):
        return random_prompt(self.rng, n, self.vocab)

    async def _one(self, ep, prompt, max_tokens):
        r = await stream_completion(self.session, ep, prompt, max_tokens, FLAGS.request_timeout_s)
        if r.completion_tokens is not None and r.completion_tokens != max_tokens:
            logging.warning("%s: %d tokens instead of %d", ep.name, r.completion_tokens, max_tokens)
        return r

    async def _many(self, ep, prompts, max_tokens):
        return await asyncio.gather(*(self._one(ep, p, max_tokens) for p in prompts))

    async def cold_ttft(self, ep) -> dict:
        r = await self._one(ep, self._prompt(FLAGS.cold_len), FLAGS.ttft_max_tokens)
        return {"cold_ttft_s": r.ttft_s, "requests": {"cold": [r.to_json()]}}

    async def cached_ttft(self, ep) -> dict:
        prefix = self._prompt(FLAGS.prefix_len)
        prime = await self._one(ep, prefix + self._prompt(FLAGS.suffix_len), FLAGS.ttft_max_tokens)
        r = await self._one(ep, prefix + self._prompt(FLAGS.suffix_len), FLAGS.ttft_max_tokens)
        return {"cached_ttft_s": r.ttft_s, "requests": {"prime": [prime.to_json()], "cached": [r.to_json()]}}

    async def bursts(self, ep) -> dict:
        prefix = self._prompt(FLAGS.prefix_len)
        cold = await self._many(ep, [prefix + self._prompt(FLAGS.suffix_len) for _ in range(FLAGS.burst)],
                                FLAGS.ttft_max_tokens)
        primed = await self._many(ep, [prefix + self._prompt(FLAGS.suffix_len) for _ in range(FLAGS.burst)],
                                  FLAGS.ttft_max_tokens)
        return {"burst_cold_ttft_p50_s": statistics.median(r.ttft_s for r in cold),
                "burst_primed_ttft_p50_s": statistics.median(r.ttft_s for r in primed),
                "requests": {"burst_cold": [r.to_json() for r in cold],
                             "burst_primed": [r.to_json() for r in primed]}}

    async def decode(self, ep, batch: int) -> dict:
        rs = await self._many(ep, [self._prompt(FLAGS.decode_prompt_len) for _ in range(batch)],
                              FLAGS.decode_tokens)
        s = decode_stats(rs)
        return {f"decode_b{batch}_tok_s": s["tok_s"], f"decode_b{batch}_tpot_p50_s": s["tpot_p50_s"],
                "detail": {f"decode_b{batch}": s}, "requests": {f"decode_b{batch}": [r.to_json() for r in rs]}}

    def units(self):
        """(name, coroutine factory) of every workload unit, in order; a burst unit is cold then primed."""
        wanted = {"decode"} if FLAGS.decode_only else set(FLAGS.units)
        units = [(name, fn) for name, fn in (("cold_ttft", self.cold_ttft), ("cached_ttft", self.cached_ttft),
                                             ("bursts", self.bursts)) if name in wanted]
        if "decode" in wanted:
            for b in map(int, FLAGS.decode_batches):
                units.append((f"decode_b{b}", lambda ep, b=b: self.decode(ep, b)))
        return units


async def run_benchmark(endpoints: list[Endpoint], session, rng, vocab: int, offline=None,
                        pids: dict[str, int] | None = None) -> dict:
    """offline: an `OfflineDecode` run right after each served decode unit (--offline_interleaved). pids: the
    jaxserve processes (name -> pid) whose CPU time per generated token each decode unit records, beside this
    process's (the client's; offline: the whole engine's)."""
    w = Workloads(session, rng, vocab)
    cpu: dict[str, list[float]] = {}  # "b{batch} {process}" -> CPU ms per generated token, per repeat
    rows = {ep.name: {} for ep in endpoints}
    raw = {ep.name: [] for ep in endpoints}
    paired: dict[str, list[float]] = {}  # batch -> served / offline TPOT per repeat (--offline_interleaved)
    # Same weights, same greedy tokens? (Informational: jaxserve computes in f32 on CPU, a bf16 engine may pick
    # another argmax where a random model's logits nearly tie.)
    probe = random_prompt(rng, 32, vocab)
    texts = {ep.name: (await stream_completion(session, ep, probe, 16, FLAGS.request_timeout_s)).text.split()
             for ep in endpoints}
    agree = None
    if len(endpoints) > 1:
        a, b = (texts[ep.name] for ep in endpoints[:2])
        agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        print(f"greedy probe: the first {agree} of 16 tokens agree ({endpoints[0].name}: {' '.join(a[:6])} ...; "
              f"{endpoints[1].name}: {' '.join(b[:6])} ...)", flush=True)
    if FLAGS.warmup:
        for ep in endpoints:
            t0 = time.perf_counter()
            for _, fn in w.units():
                await fn(ep)
            print(f"warm-up of {ep.name}: {time.perf_counter() - t0:.1f} s", flush=True)
    for rep in range(FLAGS.repeats):
        for unit, fn in w.units():
            for ep in endpoints:  # A B: every unit on each engine in turn
                procs = dict(pids or {}, client=None) if ep is endpoints[0] and unit.startswith("decode_b") else {}
                await asyncio.sleep(FLAGS.settle_s)
                before = {name: cpu_seconds(pid) for name, pid in procs.items()}
                res = await fn(ep)
                if procs:
                    batch = int(unit.removeprefix("decode_b"))
                    for name, pid in procs.items():
                        cpu.setdefault(f"b{batch} {name}", []).append(
                            (cpu_seconds(pid) - before[name]) * 1e3 / (batch * FLAGS.decode_tokens))
                raw[ep.name].append(dict(repeat=rep, unit=unit, **res))
                for k, v in res.items():
                    if k not in ("requests", "detail"):
                        rows[ep.name].setdefault(k, []).append(v)
                summary = ", ".join(f"{k}={v * (1 if k.endswith('tok_s') else 1e3):.1f}"
                                    for k, v in res.items() if k not in ("requests", "detail"))
                print(f"repeat {rep} {unit:12s} {ep.name:10s} {summary}", flush=True)
            if offline is not None and unit.startswith("decode_b"):
                batch = int(unit.removeprefix("decode_b"))
                await asyncio.sleep(FLAGS.settle_s)
                t0 = cpu_seconds()
                res = offline.decode(batch)
                cpu.setdefault(f"b{batch} offline", []).append(
                    (cpu_seconds() - t0) * 1e3 / (batch * FLAGS.decode_tokens))
                for k, v in res.items():
                    rows.setdefault("offline", {}).setdefault(k, []).append(v)
                served = rows[endpoints[0].name][f"decode_b{batch}_tpot_p50_s"][-1]
                ratio = served / res[f"decode_b{batch}_tpot_p50_s"]
                paired.setdefault(f"b{batch}", []).append(ratio)
                print(f"repeat {rep} {unit:12s} {'offline':10s} tpot={res[f'decode_b{batch}_tpot_p50_s'] * 1e3:.2f} "
                      f"ms; served / offline {ratio:.2f}x", flush=True)
    return dict(rows=rows, raw=raw, paired_tpot_ratio=paired, cpu_ms_per_token=cpu, probe=dict(prompt=probe, tokens=texts, agreeing_prefix=agree))


# ------------------------------------------------------------------------------------------------ jaxserve
class JaxserveServer:
    """`jaxserve.launch.scheduler --http_port` + one colocated `jaxserve.launch.instance`, as child processes."""

    def __init__(self, model: str, log_dir: Path):
        self.model = model
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.http_port = FLAGS.http_port or free_port()
        self.grpc_port = FLAGS.grpc_port or free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"

    def _spawn(self, name: str, args: list[str]) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "wb")
        cmd = [sys.executable, "-m", *args]
        logging.info("starting %s: %s", name, " ".join(cmd))
        try:
            p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 preexec_fn=die_with_parent)
        finally:
            log.close()
        self.procs.append((name, p))

    def start(self) -> None:
        self._spawn("scheduler", ["jaxserve.launch.scheduler", f"--model={self.model}", "--host=127.0.0.1",
                                  f"--port={self.grpc_port}", f"--http_port={self.http_port}",
                                  f"--max_model_len={FLAGS.max_model_len}", *FLAGS.scheduler_flags])
        inst = ["jaxserve.launch.instance", "--role=colocated", f"--scheduler=127.0.0.1:{self.grpc_port}",
                "--host=127.0.0.1", "--port=0", "--instance_id=bench-0", f"--model={self.model}",
                f"--page_size={FLAGS.page_size}", f"--num_pages={FLAGS.num_pages}",
                f"--max_num_batched_tokens={FLAGS.max_num_batched_tokens}", f"--max_num_seqs={FLAGS.max_num_seqs}",
                f"--max_model_len={FLAGS.max_model_len}", f"--precompile={FLAGS.precompile}",
                f"--async_scheduling={FLAGS.async_scheduling}", "--profile_at_start"]
        if FLAGS.dtype:
            inst.append(f"--dtype={FLAGS.dtype}")
        self._spawn("instance", inst + FLAGS.instance_flags)

    def check_alive(self) -> None:
        for name, p in self.procs:
            if p.poll() is not None:
                tail = self.log_tail(name)
                hint = ""
                if "allocate" in tail and "memory" in tail.lower():
                    hint = (f"\n(LLVM could not map memory: XLA:CPU keeps ~350 memory mappings per compiled step "
                            f"shape, so --precompile of a few hundred shapes passes vm.max_map_count = "
                            f"{max_map_count()}; raise it (sysctl -w vm.max_map_count=262144) or lower "
                            f"--max_num_batched_tokens / --max_model_len)")
                raise RuntimeError(f"jaxserve {name} exited with code {p.returncode}; last lines of its log "
                                   f"({self.log_dir / (name + '.log')}):\n{tail}{hint}")

    def log_tail(self, name: str, n: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""

    async def wait_ready(self, session) -> str:
        """Waits until /health is 200 and /v1/models lists a model; returns its id."""
        deadline = time.monotonic() + FLAGS.ready_timeout_s
        t0 = time.monotonic()
        while True:
            self.check_alive()
            with contextlib.suppress(Exception):
                status, _ = await get_json(session, self.url + "/health", 2.0)
                if status == 200:
                    status, models = await get_json(session, self.url + "/v1/models", 2.0)
                    ids = [m["id"] for m in models.get("data", [])] if status == 200 else []
                    if ids:
                        print(f"jaxserve ready after {time.monotonic() - t0:.0f} s at {self.url} (model {ids[0]})",
                              flush=True)
                        return ids[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"jaxserve not ready within {FLAGS.ready_timeout_s:g} s; instance log:\n"
                                   f"{self.log_tail('instance')}")
            await asyncio.sleep(1.0)

    def stop(self) -> None:
        """SIGTERM the instance, then the scheduler (so the instance can deregister); SIGKILL a process still
        there after shutdown_timeout_s."""
        for name, p in reversed(self.procs):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
            try:
                p.wait(FLAGS.shutdown_timeout_s)
            except subprocess.TimeoutExpired:
                logging.warning("jaxserve %s (pid %d) did not exit in %g s: killing it", name, p.pid,
                                FLAGS.shutdown_timeout_s)
                p.kill()
                p.wait()


def max_map_count() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    return None


def _git_rev() -> str | None:
    with contextlib.suppress(Exception):
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    return None


async def amain() -> dict:
    import aiohttp
    import numpy as np

    model = str(Path(FLAGS.model).resolve())
    config = json.loads((Path(model) / "config.json").read_text())
    vocab = int(config["vocab_size"])
    seed = FLAGS.seed if FLAGS.seed is not None else int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    out = Path(FLAGS.out)
    server = JaxserveServer(model, out.parent / (out.name + ".logs"))
    result = dict(machine=platform.node(), cpus=os.cpu_count(), jaxserve_rev=_git_rev(), seed=seed,
                  loadavg_start=os.getloadavg(), model=model,
                  config={k: FLAGS[k].value for k in (
                      "repeats", "warmup", "cold_len", "prefix_len", "suffix_len", "burst", "ttft_max_tokens",
                      "decode_batches", "decode_prompt_len", "decode_tokens", "page_size", "num_pages",
                      "max_num_batched_tokens", "max_num_seqs", "max_model_len", "dtype", "precompile",
                      "async_scheduling", "offline_reference", "other_extra_body")})
    connector = aiohttp.TCPConnector(limit=0)
    # SIGTERM cancels the run like Ctrl-C does, so the finally below stops the jaxserve processes.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            endpoints = []
            if FLAGS.other_url:  # fail fast before the slow jaxserve start
                other = Endpoint(FLAGS.other_name, FLAGS.other_url.rstrip("/").removesuffix("/v1"),
                                 FLAGS.other_model, json.loads(FLAGS.other_extra_body))
                other.model, result["other"] = await wait_other(session, other)
            maps = max_map_count()
            if FLAGS.precompile and maps is not None and maps < MIN_MAP_COUNT:
                logging.warning("vm.max_map_count is %d: --precompile of this many step shapes can exhaust it on "
                                "XLA:CPU (~350 mappings per shape; 1024 tokens x 2048 context is ~290 shapes): "
                                "sysctl -w vm.max_map_count=%d", maps, MIN_MAP_COUNT)
            result["vm_max_map_count"] = maps
            offline = None
            if _offline_reference() and FLAGS.offline_interleaved:  # before the servers (it blocks the loop)
                offline = make_offline(model, rng, vocab, FLAGS.async_scheduling)
            t0 = time.monotonic()
            server.start()
            jax_ep = Endpoint("jaxserve", server.url, await server.wait_ready(session), {"ignore_eos": True})
            result["jaxserve_start_s"] = time.monotonic() - t0
            endpoints.append(jax_ep)
            if FLAGS.other_url:
                endpoints.append(other)
            result["endpoints"] = [dataclasses.asdict(e) for e in endpoints]
            print(f"load average before measuring: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
            bench = await asyncio.wait_for(run_benchmark(endpoints, session, rng, vocab, offline,
                                                         {name: p.pid for name, p in server.procs}),
                                           FLAGS.run_timeout_s)
            server.check_alive()
            result.update(bench)
    finally:
        server.stop()
    if _offline_reference() and not FLAGS.offline_interleaved:
        for name, overlap in (("offline", True), ("offline sync", False)):
            result["rows"][name] = offline_decode(model, rng, vocab, overlap)
    result["loadavg_end"] = os.getloadavg()
    return result


def _offline_reference() -> bool:
    return FLAGS.offline_reference and (FLAGS.decode_only or "decode" in FLAGS.units)


def make_offline(model: str, rng, vocab: int, async_scheduling: bool) -> OfflineDecode:
    return OfflineDecode(model, rng, vocab, batches=map(int, FLAGS.decode_batches), prompt_len=FLAGS.decode_prompt_len,
                         new_tokens=FLAGS.decode_tokens, async_scheduling=async_scheduling, page_size=FLAGS.page_size,
                         num_pages=FLAGS.num_pages, max_num_batched_tokens=FLAGS.max_num_batched_tokens,
                         max_num_seqs=FLAGS.max_num_seqs, max_model_len=FLAGS.max_model_len, dtype=FLAGS.dtype)


def offline_decode(model: str, rng, vocab: int, async_scheduling: bool) -> dict:
    """The decode workloads offline after the servers stopped: per repeat tok/s (tokens after each first /
    (last - first token)) and median TPOT."""
    offline = make_offline(model, rng, vocab, async_scheduling)  # compiles
    rows: dict[str, list] = {}
    for _ in range(FLAGS.repeats):
        for batch in map(int, FLAGS.decode_batches):
            for k, v in offline.decode(batch).items():
                rows.setdefault(k, []).append(v)
    print(f"offline ({'async' if async_scheduling else 'sync'}): "
          + ", ".join(f"{k}={statistics.median(v) * (1 if k.endswith('tok_s') else 1e3):.2f}" for k, v in rows.items()),
          flush=True)
    return rows


def main(argv):
    del argv
    if FLAGS.make_checkpoint:
        folder = make_checkpoint(FLAGS.make_checkpoint)
        print(f"wrote {folder}")
        return
    if not FLAGS.model:
        raise app.UsageError("--model (a Hugging Face folder) is required (or --make_checkpoint=DIR)")

    result = asyncio.run(amain())
    metrics = metric_list(FLAGS.decode_batches)
    table = format_table(result["rows"], metrics, base="jaxserve")
    other = result.get("other", {})
    print(f"\nServed over the OpenAI API, {result['cpus']} CPUs, model {result['model']}; median of "
          f"{FLAGS.repeats} A/B repeats; TTFT/TPOT lower is better, tok/s higher; ratios are jaxserve / other"
          + (f"; {FLAGS.other_name} {other.get('version', '')}" if other else "") + "\n")
    print(table)
    for b, ratios in result.get("paired_tpot_ratio", {}).items():
        print(f"served / offline TPOT {b}, paired per repeat: median {statistics.median(ratios):.2f}x "
              f"({', '.join(f'{r:.2f}' for r in ratios)})")
    for key, values in result.get("cpu_ms_per_token", {}).items():
        print(f"CPU ms per generated token, {key}: median {statistics.median(values):.3f}")
    la0, la1 = result["loadavg_start"], result["loadavg_end"]
    print(f"\nload average: start {la0[0]:.2f} {la0[1]:.2f} {la0[2]:.2f}, end {la1[0]:.2f} {la1[1]:.2f} {la1[2]:.2f}")
    result["table"] = table
    out = Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
