"""Drives a zeroshard HTTP front with the official `openai` client; prints one JSON object.

    python openai_check.py BASE_URL MODEL PROMPT MAX_TOKENS [API_KEY]
"""
import json
import sys

import openai
from openai import OpenAI

base, model, prompt, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
key = sys.argv[5] if len(sys.argv) > 5 else "unused"
client = OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
out = {"openai_version": openai.__version__}
out["models"] = [m.id for m in client.models.list()]

greedy = dict(model=model, prompt=prompt, max_tokens=n, temperature=0, extra_body={"ignore_eos": True})
r = client.completions.create(**greedy)
out["text"] = r.choices[0].text
out["finish_reason"] = r.choices[0].finish_reason
out["usage"] = r.usage.model_dump()

parts, finish, usage = [], None, None
for chunk in client.completions.create(**greedy, stream=True, stream_options={"include_usage": True}):
    if chunk.choices:
        parts.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage:
        usage = chunk.usage.model_dump()
out["stream_text"] = "".join(parts)
out["stream_chunks"] = len(parts)
out["stream_finish_reason"] = finish
out["stream_usage"] = usage

# A list of prompts (LangChain's batch()): one choice per prompt, by index.
batch = client.completions.create(**{**greedy, "prompt": [prompt, prompt]})
out["batch_texts"] = [c.text for c in sorted(batch.choices, key=lambda c: c.index)]
# Log-probabilities as the SDK types them.
rated = client.completions.create(**{**greedy, "max_tokens": 4, "logprobs": 2})
out["logprob_tokens"] = rated.choices[0].logprobs.tokens
out["logprob_top_sizes"] = [len(t) for t in rated.choices[0].logprobs.top_logprobs]

stopped = client.completions.create(**{**greedy, "stop": [" the"]})
out["stop_text"] = stopped.choices[0].text
out["stop_finish_reason"] = stopped.choices[0].finish_reason


def failure(**kw):
    try:
        client.completions.create(**kw)
    except openai.APIStatusError as e:
        return {"status": e.status_code, "type": type(e).__name__, "message": e.message}
    return None


out["wrong_model"] = failure(model="no-such-model", prompt="x", max_tokens=1)
out["bad_temperature"] = failure(model=model, prompt="x", max_tokens=1, temperature=-1)
out["penalty"] = failure(model=model, prompt="x", max_tokens=1, frequency_penalty=0.5)
print(json.dumps(out))
