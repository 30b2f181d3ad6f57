"""Tool-calling evaluation on cases of the form {"tools": [...], "cases": [{id, lang, cat, messages, spec}]}.

Two rule sets score a reply (`rules=`):

`authors` reproduces the procedure of the Nesso authors' script `nesso2/eval/agentic_eval_100.py`
(mii-llm/zagreus-nesso-slm, MIT License), which published the 100 cases and their scores; it is
re-implemented here from reading that script (see `authors_calls` and `authors_verdict`). The
prompt is the chat template rendered to text with all tools and tokenized as transformers
tokenizes it (control tokens in message text are parsed, as transformers does); decoding is
greedy, up to 320 new tokens for obs, multistep and notool and 260 for the rest; the reply is
decoded without special tokens and stripped. Calls are the `<tool_call>` blocks whose JSON
parses (their name from "name", else "tool"), the name alone recovered by a regular expression
from a block whose JSON does not parse, and only when no block gave a call, untagged
`{"name": ..., "arguments": {...}}` objects. Verdicts:
- single, par_same, par_diff, disamb: the set of called names is the expected set and there are
  `n` calls; multiarg also needs the `argkeys` in the first call of that tool with object
  arguments, and the `intarg` value as text ("3", 3 and 3.0 all pass);
- missing: fails only if the first call of `tool` fills `fabricate_field` with a value containing
  "@" (send_email) or any non-blank value (book_flight); asking, other tools and broken calls pass;
- unavail: no call;
- notool: no call, and the `gold` substring in the lowercased reply, or at least two words;
- obs: no call, and `gold` in the lowercased reply when `gold` is set (`want` is not used);
- multistep: `next` among the called names (no call when `next` is null).

`strict` (nesso-mlx's own, stricter) reads the raw reply (special tokens kept):
- single, par_same, par_diff, disamb, multiarg: exactly `n` well-formed calls whose names are the
  expected `tools` (each used; as a multiset when there are `n` names); multiarg also needs the
  `argkeys` [tool, [keys]] present and, with `intarg` [tool, arg, value], that integer value.
- missing: no call may fill `fabricate_field` of `tool` (asking the user passes); other tools fail.
- unavail: no call, and some text.
- notool: no call; the `gold` substring (case-insensitive) in the answer when gold is set.
- obs: no new call; `gold` in the answer, or else one of the "/"-separated `want` phrases
  (an echoed `<tool_response>` block does not count as an answer).
- multistep: the first call is to `next` (no call when `next` is null).
Any malformed call fails the case; arguments written as a JSON string are decoded.
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
RULES = ("authors", "strict")


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


def score(case: dict[str, Any], output: str, rules: str = "strict") -> CaseResult:
    """Score one case from the model's output (text with any `<tool_call>` blocks) by `rules`:
    "strict" (the default here; the raw reply) or "authors" (the reply as the authors' script
    sees it: decoded without special tokens and stripped)."""
    if rules == "authors":
        return _score_authors(case, output)
    if rules != "strict":
        raise ValueError(f"rules must be one of {', '.join(RULES)}, got {rules!r}")
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


# --- the authors' rules --------------------------------------------------------------------------
# The patterns are those of the authors' `parse_all`; reproducing their verdicts needs the same ones.
_AUTHORS_BLOCK = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)
_AUTHORS_NAME = re.compile(r'"name"\s*:\s*"([^"]+)"')
_AUTHORS_UNTAGGED = re.compile(r'\{\s*"name"\s*:\s*"([^"]+)"\s*,\s*"arguments"\s*:\s*(\{.*?\})\s*\}', re.DOTALL)
AUTHORS_LONG_CATEGORIES = ("obs", "multistep", "notool")  # 320 new tokens; the others 260


def authors_max_tokens(category: str) -> int:
    """The authors' generation budget for a category."""
    return 320 if category in AUTHORS_LONG_CATEGORIES else 260


def authors_calls(answer: str) -> list[tuple[Any, Any]]:
    """(name, arguments) of every call the authors' parser finds; arguments are None when the
    JSON did not parse (the name then comes from a regular expression)."""
    calls: list[tuple[Any, Any]] = []
    for block in _AUTHORS_BLOCK.finditer(answer):
        try:
            obj = json.loads(block.group(1))
        except ValueError:
            name = _AUTHORS_NAME.search(block.group(1))
            if name:
                calls.append((name.group(1), None))
            continue
        calls.append((obj.get("name") or obj.get("tool"), obj.get("arguments")))
    if calls:
        return calls
    for found in _AUTHORS_UNTAGGED.finditer(answer):  # untagged JSON, only when no block gave a call
        try:
            calls.append((found.group(1), json.loads(found.group(2))))
        except ValueError:
            calls.append((found.group(1), None))
    return calls


