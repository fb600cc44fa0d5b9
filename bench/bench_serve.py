"""`prefix-attn serve` over HTTP on this CPU: static batching against one request at a time.

Two servers of the same model and prefixes run as subprocesses on free ports: **batched**
(`--batch-size` the largest C, `--batch-wait-ms` its default) and **one at a time**
(`--batch-size 1`, the baseline). For each C, C client threads (urllib, one request in flight
each) send requests until a round's N are answered; each request names one of several prefixes
at random (prompt prefixes of different lengths and a PEFT prefix-tuning adapter, mixed in one
batch) and one of a few prompts, greedy, fixed `max_tokens`. Measured per round: requests/s,
generated tokens/s (the answers' `usage.completion_tokens`) and each request's latency (sent
to answer read); the two servers' rounds interleaved, their order alternated, so load on the
shared machine hits both alike. Speedup = batched requests/s / one-at-a-time requests/s, medians
of the rounds of one run.

Every answer is checked before it counts: a 200, and the text, finish_reason and token count
`prefix-attn generate` gives for the same request (computed once, in this process, before the
servers start); anything else ends the run with exit status 1.

Writes <out>.json and <out>.md (default bench/results/serve_cpu.*).
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from record import cpu_environment, loadavg, parser, provenance, rendered, table, write_results  # noqa: E402

# the served model: a Llama over prefix-attn's byte vocabulary, large enough that a step's
# compute (not only Python's per-step work) shows
MODEL = dict(hidden=512, layers=4, heads=8, kv_heads=2)
QUICK_MODEL = dict(hidden=32, layers=1, heads=4, kv_heads=2)
# prompt prefixes: name -> characters (one token each: byte vocabulary)
PREFIXES = {"short": 32, "medium": 128, "long": 384}
QUICK_PREFIXES = {"short": 8, "long": 24}
ADAPTER = ("tuned", 16)  # a prefix-tuning adapter: name, virtual tokens
PROMPTS = ["How do I reset my password?", "Summarise this:", "Why is the sky blue?",
           "Translate 'good morning' into French.", "2 + 2 =", "Write a haiku about tea.",
           "What does HTTP 404 mean?", "List three prime numbers."]
SETTINGS = dict(concurrency=[1, 4, 16], per_client=4, min_requests=16, max_tokens=16)
QUICK_SETTINGS = dict(concurrency=[1, 4], per_client=1, min_requests=3, max_tokens=4)
MODES = ("batched", "one at a time")


class BenchError(Exception):
    """A server that did not start, or an answer that was an error or not generate's."""


