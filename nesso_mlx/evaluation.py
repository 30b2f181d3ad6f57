"""Tool-calling evaluation on cases of the form {"tools": [...], "cases": [{id, lang, cat, messages, spec}]}.

Scoring per category (`spec` keys as in the Nesso authors' benchmark):
- single, par_same, par_diff, disamb, multiarg: exactly `n` well-formed calls whose names are the
  expected `tools` (each used; as a multiset when there are `n` names); multiarg also needs the
  `argkeys` [tool, [keys]] present and, with `intarg` [tool, arg, value], that integer value.
- missing: no call may fill `fabricate_field` of `tool` (asking the user passes); other tools fail.
- unavail: no call.
- notool: no call; the `gold` substring (case-insensitive) in the answer when gold is set.
- obs: no new call; `gold` in the answer, or else one of the "/"-separated `want` phrases
  (an echoed `<tool_response>` block does not count as an answer).
- multistep: the first call is to `next` (no call when `next` is null).
Any malformed call fails the case.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import NessoError
from .tools import ToolCall, parse_tool_calls

_ECHO = re.compile(r"<tool_response>.*?(?:</tool_response>|$)", re.DOTALL)
CATEGORIES = ("single", "par_same", "par_diff", "multiarg", "disamb", "missing", "unavail", "notool", "obs", "multistep")


@dataclass
class CaseResult:
    id: str
    lang: str
    cat: str
    passed: bool
    reason: str
    output: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)


def _contains(text: str, needle: str) -> bool:
    return needle.strip().lower() in text.lower()


def score(case: dict[str, Any], output: str) -> CaseResult:
    """Score one case from the model's raw output (text with any `<tool_call>` blocks)."""
    text, calls = parse_tool_calls(output)
    spec, cat = case.get("spec"), case["cat"]
    calls_json = [{"name": c.name, "arguments": c.arguments, "error": c.error} for c in calls]

    def result(passed: bool, reason: str) -> CaseResult:
        return CaseResult(str(case["id"]), str(case["lang"]).lower(), cat, passed, reason, output, calls_json)

    bad = [c for c in calls if not c.ok]
    if bad:
        return result(False, f"malformed call: {bad[0].error}")
    names = [c.name for c in calls]
    if cat in ("single", "par_same", "par_diff", "disamb", "multiarg"):
        expected, n = list(spec["tools"]), int(spec["n"])
        if len(calls) != n:
            return result(False, f"{len(calls)} calls, expected {n}")
        if len(expected) == n and sorted(names) != sorted(expected):
            return result(False, f"called {names}, expected {expected}")
        if set(names) != set(expected):
            return result(False, f"called {names}, expected {expected}")
        if cat == "multiarg":
            return _score_args(spec, calls, result)
        return result(True, "ok")
    if cat == "missing":
        for c in calls:
            if c.name != spec["tool"]:
                return result(False, f"called {c.name}, expected {spec['tool']} or a question")
            value = c.arguments.get(spec["fabricate_field"])
            if value not in (None, "", []):
                return result(False, f"invented {spec['fabricate_field']}={value!r}")
        return result(True, "asked the user" if not calls else "called without inventing the field")
    if cat in ("unavail", "notool", "obs"):
        text = _ECHO.sub("", text)  # repeating the tool's result back is not an answer
        if calls:
            return result(False, f"called {names}, expected a text answer")
        if not text.strip():
            return result(False, "empty answer")
        gold = spec.get("gold") if isinstance(spec, dict) else None
        if gold:
            return result(_contains(text, str(gold)), f"gold {gold!r} {'found' if _contains(text, str(gold)) else 'missing'}")
        want = spec.get("want") if isinstance(spec, dict) else None
        if want:
            hit = any(_contains(text, w) for w in str(want).split("/"))
            return result(hit, f"want {want!r} {'found' if hit else 'missing'}")
        return result(True, "answered without a call")
    if cat == "multistep":
        expected = spec.get("next")
        if expected is None:
            return result(not calls, "answered" if not calls else f"called {names}, expected an answer")
        if not calls:
            return result(False, f"no call, expected {expected}")
        return result(names[0] == expected, f"called {names[0]}, expected {expected}")
    raise NessoError(f"case {case['id']}: unknown category {cat!r} (expected one of {', '.join(CATEGORIES)})")


def _score_args(spec: dict[str, Any], calls: list[ToolCall], result: Callable[[bool, str], CaseResult]) -> CaseResult:
    if "argkeys" in spec:
        tool, keys = spec["argkeys"]
        for c in calls:
            missing = [k for k in keys if c.name == tool and k not in c.arguments]
            if missing:
                return result(False, f"{tool} is missing {missing}")
    if "intarg" in spec:
        tool, arg, value = spec["intarg"]
        for c in calls:
            got = c.arguments.get(arg) if c.name == tool else value
            if not isinstance(got, int) or isinstance(got, bool) or got != value:
                return result(False, f"{tool}.{arg} is {got!r}, expected the integer {value}")
    return result(True, "ok")


@dataclass
class EvalReport:
    model: str
    constrained: bool
    results: list[CaseResult]

    def accuracy(self, key: str) -> dict[str, tuple[int, int]]:
        """{group: (passed, total)} grouped by "cat" or "lang"."""
        groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in self.results:
            groups[getattr(r, key)][0] += r.passed
            groups[getattr(r, key)][1] += 1
        return {k: (v[0], v[1]) for k, v in groups.items()}

    @property
    def passed(self) -> int:
        return sum(r.passed for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "constrained": self.constrained,
            "passed": self.passed,
            "total": len(self.results),
            "by_category": self.accuracy("cat"),
            "by_language": self.accuracy("lang"),
            "cases": [asdict(r) for r in self.results],
        }


def load_cases(path: str | Path) -> dict[str, Any]:
    """Read and check a case file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        tools, cases = data["tools"], data["cases"]
        for case in cases:
            missing = {"id", "lang", "cat", "messages", "spec"} - set(case)
            if missing:
                raise ValueError(f"case {case.get('id', '?')} lacks {sorted(missing)}")
            if case["cat"] not in CATEGORIES:
                raise ValueError(f"case {case['id']}: unknown category {case['cat']!r}")
    except FileNotFoundError:
        raise NessoError(f"{path}: file not found") from None
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise NessoError(f"{path}: not a tool-calling case file ({e})") from None
    if not isinstance(tools, list) or not cases:
        raise NessoError(f"{path}: needs a list of tools and at least one case")
    return data


def run_tool_eval(
    model,
    tokenizer,
    data: dict[str, Any],
    *,
    model_name: str = "",
    constrain: bool = True,
    max_tokens: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Generate greedily for every case (all tools offered, tool_choice "auto") and score it."""
    from .generation import generate

    results = []
    for i, case in enumerate(data["cases"], start=1):
        out = generate(
            model,
            tokenizer,
            messages=case["messages"],
            tools=data["tools"],
            constrain=constrain,
            max_tokens=max_tokens,
            temperature=0.0,
        )
        results.append(score(case, out.raw_text))
        if progress:
            progress(i, len(data["cases"]))
    return EvalReport(model_name, constrain, results)