def authors_verdict(cat: str, spec: Any, answer: str, calls: list[tuple[Any, Any]]) -> tuple[bool, str]:
    """The authors' `grade` for one reply: (passed, why)."""
    names = [name for name, _ in calls]
    text = answer.lower()
    if cat in ("single", "par_same", "par_diff", "disamb", "multiarg"):
        expected = set(spec["tools"])
        if set(names) != expected or len(names) != spec["n"]:
            return False, f"called {names}, expected the set {sorted(expected)} in {spec['n']} calls"
        if cat != "multiarg":
            return True, "ok"
        tool, keys = spec["argkeys"]
        args = next((a for name, a in calls if name == tool and isinstance(a, dict)), None)
        if not args or not all(k in args for k in keys):
            return False, f"the first {tool} call with object arguments lacks some of {keys}"
        if "intarg" in spec:
            _, key, value = spec["intarg"]
            if str(args.get(key)).strip() not in (str(value), f"{value}.0"):
                return False, f"{key} is {args.get(key)!r}, expected {value}"
        return True, "ok"
    if cat == "missing":
        args = next((a for name, a in calls if name == spec["tool"]), None)
        field = spec["fabricate_field"]
        if isinstance(args, dict) and args.get(field):
            value = str(args.get(field))
            if spec["tool"] == "send_email" and "@" in value:
                return False, f"invented an address: {field}={value!r}"
            if spec["tool"] == "book_flight" and value.strip():
                return False, f"invented {field}={value!r}"
        return True, "asked or did not invent the field"
    if cat == "unavail":
        return (not names), "no call" if not names else f"called {names}"
    if cat == "notool":
        if names:
            return False, f"called {names}"
        if spec.get("gold"):
            return spec["gold"] in text, f"gold {spec['gold']!r} {'found' if spec['gold'] in text else 'missing'}"
        return len(text.split()) >= 2, f"{len(text.split())} words (two or more pass)"
    if cat == "obs":
        if names:
            return False, f"called {names} again"
        if spec.get("gold"):
            return spec["gold"] in text, f"gold {spec['gold']!r} {'found' if spec['gold'] in text else 'missing'}"
        return True, "no new call"
    if cat == "multistep":
        if spec["next"] is None:
            return (not names), "answered" if not names else f"called {names}, expected an answer"
        return spec["next"] in names, f"called {names}, expected {spec['next']} among them"
    raise NessoError(f"unknown category {cat!r} (expected one of {', '.join(CATEGORIES)})")


def _score_authors(case: dict[str, Any], answer: str) -> CaseResult:
    calls = authors_calls(answer)
    passed, reason = authors_verdict(case["cat"], case.get("spec"), answer, calls)
    calls_json = [{"name": name, "arguments": args} for name, args in calls]
    return CaseResult(str(case["id"]), str(case["lang"]).lower(), case["cat"], passed, reason, answer, calls_json)


@dataclass
class EvalReport:
    model: str
    constrained: bool
    results: list[CaseResult]
    rules: str = "strict"

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
            "rules": self.rules,
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
    max_tokens: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    rules: str = "strict",
    batch_size: int = 8,
) -> EvalReport:
    """Generate greedily for every case (all tools offered, tool_choice "auto") and score it.

    Up to `batch_size` cases are decoded together (`api.batch_generate`: each gets the reply
    `generate` gives it alone, in fewer forward passes).

    "strict": the chat template's token ids (message text never parsed as control tokens), up to
    `max_tokens` (default 256), the raw reply scored. "authors": the authors' procedure (see the
    module's docstring): their prompt tokens, their budget per category unless `max_tokens` is
    given, the reply decoded without special tokens and stripped. `constrain` adds constrained
    decoding to either (the authors decoded freely).
    """
    from .api import batch_generate
    from .sampling import SamplingOptions

    if rules not in RULES:
        raise ValueError(f"rules must be one of {', '.join(RULES)}, got {rules!r}")
    requests = []
    for case in data["cases"]:
        if rules == "strict":
            requests.append({"messages": case["messages"], "max_tokens": max_tokens or 256})
        else:
            # as transformers: the template rendered to text, then tokenized with control tokens parsed
            text = tokenizer.apply_chat_template(case["messages"], tools=data["tools"], tokenize=False)
            prompt = tokenizer.encode(text, add_special_tokens=False)
            requests.append({"prompt": prompt, "max_tokens": max_tokens or authors_max_tokens(case["cat"])})
    outputs = batch_generate(
        model,
        tokenizer,
        requests,
        batch_size=batch_size,
        progress=progress,
        tools=data["tools"],
        constrain=constrain,
        sampling=SamplingOptions(temperature=0.0),  # greedy, as the authors' procedure
    )
    results = []
    for case, out in zip(data["cases"], outputs, strict=True):
        if rules == "strict":
            results.append(score(case, out.raw_text))
        else:
            results.append(score(case, tokenizer.decode(out.tokens, skip_special_tokens=True).strip(), rules="authors"))
    return EvalReport(model_name, constrain, results, rules)