def _prefix_text(name: str, chars: int) -> str:
    """A deterministic prompt of ``chars`` characters for prefix ``name``."""
    base = f"You are the {name} assistant. Answer in plain words and stay on topic. "
    return (base * (chars // len(base) + 1))[:chars]


def make_fixtures(folder: str, quick: bool = False) -> list:
    """The model folder and the adapter under ``folder``; returns the model and prefix options
    both servers and the reference `prefix-attn generate` take."""
    import torch

    from prefix_attn import tiny
    from prefix_attn.bank import PrefixBank

    cfg = QUICK_MODEL if quick else MODEL
    model = tiny.tiny_model("llama", seed=0, vocab_size=tiny.ByteTokenizer.vocab_size,
                            max_position_embeddings=1024, **cfg)
    model_dir, adapter_dir = os.path.join(folder, "model"), os.path.join(folder, "adapter")
    model.save_pretrained(model_dir)
    tiny.ByteTokenizer().save_pretrained(model_dir)
    bank = PrefixBank.attach(model)
    g = torch.Generator().manual_seed(1)
    shape = (bank.num_layers, bank.num_kv_heads, ADAPTER[1], bank.head_dim)
    bank.add(ADAPTER[0], torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    bank.save_peft(ADAPTER[0], adapter_dir)
    options = ["--model", model_dir, "--adapter", f"{ADAPTER[0]}={adapter_dir}"]
    for name, chars in (QUICK_PREFIXES if quick else PREFIXES).items():
        options += ["--prompt-prefix", f"{name}={_prefix_text(name, chars)}"]
    return options


def prefix_names(quick: bool = False) -> list:
    return [ADAPTER[0], *(QUICK_PREFIXES if quick else PREFIXES)]


def reference(options: list, names: list, max_tokens: int, folder: str) -> dict:
    """(prefix, prompt) -> (text, completion tokens, finish_reason) by `prefix-attn generate`."""
    from prefix_attn import serve

    pairs = [(n, p) for n in names for p in PROMPTS]
    src, out = os.path.join(folder, "requests.jsonl"), os.path.join(folder, "answers.jsonl")
    with open(src, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"prefix": n, "prompt": p}) + "\n" for n, p in pairs)
    if serve.main(["-i", src, "-o", out, "--no-progress", "--max-new-tokens", str(max_tokens), *options]) != 0:
        raise BenchError("prefix-attn generate failed on the benchmark's requests")
    with open(out, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return {pair: (r["completion"], r["num_tokens"], r["finish_reason"]) for pair, r in zip(pairs, rows)}


class ServerProcess:
    """`python -m prefix_attn.serve_http ... --port 0 --quiet` in a subprocess; its address read
    from the line it writes once listening; its stderr kept (said when it fails)."""

    def __init__(self, options: list, timeout: float = 300):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, "-m", "prefix_attn.serve_http", "--port", "0", "--quiet", *options]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                     env=env, cwd=ROOT)
        self.lines: list = []
        self._listening = threading.Event()
        self.url = None
        threading.Thread(target=self._read, daemon=True).start()
        if not self._listening.wait(timeout) or self.url is None:
            self.stop()
            raise BenchError("the server did not start: " + "".join(self.lines[-20:]).strip())

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"listening on (http://\S+:\d+)", line)
            if m and self.url is None:
                self.url = m.group(1)
                self._listening.set()
        self._listening.set()  # ended before listening

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def post(url: str, body: dict, timeout: float = 300) -> tuple:
    """(status, JSON answer) of a POST to ``url``."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def checked(status: int, body: dict, request: dict, expected: tuple) -> tuple:
    """The answer's (text, completion tokens, finish_reason); raises BenchError unless it is a
    200 of ``expected`` (generate's for the request)."""
    if status != 200 or not isinstance(body, dict) or "choices" not in body:
        raise BenchError(f"request {request} answered {status}: {body}")
    got = (body["choices"][0]["text"], body["usage"]["completion_tokens"], body["choices"][0]["finish_reason"])
    if got != tuple(expected):
        raise BenchError(f"request {request}: the server answered {got}, generate {tuple(expected)}")
    return got


def draw(names: list, n: int, seed: int) -> list:
    """``n`` requests, each a prefix and a prompt drawn at random."""
    rng = random.Random(seed)
    return [(rng.choice(names), rng.choice(PROMPTS)) for _ in range(n)]


def drive(url: str, pairs: list, clients: int, max_tokens: int, expected: dict, seen: dict) -> dict:
    """``clients`` threads send ``pairs`` (one request in flight each) and check every answer
    (kept in ``seen``, by pair); the round's wall seconds, latencies (s) and completion tokens."""
    lock, todo = threading.Lock(), list(enumerate(pairs))
    latencies, tokens, errors = [0.0] * len(pairs), [0] * len(pairs), []

    def client():
        while not errors:
            with lock:
                if not todo:
                    return
                i, (name, prompt) = todo.pop(0)
            request = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
            t0 = time.perf_counter()
            try:
                status, body = post(url + "/v1/completions", request)
                latencies[i] = time.perf_counter() - t0
                got = checked(status, body, request, expected[(name, prompt)])
                tokens[i] = got[1]
                seen[(name, prompt)] = got
            except Exception as exc:  # an error or a wrong answer ends the run
                errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise BenchError(str(errors[0]))
    return {"wall_s": wall, "latencies": latencies, "tokens": sum(tokens)}


def percentile(values: list, q: float) -> float:
    """The nearest-rank ``q`` quantile (0 < q <= 1)."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


def summary(rounds: list) -> dict:
    """Medians over the rounds of requests/s and tokens/s; p50/p95 of all their latencies."""
    lat = [x for r in rounds for x in r["latencies"]]
    return {"req_s": statistics.median(len(r["latencies"]) / r["wall_s"] for r in rounds),
            "tok_s": statistics.median(r["tokens"] / r["wall_s"] for r in rounds),
            "p50_ms": 1e3 * percentile(lat, 0.5), "p95_ms": 1e3 * percentile(lat, 0.95),
            "requests": len(lat), "rounds_req_s": [len(r["latencies"]) / r["wall_s"] for r in rounds]}


def measure(servers: dict, names: list, settings: dict, reps: int, expected: dict, seen: dict) -> list:
    """Rows per C: each mode's summary over ``reps`` rounds, interleaved, the order alternated;
    ``seen[mode]`` gets each server's answers by (prefix, prompt)."""
    top = max(settings["concurrency"])
    for mode, url in servers.items():  # warm-up: the first generate calls of a process are slow
        drive(url, draw(names, top, seed=-1), top, settings["max_tokens"], expected, seen.setdefault(mode, {}))
    rounds = {(c, m): [] for c in settings["concurrency"] for m in MODES}
    for rep in range(reps):
        for c in settings["concurrency"]:
            pairs = draw(names, max(settings["per_client"] * c, settings["min_requests"]), seed=1000 * rep + c)
            for mode in (MODES if (rep + c) % 2 == 0 else MODES[::-1]):
                rounds[(c, mode)].append(drive(servers[mode], pairs, c, settings["max_tokens"], expected,
                                               seen[mode]))
    rows = []
    for c in settings["concurrency"]:
        modes = {m: summary(rounds[(c, m)]) for m in MODES}
        rows.append({"C": c, "modes": modes, "speedup": modes["batched"]["req_s"] / modes["one at a time"]["req_s"]})
        print({"C": c, **{m: round(s["req_s"], 2) for m, s in modes.items()}}, flush=True)
    return rows


def markdown(res: dict) -> str:
    env, cfg, s = res["environment"], res["model"], res["settings"]
    prefixes = ", ".join(f"{n} {t}" for n, t in res["prefix_tokens"].items())
    caption = (f"`prefix-attn serve` over HTTP, C concurrent clients (one request in flight each), each "
               f"request naming one of {len(res['prefix_tokens'])} prefixes at random (tokens: {prefixes}; "
               f"`tuned` a prefix-tuning adapter, the others --prompt-prefix) and one of "
               f"{len(PROMPTS)} prompts, greedy, max_tokens {s['max_tokens']}; Llama-shaped, hidden "
               f"{cfg['hidden']}, {cfg['layers']} layers, {cfg['heads']}/{cfg['kv_heads']} heads, byte "
               f"vocabulary, fp32, {env['cpu']}, {env['threads']} threads, {provenance(env)}, a shared "
               f"machine; batched: --batch-size {s['batch_size']} --batch-wait-ms {s['batch_wait_ms']:g}, "
               f"one at a time: --batch-size 1; medians of {res['reps']} interleaved rounds per C, "
               f"latency percentiles over all their requests; every answer checked equal to "
               f"`prefix-attn generate`'s ({res['checked']} answers); speedup = batched / one-at-a-time "
               "requests/s, same run.")
    header = ["C", "requests per round", "batched req/s", "batched tok/s", "batched p50 / p95 ms",
              "one at a time req/s", "one at a time tok/s", "one at a time p50 / p95 ms", "speedup"]
    rows = []
    for r in res["rows"]:
        b, o = r["modes"]["batched"], r["modes"]["one at a time"]
        rows.append([r["C"], b["requests"] // res["reps"], f"{b['req_s']:.1f}", f"{b['tok_s']:.0f}",
                     f"{b['p50_ms']:.0f} / {b['p95_ms']:.0f}", f"{o['req_s']:.1f}", f"{o['tok_s']:.0f}",
                     f"{o['p50_ms']:.0f} / {o['p95_ms']:.0f}", f"{r['speedup']:.2f}x"])
    return table(caption, header, rows)


def run(quick: bool, reps: int) -> dict:
    """Fixtures, generate's answers, both servers, the rounds; the result (answers included)."""
    settings = dict(QUICK_SETTINGS if quick else SETTINGS)
    settings.update(batch_size=max(settings["concurrency"]), batch_wait_ms=5.0)
    names = prefix_names(quick)
    with tempfile.TemporaryDirectory(prefix="prefix_attn_bench_serve_") as folder:
        options = make_fixtures(folder, quick)
        expected = reference(options, names, settings["max_tokens"], folder)
        common = options + ["--max-new-tokens", str(settings["max_tokens"]),
                            "--batch-wait-ms", str(settings["batch_wait_ms"])]
        procs = {}
        try:
            for mode, size in zip(MODES, (settings["batch_size"], 1)):
                procs[mode] = ServerProcess(common + ["--batch-size", str(size)])
            seen: dict = {}
            rows = measure({m: p.url for m, p in procs.items()}, names, settings, reps, expected, seen)
        finally:
            for p in procs.values():
                p.stop()
    checked_count = sum(s["requests"] for r in rows for s in r["modes"].values())
    prefix_tokens = {ADAPTER[0]: ADAPTER[1], **(QUICK_PREFIXES if quick else PREFIXES)}
    # what each server answered, by request (checked equal to generate's: `checked`)
    answers = {mode: [{"prefix": n, "prompt": p, "text": t, "completion_tokens": k, "finish_reason": f}
                      for (n, p), (t, k, f) in sorted(got.items())] for mode, got in seen.items()}
    return {"model": QUICK_MODEL if quick else MODEL, "prefix_tokens": prefix_tokens, "settings": settings,
            "reps": reps, "rows": rows, "checked": checked_count, "answers": answers}


def main(argv=None) -> dict:
    p = parser(__doc__, "serve_cpu", reps=3)
    p.add_argument("--quick", action="store_true", help="a tiny model, C 1 and 4, few requests (smoke run)")
    a = p.parse_args(argv)
    res = rendered(a, markdown)
    if res is not None:
        return res
    load_before = loadavg()
    try:
        res = run(a.quick, a.reps)
    except BenchError as exc:
        raise SystemExit(f"bench_serve: {exc}") from None
    res = {"environment": cpu_environment(load_before), **res}
    write_results(a.out, res, markdown(res), smoke=a.quick)
    return res


if __name__ == "__main__":
    main()
