"""Agent frameworks that are not test dependencies, against a running `nesso-mlx serve` (see docs/server.md).

    python tests/frameworks_check.py http://127.0.0.1:8080

Needs pydantic-ai-slim[openai,anthropic], langchain-openai, langchain-anthropic and instructor. Prints
one line per check (ok or FAIL with the error) and exits 1 if any failed.
"""

import sys
import traceback

from pydantic import BaseModel

BASE = sys.argv[1]  # http://127.0.0.1:PORT
results = {}


def check(name):
    def deco(fn):
        try:
            out = fn()
            results[name] = "ok " + str(out)[:200]
        except Exception as e:
            results[name] = "FAIL " + "".join(traceback.format_exception_only(type(e), e))[:600]
        print(name, results[name], flush=True)
        return fn

    return deco


class City(BaseModel):
    name: str
    country: str


def get_weather(city: str) -> str:
    """Get the weather of a city."""
    return f"sunny in {city}"


@check("pydantic-ai responses tool")
def _():
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    m = OpenAIResponsesModel("nesso", provider=OpenAIProvider(base_url=BASE + "/v1", api_key="x"))
    a = Agent(m, tools=[get_weather], model_settings={"max_tokens": 40, "temperature": 0})
    r = a.run_sync("What is the weather in Rome? Use the tool.")
    return r.output


@check("pydantic-ai responses structured")
def _():
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    m = OpenAIResponsesModel("nesso", provider=OpenAIProvider(base_url=BASE + "/v1", api_key="x"))
    a = Agent(m, output_type=City, model_settings={"max_tokens": 40, "temperature": 0})
    return a.run_sync("Rome is a city in Italy. Extract it.").output


@check("pydantic-ai anthropic tool")
def _():
    from pydantic_ai import Agent
    from pydantic_ai.models.anthropic import AnthropicModel
    from pydantic_ai.providers.anthropic import AnthropicProvider

    m = AnthropicModel("nesso", provider=AnthropicProvider(base_url=BASE, api_key="x"))
    a = Agent(m, tools=[get_weather], model_settings={"max_tokens": 40, "temperature": 0})
    return a.run_sync("What is the weather in Rome? Use the tool.").output


@check("pydantic-ai anthropic structured")
def _():
    from pydantic_ai import Agent
    from pydantic_ai.models.anthropic import AnthropicModel
    from pydantic_ai.providers.anthropic import AnthropicProvider

    m = AnthropicModel("nesso", provider=AnthropicProvider(base_url=BASE, api_key="x"))
    a = Agent(m, output_type=City, model_settings={"max_tokens": 40, "temperature": 0})
    return a.run_sync("Rome is a city in Italy. Extract it.").output


@check("pydantic-ai anthropic stream text")
def _():
    import asyncio

    from pydantic_ai import Agent
    from pydantic_ai.models.anthropic import AnthropicModel
    from pydantic_ai.providers.anthropic import AnthropicProvider

    m = AnthropicModel("nesso", provider=AnthropicProvider(base_url=BASE, api_key="x"))
    a = Agent(m, model_settings={"max_tokens": 12, "temperature": 0})

    async def go():
        async with a.run_stream("Say hi.") as r:
            return [t async for t in r.stream_text(delta=True)]

    return asyncio.run(go())


@check("pydantic-ai responses stream text")
def _():
    import asyncio

    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    m = OpenAIResponsesModel("nesso", provider=OpenAIProvider(base_url=BASE + "/v1", api_key="x"))
    a = Agent(m, model_settings={"max_tokens": 12, "temperature": 0})

    async def go():
        async with a.run_stream("Say hi.") as r:
            return [t async for t in r.stream_text(delta=True)]

    return asyncio.run(go())


@check("langchain responses invoke+tools+structured")
def _():
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="nesso", base_url=BASE + "/v1", api_key="x", use_responses_api=True, max_tokens=40, temperature=0)
    a = llm.invoke("Say hi.").content
    b = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Rome?").tool_calls
    c = llm.with_structured_output(City).invoke("Rome is a city in Italy.")
    d = [ch for ch in llm.bind_tools([get_weather], tool_choice="any").stream("Weather in Rome?")]
    return a, b, c, len(d)


@check("langchain anthropic invoke+tools+structured+stream")
def _():
    from langchain_anthropic import ChatAnthropic

    llm = ChatAnthropic(model="claude-x", base_url=BASE, api_key="x", max_tokens=40, temperature=0)
    a = llm.invoke("Say hi.").content
    b = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Rome?").tool_calls
    c = llm.with_structured_output(City).invoke("Rome is a city in Italy.")
    d = [ch for ch in llm.bind_tools([get_weather], tool_choice="any").stream("Weather in Rome?")]
    return a, b, c, len(d)


@check("instructor anthropic tools")
def _():
    import anthropic
    import instructor

    client = instructor.from_anthropic(anthropic.Anthropic(base_url=BASE, api_key="x"))
    return client.messages.create(
        model="x", max_tokens=40, messages=[{"role": "user", "content": "Rome is a city in Italy."}], response_model=City
    )


@check("instructor anthropic json")
def _():
    import anthropic
    import instructor

    client = instructor.from_anthropic(anthropic.Anthropic(base_url=BASE, api_key="x"), mode=instructor.Mode.ANTHROPIC_JSON)
    return client.messages.create(
        model="x", max_tokens=40, messages=[{"role": "user", "content": "Rome is a city in Italy."}], response_model=City
    )


@check("instructor responses tools")
def _():
    import instructor
    import openai

    client = instructor.from_openai(openai.OpenAI(base_url=BASE + "/v1", api_key="x"), mode=instructor.Mode.RESPONSES_TOOLS)
    return client.responses.create(
        model="x", max_output_tokens=40, input=[{"role": "user", "content": "Rome is a city in Italy."}], response_model=City
    )


@check("openai-agents streamed responses tool")
def _():
    import asyncio

    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    tool = function_tool(get_weather)
    m = OpenAIResponsesModel("nesso", AsyncOpenAI(base_url=BASE + "/v1", api_key="x"))
    a = Agent(
        "a",
        instructions="Use tools.",
        model=m,
        tools=[tool],
        model_settings=ModelSettings(max_tokens=40, temperature=0, tool_choice="required"),
        tool_use_behavior="stop_on_first_tool",
    )

    async def go():
        r = Runner.run_streamed(a, "Weather in Rome?")
        n = 0
        async for _event in r.stream_events():
            n += 1
        return n, r.final_output

    return asyncio.run(go())


sys.exit(any(v.startswith("FAIL") for v in results.values()))
