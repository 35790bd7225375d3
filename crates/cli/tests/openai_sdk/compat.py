"""The official `openai` Python package against a running `neocloud serve`.

Usage: python compat.py BASE_URL   (BASE_URL ends in /v1; the server runs
qwen2.5-coder-0.5b-instruct and gemma-3-270m with a waiting queue of 1).
Exits non-zero, with the failed check, when the server and the SDK disagree.
"""

import json
import sys

import openai
from openai import OpenAI

QWEN = "qwen2.5-coder-0.5b-instruct"
GEMMA = "gemma-3-270m"


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok: {what}")


def expect_error(kind, status, call):
    try:
        call()
    except kind as e:
        check(e.status_code == status, f"{kind.__name__} with status {status}")
        body = e.body if isinstance(e.body, dict) else {}
        check("message" in body and "type" in body, f"{status} body has OpenAI's error fields")
        return e
    raise AssertionError(f"expected {kind.__name__} ({status})")


def main(base_url, api_key):
    client = OpenAI(base_url=base_url, api_key=api_key or "not-needed", max_retries=0, timeout=300)
    if api_key:
        # A key the server does not know is the SDK's AuthenticationError.
        wrong = OpenAI(base_url=base_url, api_key=api_key[:-8] + "00000000", max_retries=0)
        expect_error(openai.AuthenticationError, 401, lambda: wrong.models.list())

    ids = [m.id for m in client.models.list()]
    check(ids == [QWEN, GEMMA], f"models.list() gives {ids}")

    messages = [{"role": "user", "content": "Name three prime numbers."}]
    r = client.chat.completions.create(model=QWEN, messages=messages, max_tokens=24, temperature=0)
    answer = r.choices[0].message.content
    check(bool(answer), "non-streaming chat answers")
    check(r.choices[0].finish_reason in ("stop", "length"), "finish_reason is stop or length")
    check(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, "usage adds up")

    stream = client.chat.completions.create(
        model=QWEN, messages=messages, max_tokens=24, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    check(text == answer, "streamed text equals the collected text")
    check(finish == r.choices[0].finish_reason, "streamed finish_reason matches")
    check(usage is not None and usage.completion_tokens == r.usage.completion_tokens,
          "usage arrives in the last chunk")

    c = client.completions.create(
        model=GEMMA, prompt="The meaning of life is", max_tokens=0, echo=True, logprobs=5,
    )
    lp = c.choices[0].logprobs
    check(c.choices[0].text == "The meaning of life is", "echo returns the prompt")
    check(len(lp.tokens) == c.usage.prompt_tokens, "one log-probability entry per prompt token")
    check(lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:]),
          "prompt log-probabilities are scored")
    check(all(len(t) >= 5 for t in lp.top_logprobs[1:]), "five alternatives per position")
    c = client.completions.create(
        model=GEMMA, prompt="The meaning of life is", max_tokens=8, temperature=0, echo=True, logprobs=1,
    )
    check(c.choices[0].text.startswith("The meaning of life is not"), "completions generate after the echo")

    tools = [{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]},
        },
    }]
    question = {"role": "user", "content": "What is the weather in Seoul?"}
    r = client.chat.completions.create(
        model=QWEN, messages=[question], tools=tools, temperature=0, max_tokens=64,
    )
    choice = r.choices[0]
    check(choice.finish_reason == "tool_calls", "the model calls a tool")
    call = choice.message.tool_calls[0]
    check(call.function.name == "get_weather", "the call names get_weather")
    check(json.loads(call.function.arguments).get("city") == "Seoul", "the arguments are JSON")
    follow_up = [
        question,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21})},
    ]
    r2 = client.chat.completions.create(
        model=QWEN, messages=follow_up, tools=tools, temperature=0, max_tokens=32,
    )
    check(r2.usage.prompt_tokens > r.usage.prompt_tokens, "the tool result goes back to the model")

    expect_error(openai.NotFoundError, 404, lambda: client.chat.completions.create(
        model="no-such-model", messages=messages))
    e = expect_error(openai.BadRequestError, 400, lambda: client.chat.completions.create(
        model=QWEN, messages=messages, temperature=5))
    check(e.body.get("param") == "temperature", "the 400 names the parameter")
    e = expect_error(openai.BadRequestError, 400, lambda: client.chat.completions.create(
        model=QWEN, messages=messages, max_tokens=100000))
    check(e.body.get("code") == "context_length_exceeded", "context overflow has its code")
    expect_error(openai.APIStatusError, 413, lambda: client.chat.completions.create(
        model=QWEN, messages=[{"role": "user", "content": "x" * (3 << 20)}]))

    # One request runs, one waits in the queue of 1; the next gets 503.
    long = dict(model=GEMMA, messages=[{"role": "user", "content": "Count to a thousand."}],
                max_tokens=2000, temperature=0, stream=True, extra_body={"ignore_eos": True})
    running = client.chat.completions.create(**long)
    # The role chunk goes out before the job joins the batch; a chunk with
    # text means it runs.
    for chunk in running:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    waiting = client.chat.completions.create(**long)
    e = expect_error(openai.APIStatusError, 503, lambda: client.chat.completions.create(
        model=GEMMA, messages=messages, max_tokens=4))
    check(e.response.headers.get("retry-after") == "1", "503 carries Retry-After")
    waiting.close()
    running.close()
    print("all checks passed")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
