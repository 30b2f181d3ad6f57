"""An lm-evaluation-harness backend: run lm-eval's tasks on nesso-mlx models.

    import nesso_mlx.lm_eval_backend  # registers the model type "nesso-mlx"
    lm_eval.simple_evaluate(model="nesso-mlx", model_args="pretrained=nesso-agentic", tasks=["arc_it"])

    python -m nesso_mlx.lm_eval_backend --model nesso-mlx --model_args pretrained=nesso-agentic --tasks arc_it
    nesso-mlx eval lm --model nesso-agentic --tasks arc_it

lm-eval has no plugin discovery (its model names are a fixed table), so `lm_eval --model nesso-mlx`
only works once this module is imported: `python -m nesso_mlx.lm_eval_backend` is lm-eval's own
command line with the backend registered.

The numbers are meant to be lm-eval's `hf` backend's, on MLX. Text is tokenized exactly as it
tokenizes (its `_encode_pair`: trailing spaces of the context move to the continuation, the pair is
encoded whole and split at the context's length; BOS added unless the text already starts with
it), contexts longer than `max_length` are cut from the left as it cuts them, perplexity is scored
in lm-eval's rolling windows, and generation applies the `until` strings while generating and
decodes the tokens as it does (special tokens skipped, text cut at the first stop string).
`tests/test_lm_eval.py` runs both backends on the same weights in float32 and compares every item.

What is faster: each distinct context is run through the model once, and its continuations are
scored from its KV cache (a one-token answer, as in MMLU, costs nothing more); contexts are taken
in token order and keep the cached prefix they share with the previous one (the few-shot
examples), for scoring and for generation alike; multi-token continuations of one context are
batched (`batch_size`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any

import mlx.core as mx
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs, postprocess_generated_text

from .api import stream_generate
from .cache import KVCache, common_prefix, rollback_cache
from .errors import NessoError, TokenizerError
from .generation import prefill
from .sampling import SamplingOptions, log_softmax

log = logging.getLogger(__name__)

# (kind, done, total): kind is "loglikelihood", "loglikelihood_rolling" or "generate_until".
Progress = Callable[[str, int, int], None]

_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker for continue_final_message
_SCORE_CHUNK = 256  # positions whose logits are materialised at once (vocab-sized rows)


def _batch_size(value: Any, default: int = 1) -> int:
    """lm-eval passes batch sizes as ints or strings ("8", "auto", "auto:4")."""
    if value is None:
        return default
    if isinstance(value, str) and value.startswith("auto"):
        return 16
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {value!r}")
    return size


@register_model("nesso-mlx", "nesso_mlx")
class NessoLM(TemplateLM):
    """lm-eval's LM API over a nesso-mlx model.

    model_args: `pretrained` (alias, repo id or folder), `dtype` (bfloat16, float16, float32),
    `quantize` (4 or 8), `max_length` (default: the model's context window), `max_gen_toks`
    (default 256), `add_bos_token`, `prefix_token_id`, `batch_size`. `device` is accepted and
    ignored (MLX chooses its device). A loaded `model` and `tokenizer` may be passed instead of
    `pretrained`, and `progress(kind, done, total)` replaces the tqdm bars.
    """

    backend = "causal"

    def __init__(
        self,
        pretrained: str | None = None,
        dtype: str | None = None,
        quantize: int | None = None,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        device: str | None = None,
        model: Any = None,
        tokenizer: Any = None,
        progress: Progress | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            log.warning("nesso-mlx ignores these model_args: %s", ", ".join(sorted(kwargs)))
        if model is None:
            if not pretrained:
                raise ValueError("model_args needs pretrained=MODEL (an alias, a repo id or a folder)")
            from .loading import load

            model, tokenizer = load(pretrained, dtype=dtype, quantize=int(quantize) if quantize else None)
        elif tokenizer is None:
            raise ValueError("pass the tokenizer with the model")
        self.model = model
        self.tokenizer = tokenizer
        self.pretrained = str(pretrained or getattr(model, "path", "model"))
        self.batch_size_per_gpu = _batch_size(batch_size)
        if max_batch_size:
            self.batch_size_per_gpu = min(self.batch_size_per_gpu, int(max_batch_size))
        self._max_length = int(max_length) if max_length else None
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.progress = progress
        self._cache: list[KVCache] = model.make_cache()
        self._cached: list[int] = []  # the tokens whose keys and values `_cache` holds
        self._unknown_gen_kwargs: set[str] = set()
        self._truncated = False

    # ---- what lm-eval asks of a model ------------------------------------------------------

    def _special_id(self, name: str) -> int | None:
        text = self.tokenizer.special_tokens.get(name)
        return self.tokenizer.token_to_id(text) if text else None

    @property
    def eot_token_id(self) -> int:
        eos = self._special_id("eos_token")
        return eos if eos is not None else self.tokenizer.eos_token_ids[0]

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return int(self.custom_prefix_token_id)
        bos = self._special_id("bos_token")
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length or self.model.args.max_position_embeddings

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False or chat_template is None:
            return None
        if not self.tokenizer.has_chat_template:
            log.warning("%s has no chat template; prompts are written in plain ChatML", self.pretrained)
        return self.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt as the model's chat template writes it (transformers' `apply_chat_template`
        with tokenize=False; without a generation prompt, the last message is continued)."""
        try:
            return self._render_chat(chat_history, add_generation_prompt)
        except TokenizerError:
            log.warning("the chat template failed; trying again without the system message (as lm-eval's hf backend does)")
            return self._render_chat([m for m in chat_history if m["role"] != "system"], add_generation_prompt)

    def _render_chat(self, chat_history: list[dict[str, str]], add_generation_prompt: bool) -> str:
        messages = [dict(m) for m in chat_history]
        if add_generation_prompt:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if not messages:
            raise ValueError("cannot continue an empty conversation")
        # continue_final_message: render the last message with a marker after it and cut there.
        final = messages[-1]["content"]
        messages[-1]["content"] = final + _CONTINUE_TAG
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
        if final.strip() not in text or _CONTINUE_TAG.strip() not in text:
            raise ValueError("the chat template drops part of the final message; it cannot be continued")
        at = text.rindex(_CONTINUE_TAG.strip())
        return text[:at] if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs
    ) -> list[int]:
        """As lm-eval's hf backend: the tokenizer's default special tokens (BOS) unless told
        otherwise, and none when the text already starts with the prefix token."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            if has_bos_prefix(string, self.tokenizer.decode([self.prefix_token_id])):
                add_special_tokens = False
        ids = self.tokenizer.encode(string, add_special_tokens=True if add_special_tokens is None else add_special_tokens)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def _encode_prompt(self, context: str) -> list[int]:
        """A generation prompt, as the hf backend's `tok_batch_encode` encodes it."""
        add = self.add_bos_token
        bos = self.tokenizer.special_tokens.get("bos_token")
        if has_bos_prefix(context, bos):
            add = False
        return self.tokenizer.encode(context, add_special_tokens=True if add is None else add)

    def get_model_info(self) -> dict[str, Any]:
        from mlx.utils import tree_flatten

        params = tree_flatten(self.model.parameters())
        dtype = str(self.model.model.norm.weight.dtype).split(".")[-1]
        return {
            "model_num_parameters": sum(p.size for _, p in params),
            "model_dtype": dtype,
            "model_revision": "",
            "model_sha": "",
            "quantization": self.model.args.quantization,
        }

    # ---- progress --------------------------------------------------------------------------

    def _bar(self, kind: str, total: int, disable: bool) -> _Bar:
        return _Bar(kind, total, self.progress, disable)

    def _warn_truncated(self, dropped: int) -> None:
        if not self._truncated:
            log.warning(
                "a prompt is longer than the context length (%d tokens); its first %d tokens are dropped, "
                "as lm-eval's hf backend drops them (warned once)",
                self.max_length,
                dropped,
            )
            self._truncated = True

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        # lm-eval's "Tokenizing inputs" bar is noise under a progress callback
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.progress is not None)

    # ---- the KV cache shared between requests -----------------------------------------------

    def _prefill(self, context: Sequence[int]) -> mx.array:
        """Log-probabilities (vocab,) of the token after `context`, reusing the cached prefix."""
        keep = min(common_prefix(self._cached, context), len(context) - 1)
        rollback_cache(self._cache, keep)
        self._cached = list(context[:keep])
        logits = prefill(self.model, mx.array(context[keep:], dtype=mx.int32), self._cache)
        self._cached = list(context)
        return log_softmax(logits[0])

    def _rows(self, base: int, conts: list[list[int]]) -> list[tuple[float, bool]]:
        """Sum of log-probabilities and greedy flag of cont[1:] for each continuation, fed after the
        first `base` cached positions (cont[0] is scored from the context's last logits)."""
        B = len(conts)
        inputs = [c[:-1] for c in conts]
        T = max(len(x) for x in inputs)
        pad = [x + [0] * (T - len(x)) for x in inputs]
        if B == 1:
            cache = self._cache
        else:  # the prefix's keys and values, repeated for each row
            cache = []
            for layer in self._cache:
                keys, values = layer.state
                copy = KVCache()
                copy.set_state(mx.repeat(keys, B, axis=0), mx.repeat(values, B, axis=0))
                cache.append(copy)
        totals = [mx.array(0.0)] * B
        greedy = [mx.array(True)] * B
        try:
            for start in range(0, T, _SCORE_CHUNK):
                chunk = mx.array([row[start : start + _SCORE_CHUNK] for row in pad], dtype=mx.int32)
                logprobs = log_softmax(self.model(chunk, cache))
                for b, cont in enumerate(conts):
                    targets = cont[1 + start : 1 + start + _SCORE_CHUNK]
                    if not targets:
                        continue
                    rows = logprobs[b, : len(targets)]
                    t = mx.array(targets, dtype=mx.int32)
                    totals[b] = totals[b] + mx.take_along_axis(rows, t[:, None], axis=-1).sum()
                    greedy[b] = mx.logical_and(greedy[b], mx.all(mx.argmax(rows, axis=-1) == t))
                mx.eval(totals, greedy)
        finally:
            if B == 1:
                rollback_cache(self._cache, base)
        return [(total.item(), bool(g.item())) for total, g in zip(totals, greedy, strict=True)]

    # ---- loglikelihood ----------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, kind: str = "loglikelihood", **kwargs):
        """Score (key, context ids, continuation ids) requests; one model pass per distinct context."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = defaultdict(list)
        for i, (_, context, cont) in enumerate(requests):
            if not cont:
                results[i] = (0.0, True)
                continue
            if len(cont) > self.max_length:
                raise NessoError(f"a continuation of {len(cont)} tokens does not fit the context length {self.max_length}")
            # as the hf backend: the last max_length + 1 tokens of the pair, the last one never fed
            whole = (list(context) + list(cont))[-(self.max_length + 1) :]
            if len(whole) < len(context) + len(cont):
                self._warn_truncated(len(context) + len(cont) - len(whole))
            groups[tuple(whole[: len(whole) - len(cont)])].append((i, list(cont)))
        step = self._bar(kind, len(requests), disable_tqdm)
        if any(r is not None for r in results):
            step(sum(r is not None for r in results))
        for context in sorted(groups):  # token order: neighbours share their longest prefixes
            members = groups[context]
            first = self._prefill(context)
            best = int(mx.argmax(first).item())
            firsts = mx.take(first, mx.array([c[0] for _, c in members], dtype=mx.int32)).tolist()
            longer = [(i, c) for i, c in members if len(c) > 1]
            rest: dict[int, tuple[float, bool]] = {}
            size = self.batch_size
            longer.sort(key=lambda m: len(m[1]))  # similar lengths share a batch
            for b in range(0, len(longer), size):
                batch = longer[b : b + size]
                for (i, _), row in zip(batch, self._rows(len(context), [c for _, c in batch]), strict=True):
                    rest[i] = row
            for (i, cont), logprob in zip(members, firsts, strict=True):
                total, greedy = rest.get(i, (0.0, True))
                answer = (logprob + total, greedy and cont[0] == best)
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                step(1)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity: each text in lm-eval's rolling windows of `max_length` tokens, every token
        predicted once, conditioned on the prefix token (BOS, else EOS) at the start."""
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            pairs = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1
            )
            for context, cont in map(lm_utils.make_disjoint_window, pairs):
                windows.append((None, context, cont))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm, kind="loglikelihood_rolling")
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scores, strict=True):
            totals[owner] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation -------------------------------------------------------------------------

    def _sampling(self, kwargs: dict[str, Any]) -> SamplingOptions:
        """Sampling options for `stream_generate` from lm-eval's normalized gen_kwargs."""
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        options = {"temperature": temperature if do_sample else 0.0}
        if do_sample:
            options["top_p"] = float(kwargs.pop("top_p", None) or 1.0)
            options["top_k"] = int(kwargs.pop("top_k", None) or 0)
            options["min_p"] = float(kwargs.pop("min_p", None) or 0.0)
        else:
            for name in ("top_p", "top_k", "min_p"):
                kwargs.pop(name, None)
        if kwargs.get("repetition_penalty") not in (None, 1, 1.0):
            options["repetition_penalty"] = float(kwargs.pop("repetition_penalty"))
        kwargs.pop("repetition_penalty", None)
        if kwargs.get("seed") is not None:
            options["seed"] = int(kwargs.pop("seed"))
        unknown = set(kwargs) - self._unknown_gen_kwargs
        if unknown:
            log.warning("nesso-mlx ignores these generation kwargs: %s", ", ".join(sorted(unknown)))
            self._unknown_gen_kwargs |= unknown
        return SamplingOptions(**options)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generate for each request until one of its `until` strings (or EOS, or `max_gen_toks`)."""
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        prepared = []
        for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
            kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            kwargs.pop("max_length", None)
            room = self.max_length - max_gen_toks
            if room <= 0:
                raise NessoError(f"max_gen_toks ({max_gen_toks}) must be below the context length ({self.max_length})")
            ids = self._encode_prompt(context) or [self.prefix_token_id]
            if len(ids) > room:
                self._warn_truncated(len(ids) - room)
                ids = ids[-room:]
            prepared.append((ids, i, until, max_gen_toks, self._sampling(kwargs)))
        results: list[str] = [""] * len(requests)
        step = self._bar("generate_until", len(requests), disable_tqdm)
        for ids, i, until, max_gen_toks, sampling in sorted(prepared, key=lambda p: (p[0], p[1])):
            keep = min(common_prefix(self._cached, ids), len(ids) - 1)
            rollback_cache(self._cache, keep)
            self._cached = list(ids[:keep])
            tokens = []
            try:
                for chunk in stream_generate(
                    self.model,
                    self.tokenizer,
                    ids[keep:],
                    cache=self._cache,
                    cached_ids=ids[:keep],
                    max_tokens=max_gen_toks,
                    stop=until,
                    sampling=sampling,
                ):
                    if chunk.token is not None:
                        tokens.append(chunk.token)
            finally:
                rollback_cache(self._cache, min(len(ids), self._cache[0].offset))
                self._cached = list(ids[: self._cache[0].offset])
            text = postprocess_generated_text(self.tok_decode(tokens), until, None)
            results[i] = text
            self.cache_hook.add_partial("generate_until", requests[i].args, text)
            step(1)
        return results


class _Bar:
    """Progress of one batch of requests: the `progress` callback, or else a tqdm bar like lm-eval's."""

    def __init__(self, kind: str, total: int, progress: Progress | None, disable: bool) -> None:
        self.kind, self.total, self.done, self.progress = kind, total, 0, progress
        self.tqdm = None
        if progress is None:
            from tqdm import tqdm

            self.tqdm = tqdm(total=total, disable=disable, desc=f"Running {kind} requests")
            if not total:
                self.tqdm.close()
        else:
            progress(kind, 0, total)

    def __call__(self, n: int = 1) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.kind, self.done, self.total)
        else:
            self.tqdm.update(n)
            if self.done >= self.total:
                self.tqdm.close()


