"""The server's protocols beyond Chat Completions, each a thin translation over the chat request core.

`anthropic_messages` (POST /v1/messages) and `responses` (POST /v1/responses) turn their request
bodies into a `request.ChatRequest` (messages for the chat template, tools, tool choice, format,
sampling and stops) and turn the core's reply events (`server_engine.chat_job`: "ready", "delta"
with OpenAI chat deltas, "done") into their own objects and streamed events. Tool calls are parsed
once, by the core's `ChatReply`; no protocol parses model text. No HTTP here: `server.py` routes.
"""
