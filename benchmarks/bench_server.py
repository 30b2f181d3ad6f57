"""nesso-mlx serve vs mlx_lm.server on the same weights, in one run: throughput and time to first token
under 1, 4 and 8 concurrent clients.

    python benchmarks/bench_server.py                                  # the SmolLM2 test fixture
    python benchmarks/bench_server.py --model PATH --clients 1,4,8 --requests 4 --max-tokens 64
    python benchmarks/bench_server.py --workload tool --clients 1               # forced tool calls
    python benchmarks/bench_server.py --apis --servers nesso-mlx --clients 1    # + a line per API

Both servers run at once, each in its own process on a loopback port, on the same model folder
(weights as stored). Each client sends `--requests` streaming chat requests one after another
(greedy, `--max-tokens` each, every prompt different, `stream_options.include_usage` for the
token counts); the clients start together. For each concurrency level the servers take turns, so
machine drift affects both alike. Reported per level: aggregate generated tokens/s (all tokens /
wall time), time to first token p50 and p95 (request sent -> first content), per-stream decode
tokens/s, and the ratios nesso-mlx / mlx-lm (> 1: nesso-mlx has more throughput; for TTFT, > 1
means nesso-mlx takes longer). mlx_lm.server batches the decode steps of concurrent requests;
nesso-mlx serve batches them too (continuous batching, `generation.Decoder`).

`--workload tool` sends tool-call requests instead (the `nesso-mlx bench` tool workload's tool and
text, `tool_choice` "required"): nesso-mlx constrains the call and, for a request decoding alone,
verifies its grammar-forced tokens in one pass (prompt lookup); mlx_lm.server decodes freely.

`--apis` adds a line per API of nesso-mlx serve (Chat Completions, Completions, Responses,
Anthropic Messages): the same prompt and the same number of greedy tokens through each,
non-streaming, the APIs taking turns request by request. The per-request noise (several percent)
hides what the translation costs, so each API's protocol layer is also timed in process on the
same prompt and tokens (`translation_costs`: the body parsed, validated and translated to the
core request, and the reply built from the same chunks), and shown as a share of its request.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from server_fixture import ServerProcess, free_port  # noqa: E402

SUBJECTS = ["a cat", "a lighthouse keeper", "a robot", "a baker", "a river", "a violinist", "a fox", "a train driver"]
PLACES = ["in Rome", "on the Moon", "in a small village", "under the sea", "in Milan", "in a forest"]


def prompts(n: int) -> list[str]:
    return [
        f"Write a long story about {SUBJECTS[i % len(SUBJECTS)]} {PLACES[(i // len(SUBJECTS)) % len(PLACES)]}." for i in range(n)
    ]


def start(kind: str, model: str) -> ServerProcess:
    if kind == "nesso-mlx":
        return ServerProcess.nesso(model, "--max-concurrency", "8")
    port = free_port()
    command = [sys.executable, "-m", "mlx_lm.server", "--model", model, "--port", str(port), "--log-level", "WARNING"]
    return ServerProcess(command, port)


def tool_prompts(n: int) -> list[str]:
    from nesso_mlx.bench import TOOL_MESSAGES

    return [f"({i + 1}) " + TOOL_MESSAGES[0]["content"] for i in range(n)]


def one_request(base_url: str, prompt: str, max_tokens: int, tools: bool = False) -> dict:
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    first = None
    tokens = 0
    extra = {}
    if tools:
        from nesso_mlx.bench import TOOL

        extra = {"tools": [TOOL], "tool_choice": "required"}
    stream = client.chat.completions.create(
        model="default_model",
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        **extra,
    )
    for chunk in stream:
        delta = chunk.choices[0].delta if chunk.choices else None
        if first is None and delta is not None and (delta.content or delta.tool_calls):
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    first = first or end
    return {
        "ttft": first - t0,
        "tokens": tokens,
        "decode_tps": (tokens - 1) / (end - first) if tokens > 1 and end > first else 0.0,
    }


def level(base_url: str, clients: int, requests: int, max_tokens: int, texts: list[str], tools: bool = False) -> dict:
    results: list[dict] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(c: int) -> None:
        barrier.wait()
        for r in range(requests):
            result = one_request(base_url, texts[c * requests + r], max_tokens, tools)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft"] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": sum(r["tokens"] for r in results),
        "wall_s": wall,
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p95_s": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
        "stream_decode_tps": statistics.median(r["decode_tps"] for r in results),
    }


API_BODIES = {
    "chat": ("/v1/chat/completions", lambda p, n: {"messages": [{"role": "user", "content": p}], "max_tokens": n}),
    "completions": ("/v1/completions", lambda p, n: {"prompt": p, "max_tokens": n}),
    "responses": ("/v1/responses", lambda p, n: {"input": p, "max_output_tokens": n, "store": False}),
    "messages": ("/v1/messages", lambda p, n: {"messages": [{"role": "user", "content": p}], "max_tokens": n}),
}


def api_tokens(api: str, reply: dict) -> int:
    usage = reply["usage"]
    return usage["completion_tokens"] if api in ("chat", "completions") else usage["output_tokens"]


class Chunk:
    """What the core's reply reads of a generated chunk (`stream_generate`'s chunk, duck-typed)."""

    def __init__(self, text: str, token: int, generation_tokens: int) -> None:
        self.text, self.token, self.generation_tokens, self.logprobs = text, token, generation_tokens, None


def translation_costs(model_path: str, max_tokens: int, repeat: int = 200) -> dict[str, dict]:
    """Each API's protocol layer, timed in process (median of `repeat`, in ms), on the same prompt
    and the same `max_tokens` tokens of reply: "parse_ms" is the body parsed (`parse_json_body`),
    validated and translated to the core request; "reply_ms" the reply built from the core's
    events as the server does not streaming (its JSON written), "stream_ms" streaming (the SSE
    text). The core's own work, the same for every API (templating, tokenizing, the reply events
    from the chunks), is not in them: "core_ms" times the events once, for scale."""
    from nesso_mlx.request import anthropic_messages, chat_completions, completions, responses
    from nesso_mlx.request.core import ChatReply, dumps, usage
    from nesso_mlx.server import parse_json_body
    from nesso_mlx.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(model_path)
    prompt = prompts(1)[0]
    story = "Once upon a time, in a small village by the sea, there lived a cat who loved the lighthouse. " * 8
    detokenizer = tokenizer.detokenizer()
    ids = tokenizer.encode(story, add_special_tokens=False)[:max_tokens]
    chunks = [Chunk(detokenizer.add_token(t), t, i + 1) for i, t in enumerate(ids)]
    window = {"context_window": 8192, "vocab_size": tokenizer.vocab_size}
    ready = {"type": "ready", "prompt_tokens": 40}

    def core_events(stream: bool) -> tuple[list[dict], dict]:
        """chat_job's events for the chunks (as `server_engine.chat_job` makes them)."""
        reply, events = ChatReply(tokenizer, tools=False), []
        for chunk in chunks:
            deltas, entries = reply.add(chunk)
            if stream and (deltas or entries):
                events.append({"type": "delta", "deltas": deltas, "logprobs": entries})
        done = {
            "type": "done",
            "deltas": reply.finish(),
            "finish_reason": reply.finish_reason("length"),
            "message": reply.message(),
            "logprobs": None,
            "usage": usage(40, len(chunks), 0),
            "stop_sequence": None,
        }
        return events, done

    def completion_events(stream: bool) -> tuple[list[dict], dict]:
        events = [{"type": "delta", "index": 0, "text": c.text, "logprobs": None} for c in chunks if c.text] if stream else []
        choice = {"index": 0, "text": "".join(c.text for c in chunks), "logprobs": None, "finish_reason": "length"}
        return events, {"type": "done", "choices": [choice], "usage": usage(40, len(chunks), 0)}

    store = responses.ResponseStore()
    apis = {  # api -> (parse the body, make the builder, the core's events (streamed?), the builder always takes deltas)
        "chat": (
            lambda body: chat_completions.parse_chat_request(body, **window),
            lambda parsed: chat_completions.ChatCompletionStream("m", parsed.include_usage),
            core_events,
            False,
        ),
        "completions": (
            lambda body: completions.parse_completion_request(body, **window),
            lambda parsed: completions.CompletionStream("m", parsed.include_usage),
            completion_events,
            False,
        ),
        "responses": (
            lambda body: responses.parse_responses_request(body, store=store, **window),
            lambda parsed: responses.ResponseStream(parsed, "m"),
            core_events,
            True,
        ),
        "messages": (
            lambda body: anthropic_messages.parse_messages_request(body, **window),
            lambda parsed: anthropic_messages.MessageStream("m"),
            core_events,
            True,
        ),
    }

    def median_ms(function: Callable[[], object]) -> float:
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000

    def measure(parse: Callable, builder: Callable, events_of: Callable, always_deltas: bool, raw: bytes) -> dict:
        parsed = parse(parse_json_body(raw))
        whole, streamed = events_of(always_deltas), events_of(True)

        def reply(events: tuple[list[dict], dict], stream: bool) -> None:
            b = builder(parsed)
            text = b.start(ready)
            for event in events[0]:
                text += b.delta(event)
            text += b.finish(events[1])
            if not stream:
                dumps(b.body())

        return {
            "parse_ms": median_ms(lambda: parse(parse_json_body(raw))),
            "reply_ms": median_ms(lambda: reply(whole, False)),
            "stream_ms": median_ms(lambda: reply(streamed, True)),
        }

    out = {}
    for api, (parse, builder, events_of, always_deltas) in apis.items():
        raw = json.dumps({**API_BODIES[api][1](api_prompt(api, prompt, tokenizer), max_tokens), "temperature": 0}).encode()
        out[api] = measure(parse, builder, events_of, always_deltas, raw)
    out["chat"]["core_ms"] = median_ms(lambda: core_events(True))
    return out