def task_manager(include_path: str | Sequence[str] | None = None):
    """lm-eval's task index, with extra task folders (local YAML tasks, forks' tasks) first."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def unknown_tasks(manager, names: Sequence[str]) -> list[str]:
    """The names (tasks, groups, tags or patterns) that match no task of `manager`."""
    return [name for name in names if not manager.match_tasks([name])]


@contextmanager
def _quiet_task_building():
    """lm-eval draws a tqdm bar while it builds each task's prompts; hide it under our own bar."""
    import lm_eval.api.task as task_module

    original = task_module.tqdm
    task_module.tqdm = partial(original, disable=True)
    try:
        yield
    finally:
        task_module.tqdm = original


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    name: str = "",
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    apply_chat_template: bool = False,
    batch_size: int = 1,
    manager: Any = None,
    log_samples: bool = False,
    progress: Progress | None = None,
    **lm_args: Any,
) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` on a loaded nesso-mlx model; returns lm-eval's results dict.

    Defaults are those of lm-eval's command line (its seeds; few-shot examples as a multi-turn
    chat exactly when the chat template is applied)."""
    import lm_eval

    lm = NessoLM(pretrained=name or None, model=model, tokenizer=tokenizer, batch_size=batch_size, progress=progress, **lm_args)
    with _quiet_task_building() if progress is not None else nullcontext():
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager or task_manager(),
            apply_chat_template=apply_chat_template,
            fewshot_as_multiturn=apply_chat_template,
            log_samples=log_samples,
        )


def scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}}: the numeric metrics of a results dict, without their stderr."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        values = {}
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or "_stderr" in metric or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            values[metric if filter_name == "none" else key] = float(value)
        out[task] = values
    return out


_HF_MODELS = ("hf", "hf-auto", "huggingface")


def card_arguments(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """A model card's `lm-eval` arguments, for this backend: (arguments, notes for the user).

    `--model hf` (and `hf-auto`, `huggingface`) becomes `--model nesso-mlx`: the same weights and
    the same numbers (tested against lm-eval's hf backend), on MLX. `--device` is dropped: MLX
    picks its device itself (the GPU on a Mac). Everything else is lm-eval's own.
    """
    out: list[str] = []
    notes: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if name in ("--model", "--device") and not eq:
            if i + 1 == len(args):  # no value: lm-eval's own parser says what is missing
                out.append(arg)
                break
            value = args[i + 1]
            i += 1
        if name == "--model" and value in _HF_MODELS:
            notes.append(f"note: --model {value} runs on MLX here, through nesso-mlx (the numbers of lm-eval's hf backend)")
            out += ["--model", "nesso-mlx"]
        elif name == "--device":
            notes.append(f"note: --device {value} ignored: MLX picks its device itself (the GPU on a Mac)")
        elif name == "--model":
            out += ["--model", value]
        else:
            out.append(arg)
        i += 1
    return out, notes


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line with the `nesso-mlx` model type registered; a model card's
    `lm-eval --model hf ... --device cuda:0` arguments run as they are (see `card_arguments`)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    args, notes = card_arguments(sys.argv[1:] if argv is None else argv)
    for note in notes:
        print(note, file=sys.stderr)
    sys.argv = [sys.argv[0], *args]  # lm-eval's parser reads sys.argv (and inserts `run` when it is missing)
    try:
        cli_evaluate()
    except NessoError as e:  # a model that cannot be found or loaded: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
