"""`nesso-mlx bench`: llama-bench style measurements, optionally against mlx-lm on the same weights.

Workloads (each repeated, nesso-mlx and mlx-lm alternating so machine drift affects both alike):

- `pp`: prompt processing, a P-token prompt (prefill tokens/s, time to first token);
- `tg`: text generation, N tokens after a short prompt, never stopping at EOS (decode tokens/s);
- `chat`: an Italian chat request through the whole generation path;
- `extract`: extraction to JSON; nesso-mlx under a JSON schema, mlx-lm free (it has no constraint);
- `tool`: a forced tool call; nesso-mlx with tool_choice "required", mlx-lm free;
- `turn2`: the second turn of a conversation whose first turn is cached (time to first token).

Decode speed of the request workloads counts the tokens each engine generated. In `chat`,
`extract` and `tool` mlx-lm decodes as many tokens as nesso-mlx did in the same repetition (its
EOS ignored, so its "generated" column repeats ours): in `extract` and `tool` it writes freely,
and may stop at once where the grammar carries our reply on; a token's decode cost does not
depend on its text, so the same count compares the same positions. With
`--prompt-lookup` (the default) nesso-mlx uses prompt-lookup decoding there: n-gram drafts, and
under a grammar the tokens it forces (see `speculative.py`).
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

WORKLOADS = ("pp", "tg", "chat", "extract", "tool", "turn2")
TEXT = (
    "Il Consiglio comunale di Città di Castello si è riunito lunedì 14 ottobre alle 18:30 nella sala "
    "Agostini. Presenti 21 consiglieri su 24. La sindaca, Luciana Bassini, ha presentato il bilancio "
    "2025: 48,2 milioni di euro, di cui 3,1 per le scuole e 2,4 per le strade. The meeting ended at "
    "21:05 after a vote of 15 in favour and 6 against. "
)
CHAT = [{"role": "user", "content": "Scrivi tre consigli per imparare l'italiano, in breve."}]
# Extraction reads an English report: SmolLM2, the model CI has, is English-only and writes no
# extraction of the Italian text at all (an invented date string, forever), which would time
# decoding of nothing the workload is about. The schema is strict (no other keys), as OpenAI's
# strict mode requires and as an extractor would write it.
REPORT = (
    "The city council of Città di Castello met on Monday 14 October at 18:30 in the Agostini hall. 21 of 24 "
    "councillors were present. The mayor, Luciana Bassini, presented the 2025 budget: 48.2 million euros. The "
    "meeting ended at 21:05 after a vote of 15 in favour and 6 against."
)
EXTRACT = [{"role": "user", "content": "Extract the date, time, place, number present and votes in favour as JSON:\n\n" + REPORT}]
SCHEMA = {
    "type": "object",
    "properties": {
        "date": {"type": "string"},
        "time": {"type": "string"},
        "place": {"type": "string"},
        "present": {"type": "integer"},
        "in_favour": {"type": "integer"},
    },
    "required": ["date", "time", "place", "present", "in_favour"],
    "additionalProperties": False,
}
TOOL = {
    "type": "function",
    "function": {
        "name": "crea_evento",
        "description": "Crea un evento in calendario.",
        "parameters": {
            "type": "object",
            "properties": {"titolo": {"type": "string"}, "data": {"type": "string"}, "luogo": {"type": "string"}},
            "required": ["titolo", "data", "luogo"],
        },
    },
}
TOOL_MESSAGES = [{"role": "user", "content": "Metti in calendario la riunione descritta qui:\n\n" + TEXT}]


@dataclass
class Run:
    engine: str
    workload: str
    prompt_tokens: int
    generated: int
    ttft_s: float
    prefill_tps: float
    decode_tps: float
    peak_gb: float


@dataclass
class Row:
    """One workload and engine, summarized over the repetitions."""

    engine: str
    workload: str
    prompt_tokens: int
    generated: float
    ttft_s: float
    prefill_tps: float
    decode_tps: float
    decode_tps_std: float
    peak_gb: float
    ratio: float | None = None  # nesso-mlx / mlx-lm decode (prefill for pp, TTFT for turn2)
    runs: list[Run] = field(default_factory=list, repr=False)


def _text_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(TEXT * (n // 40 + 2), add_special_tokens=False)
    return ids[:n]


def _timed(stream, count_first: bool = True) -> tuple[int, float, float]:
    """Iterate `stream` of tokens; returns (tokens, seconds to the first, seconds from first to last)."""
    t0 = time.perf_counter()
    n, first, last = 0, 0.0, 0.0
    for _ in stream:
        n += 1
        last = time.perf_counter()
        if n == 1:
            first = last
    return n, first - t0, last - first


class NessoEngine:
    name = "nesso-mlx"

    def __init__(self, path: str, prompt_lookup: bool) -> None:
        from .loading import load

        self.model, self.tokenizer = load(path)
        self.prompt_lookup = prompt_lookup

    def run(self, workload: str, prompt_tokens: int, gen_tokens: int) -> Run:
        from itertools import islice

        from .api import stream_generate
        from .chat import ChatSession, SamplingSettings
        from .generation import Decoder, Row, prefill
        from .sampling import make_sampler

        tokenizer, model = self.tokenizer, self.model
        mx.reset_peak_memory()
        if workload in ("pp", "tg"):
            ids = _text_ids(tokenizer, prompt_tokens if workload == "pp" else 16)
            cache = model.make_cache()
            t0 = time.perf_counter()
            logits = prefill(model, mx.array(ids, dtype=mx.int32), cache)

            def steps():  # joins on the first token, so the timing includes the first sample
                decoder = Decoder(model)
                decoder.add(Row(make_sampler()), cache, logits)
                while True:
                    yield from (item.token for item in decoder.step())

            n, ttft, span = _timed(islice(steps(), 1 if workload == "pp" else gen_tokens))
            ttft = time.perf_counter() - t0 if workload == "pp" else ttft
            return Run(self.name, workload, len(ids), n, ttft, len(ids) / ttft, (n - 1) / span if n > 1 else 0.0, _peak())
        if workload == "turn2":
            session = ChatSession(model, tokenizer, settings=SamplingSettings(temperature=0.0, top_p=1.0, max_tokens=8))
            for _ in session.send(CHAT[0]["content"]):
                pass
            n, ttft, span = _timed(session.send("E altri tre, per favore."))
            return Run(self.name, workload, session.last.prompt_tokens, n, ttft, session.last.prompt_tps, _tps(n, span), _peak())
        options: dict[str, Any] = {"messages": CHAT}
        if workload == "extract":
            options = {"messages": EXTRACT, "response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}
        elif workload == "tool":
            options = {"messages": TOOL_MESSAGES, "tools": [TOOL], "tool_choice": "required"}
        t0 = time.perf_counter()
        n, first, end, final = 0, 0.0, 0.0, None
        for chunk in stream_generate(model, tokenizer, max_tokens=gen_tokens, prompt_lookup=self.prompt_lookup, **options):
            n, end, final = n + 1, time.perf_counter(), chunk
            first = first or end
        return Run(self.name, workload, final.prompt_tokens, n, first - t0, final.prompt_tps, _tps(n, end - first), _peak())

    def prompt_ids(self, workload: str) -> list[int]:
        """The prompt of a request workload, for the peer to run the same tokens."""
        if workload == "extract":
            return self.tokenizer.apply_chat_template(EXTRACT)
        if workload == "tool":
            return self.tokenizer.apply_chat_template(TOOL_MESSAGES, tools=[TOOL])
        return self.tokenizer.apply_chat_template(CHAT)


class MlxLmEngine:
    name = "mlx-lm"

    def __init__(self, path: str, ours: NessoEngine) -> None:
        from mlx_lm.utils import load_model

        self.model, _ = load_model(Path(path))
        self.ours = ours
        self.eos = set(ours.tokenizer.eos_token_ids)

    def run(self, workload: str, prompt_tokens: int, gen_tokens: int, exact: bool = False) -> Run:
        """One repetition of `workload`; `exact`: decode `gen_tokens` tokens, EOS or not (the
        request workloads, to match nesso-mlx's count)."""
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import make_prompt_cache

        greedy = lambda x: mx.argmax(x, axis=-1)  # noqa: E731
        mx.reset_peak_memory()
        tokenizer = self.ours.tokenizer
        if workload in ("pp", "tg"):
            ids = _text_ids(tokenizer, prompt_tokens if workload == "pp" else 16)
            steps = generate_step(mx.array(ids), self.model, max_tokens=1 if workload == "pp" else gen_tokens, sampler=greedy)
            n, ttft, span = _timed(steps)
            return Run(self.name, workload, len(ids), n, ttft, len(ids) / ttft, _tps(n, span), _peak())
        if workload == "turn2":
            cache = make_prompt_cache(self.model)
            first = tokenizer.apply_chat_template(CHAT)
            reply = [
                int(t) for t, _ in generate_step(mx.array(first), self.model, max_tokens=8, sampler=greedy, prompt_cache=cache)
            ]
            turn2 = tokenizer.apply_chat_template(
                [
                    *CHAT,
                    {"role": "assistant", "content": tokenizer.decode(reply)},
                    {"role": "user", "content": "E altri tre, per favore."},
                ]
            )
            known = len(first) + len(reply) - 1  # the cache holds the prompt and the reply but its last token
            common = next(
                (i for i, (a, b) in enumerate(zip(turn2, first + reply, strict=False)) if a != b), min(len(turn2), known)
            )
            common = min(common, known)
            for layer in cache:
                layer.trim(layer.offset - common)
            new = turn2[common:]
            steps = generate_step(mx.array(new), self.model, max_tokens=8, sampler=greedy, prompt_cache=cache)
            n, ttft, span = _timed(self._until_eos(steps))
            return Run(self.name, workload, len(turn2), n, ttft, len(new) / ttft, _tps(n, span), _peak())
        ids = self.ours.prompt_ids(workload)
        steps = generate_step(mx.array(ids), self.model, max_tokens=gen_tokens, sampler=greedy)
        n, ttft, span = _timed((token for token, _ in steps) if exact else self._until_eos(steps))
        return Run(self.name, workload, len(ids), n, ttft, len(ids) / ttft, _tps(n, span), _peak())

    def _until_eos(self, steps):
        for token, _ in steps:
            yield token
            if int(token) in self.eos:
                return


def _tps(n: int, span: float) -> float:
    return (n - 1) / span if n > 1 and span > 0 else 0.0


def _peak() -> float:
    return mx.get_peak_memory() / 1e9


def run_bench(
    model: str,
    workloads: list[str],
    prompt_tokens: int = 512,
    gen_tokens: int = 128,
    repetitions: int = 3,
    vs_mlx_lm: bool = False,
    prompt_lookup: bool = True,
    progress=None,
) -> list[Row]:
    """Run the workloads and summarize them (one `Row` per workload and engine)."""
    ours = NessoEngine(model, prompt_lookup)
    engines: list[Any] = [ours] + ([MlxLmEngine(model, ours)] if vs_mlx_lm else [])
    for engine in engines:  # warm-up: kernels, llguidance's tokenizer
        for workload in workloads:
            engine.run(workload, min(prompt_tokens, 32), 4)
    runs: dict[tuple[str, str], list[Run]] = {}
    total, done = len(workloads) * repetitions * len(engines), 0
    for workload in workloads:
        for _ in range(repetitions):
            generated = gen_tokens  # nesso-mlx runs first in each repetition: mlx-lm matches its count
            for engine in engines:
                mx.clear_cache()
                if engine is ours or workload in ("pp", "tg", "turn2"):
                    run = engine.run(workload, prompt_tokens, gen_tokens)
                else:  # as many tokens as ours generated (see the module's docstring)
                    run = engine.run(workload, prompt_tokens, generated, exact=True)
                if engine is ours:
                    generated = run.generated
                runs.setdefault((engine.name, workload), []).append(run)
                done += 1
                if progress:
                    progress(done, total)
    rows = []
    for (engine, workload), items in runs.items():
        decode = [r.decode_tps for r in items]
        rows.append(
            Row(
                engine,
                workload,
                items[0].prompt_tokens,
                statistics.mean(r.generated for r in items),
                statistics.median(r.ttft_s for r in items),
                statistics.median(r.prefill_tps for r in items),
                statistics.mean(decode),
                statistics.stdev(decode) if len(decode) > 1 else 0.0,
                max(r.peak_gb for r in items),
                runs=items,
            )
        )
    by_key = {(r.engine, r.workload): r for r in rows}
    for row in rows:
        peer = by_key.get(("mlx-lm", row.workload))
        if row.engine == "nesso-mlx" and peer is not None:
            if row.workload == "pp":
                row.ratio = row.prefill_tps / peer.prefill_tps if peer.prefill_tps else None
            elif row.workload == "turn2":
                row.ratio = peer.ttft_s / row.ttft_s if row.ttft_s else None
            else:
                row.ratio = row.decode_tps / peer.decode_tps if peer.decode_tps else None
    return rows


def workload_label(workload: str, prompt_tokens: int, gen_tokens: int) -> str:
    return {"pp": f"pp{prompt_tokens}", "tg": f"tg{gen_tokens}"}.get(workload, workload)


def render(rows: list[Row], fmt: str, prompt_tokens: int, gen_tokens: int) -> str:
    """The rows as a markdown table, JSON or CSV."""
    if fmt == "json":
        return json.dumps(
            [{k: v for k, v in asdict(r).items() if k != "runs"} | {"runs": [asdict(x) for x in r.runs]} for r in rows], indent=2
        )
    header = ["engine", "test", "prompt", "generated", "TTFT s", "prefill tok/s", "decode tok/s", "± std", "peak GB", "ratio"]
    lines = [
        [
            r.engine,
            workload_label(r.workload, prompt_tokens, gen_tokens),
            str(r.prompt_tokens),
            f"{r.generated:.0f}",
            f"{r.ttft_s:.3f}",
            f"{r.prefill_tps:.1f}",
            f"{r.decode_tps:.2f}",
            f"{r.decode_tps_std:.2f}",
            f"{r.peak_gb:.2f}",
            f"{r.ratio:.2f}x" if r.ratio is not None else "",
        ]
        for r in rows
    ]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(lines)
        return out.getvalue()
    table = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|"]
    table += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(table)