def api_prompt(api: str, prompt: str, tokenizer: Any) -> str:
    """The prompt as `api` takes it: completions takes the chat template's text (so that every API
    sees the same prompt ids, and the model writes the same tokens)."""
    if api != "completions":
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False)


def per_api(base_url: str, max_tokens: int, rounds: int, model: str) -> dict[str, dict]:
    """Each API's time per request for the same prompt and tokens (greedy; the APIs take turns)."""
    from server_fixture import post

    from nesso_mlx.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(model)
    prompt = prompts(1)[0]
    times: dict[str, list[float]] = {api: [] for api in API_BODIES}
    tokens: dict[str, int] = {}
    for _ in range(rounds + 1):  # the first round warms the prompt cache up, and is not counted
        for api, (path, body) in API_BODIES.items():
            t0 = time.perf_counter()
            status, reply = post(
                base_url + path, {**body(api_prompt(api, prompt, tokenizer), max_tokens), "temperature": 0}, timeout=600
            )
            elapsed = time.perf_counter() - t0
            if status != 200:
                raise RuntimeError(f"{api}: HTTP {status}: {reply}")
            tokens[api] = api_tokens(api, reply)
            times[api].append(elapsed)
    return {api: {"tokens": tokens[api], "median_s": statistics.median(t[1:])} for api, t in times.items()}


