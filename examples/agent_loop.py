"""The agent loop through the Python API: the model calls tools until it can answer.

python examples/agent_loop.py [--model nesso-agentic] "Che tempo fa a Torino? E quanto fa 17 * 23?"
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nesso_mlx import load
from nesso_mlx.agent import StepLimit, ToolRun, agent_turn, load_tools_file
from nesso_mlx.chat import ChatSession, SamplingSettings
from nesso_mlx.reply import GenerationChunk


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("question")
    parser.add_argument("--model", default="nesso-agentic")
    parser.add_argument("--tools", default=str(Path(__file__).with_name("tools.py")))
    parser.add_argument("--tool-choice", default=None, help="for the first reply: auto, required or a tool name")
    args = parser.parse_args()

    functions = load_tools_file(args.tools)
    model, tokenizer = load(args.model)
    # Greedy or low temperature works best for tool calls.
    session = ChatSession(
        model, tokenizer, tools=list(functions.values()), settings=SamplingSettings(temperature=0.0, max_tokens=512)
    )
    steps = agent_turn(session, args.question, functions, confirm=lambda call: True, max_steps=5, tool_choice=args.tool_choice)
    for event in steps:
        if isinstance(event, GenerationChunk):
            print(event.text, end="", flush=True)
        elif isinstance(event, ToolRun):
            print(f"\n[{event.call.name}({event.call.arguments}) -> {event.status}: {event.result}]")
        elif isinstance(event, StepLimit):
            print(f"\n[stopped after {event.steps} rounds of tool calls]")
    print()


if __name__ == "__main__":
    main()
