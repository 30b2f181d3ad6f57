"""Requests of `nesso-mlx serve`'s protocols: one request core, a module per protocol (no HTTP here).

- `core`: what every protocol translates to and from. Field checks (`number`, `integer`,
  `boolean`, `refuse_unknown`, `check_depth`; `RequestError` names the bad field), the core
  request `ChatRequest` (messages, tools, tool choice, format, sampling, stops), its prompt ids
  (`chat_prompt_ids`, `check_context`), generation options, and the reply events: `ChatReply`
  parses tool calls out of the model's text once, as OpenAI chat deltas, and `BlockStream` is the
  block state machine the Responses and Messages streams share.
- `chat_completions`: POST /v1/chat/completions (OpenAI).
- `completions`: POST /v1/completions (OpenAI's legacy completions; prompts, not messages).
- `responses`: POST /v1/responses, GET and DELETE /v1/responses/{id} (OpenAI's Responses API).
- `anthropic_messages`: POST /v1/messages and /v1/messages/count_tokens (Anthropic).

Each protocol module gives a parser (body -> request, raising `RequestError`) and a stream
builder (the core's events -> the protocol's SSE events, or its whole reply object); `server.py`
routes and runs them. The names below are re-exported for the callers of the former
`nesso_mlx.request` module.
"""

from .chat_completions import ChatCompletionStream, parse_chat_request
from .completions import CompletionRequest, CompletionStream, LegacyLogprobs, completion_prompt_ids, parse_completion_request
from .core import (
    MAX_JSON_DEPTH,
    BlockStream,
    ChatReply,
    ChatRequest,
    RequestError,
    Sampling,
    chat_prompt_ids,
    check_context,
    check_depth,
    generation_options,
    logits_processors,
    parse_messages,
    penalty_processor,
    usage,
)

__all__ = [
    "MAX_JSON_DEPTH",
    "BlockStream",
    "ChatCompletionStream",
    "ChatReply",
    "ChatRequest",
    "CompletionRequest",
    "CompletionStream",
    "LegacyLogprobs",
    "RequestError",
    "Sampling",
    "chat_prompt_ids",
    "check_context",
    "check_depth",
    "completion_prompt_ids",
    "generation_options",
    "logits_processors",
    "parse_chat_request",
    "parse_completion_request",
    "parse_messages",
    "penalty_processor",
    "usage",
]