def probe_batching(model_path: str, batches: list[int], steps: int = 32, context: int = 64) -> list[dict]:
    """What batching the decode steps could buy, at most: nesso-mlx's model decoding B rows at once
    (equal-length caches, greedy, no sampling or constraints), generated tokens/s per batch size."""
    import mlx.core as mx

    from nesso_mlx import load

    model, _ = load(model_path)
    out = []
    for b in batches:
        cache = model.make_cache()
        tokens = mx.array([[100 + (i * 7 + j) % 500 for j in range(context)] for i in range(b)], dtype=mx.int32)
        token = mx.argmax(model(tokens, cache)[:, -1, :], axis=-1)[:, None]
        mx.eval(token)
        t0 = time.perf_counter()
        for _ in range(steps):
            token = mx.argmax(model(token, cache)[:, -1, :], axis=-1)[:, None]
            mx.async_eval(token)
        mx.eval(token)
        out.append({"batch": b, "tokens_per_s": b * steps / (time.perf_counter() - t0)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the SmolLM2 test fixture)")
    parser.add_argument("--clients", default="1,4,8", help="concurrency levels (default 1,4,8)")
    parser.add_argument("--requests", type=int, default=2, help="requests per client at each level (default 2)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per reply (default 32)")
    parser.add_argument("--servers", default="nesso-mlx,mlx-lm", help="which servers (default both)")
    parser.add_argument("--workload", choices=["chat", "tool"], default="chat", help="free stories or forced tool calls")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--apis", action="store_true", help="also time one request through each API of nesso-mlx serve")
    parser.add_argument("--api-rounds", type=int, default=5, help="requests per API for --apis (default 5)")
    parser.add_argument("--probe-batching", action="store_true", help="also time batched decode steps of the bare model")
    args = parser.parse_args()
    if args.model is None:
        from smollm2_fixture import smollm2_path

        args.model = str(smollm2_path())
    levels = [int(c) for c in args.clients.split(",")]
    kinds = args.servers.split(",")
    servers = {kind: start(kind, args.model) for kind in kinds}
    results: dict[str, list[dict]] = {kind: [] for kind in kinds}
    try:
        for server in servers.values():
            server.wait_ready(timeout=300)
        for server in servers.values():  # warm up: kernels, caches, the first request's costs
            one_request(server.url, "Hello!", 4)
        offset = 0
        for clients in levels:
            make = tool_prompts if args.workload == "tool" else prompts
            texts = make(offset + clients * args.requests)[offset:]  # prompts never seen before
            offset += clients * args.requests
            for kind, server in servers.items():
                result = level(server.url, clients, args.requests, args.max_tokens, texts, args.workload == "tool")
                results[kind].append(result)
                print(f"{kind:>9}  {clients} clients: {result['tokens_per_s']:.1f} tokens/s", file=sys.stderr, flush=True)
        apis = (
            per_api(servers["nesso-mlx"].url, args.max_tokens, args.api_rounds, args.model)
            if args.apis and "nesso-mlx" in servers
            else {}
        )
    finally:
        for server in servers.values():
            server.stop()

    what = f"{args.workload} workload, {args.requests} requests per client, {args.max_tokens} tokens each"
    print(f"\nmodel {args.model}; {what}, greedy, streaming\n")
    print("| clients | server | requests | tokens | wall s | tokens/s | TTFT p50 s | TTFT p95 s | per-stream tokens/s |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for i, clients in enumerate(levels):
        for kind in kinds:
            r = results[kind][i]
            print(
                f"| {clients} | {kind} | {r['requests']} | {r['tokens']} | {r['wall_s']:.1f} | {r['tokens_per_s']:.1f} | "
                f"{r['ttft_p50_s']:.2f} | {r['ttft_p95_s']:.2f} | {r['stream_decode_tps']:.1f} |"
            )
    if len(kinds) == 2:
        a, b = kinds
        print(f"\n| clients | tokens/s {a} / {b} | TTFT p50 {a} / {b} |")
        print("| ---: | ---: | ---: |")
        for i, clients in enumerate(levels):
            x, y = results[a][i], results[b][i]
            print(f"| {clients} | {x['tokens_per_s'] / y['tokens_per_s']:.2f} | {x['ttft_p50_s'] / y['ttft_p50_s']:.2f} |")
    if apis:
        costs = translation_costs(args.model, args.max_tokens)
        print(f"\n| nesso-mlx API | tokens | median s per request ({args.api_rounds}) | vs chat |", end="")
        print(" protocol layer ms: parse + reply (streamed) | share of the request |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for api, r in apis.items():
            c = costs[api]
            own = c["parse_ms"] + c["reply_ms"]
            print(
                f"| {api} | {r['tokens']} | {r['median_s']:.3f} | {r['median_s'] / apis['chat']['median_s']:.3f} | "
                f"{c['parse_ms']:.3f} + {c['reply_ms']:.3f} ({c['stream_ms']:.3f}) | {own / 1000 / r['median_s']:.3%} |"
            )
        print(
            f"\n(the core's reply events for the same {args.max_tokens} tokens, shared by chat, Responses and Messages: "
            f"{costs['chat']['core_ms']:.3f} ms)"
        )
        apis = {api: {**r, "translation": costs[api]} for api, r in apis.items()}
    probe = []
    if args.probe_batching:
        probe = probe_batching(args.model, levels)
        print("\n| batch | bare model decode tokens/s (upper bound for a batched server) | vs batch 1 |")
        print("| ---: | ---: | ---: |")
        for p in probe:
            print(f"| {p['batch']} | {p['tokens_per_s']:.1f} | {p['tokens_per_s'] / probe[0]['tokens_per_s']:.2f} |")
    if args.json:
        report = {
            "model": args.model,
            "args": vars(args) | {"json": str(args.json)},
            "results": results,
            "batching_probe": probe,
            "apis": apis,
        }
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
