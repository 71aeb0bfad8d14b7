"""Chat through a zeroshard HTTP front with the official `openai` client, and
the prompt transformers' own `apply_chat_template` makes for the same messages
from the same model folder; prints one JSON object.

    python chat_check.py BASE_URL MODEL MODEL_DIR MESSAGES_JSON MAX_TOKENS
"""
import json
import sys

import openai
import transformers
from openai import OpenAI
from transformers import AutoTokenizer

base, model, model_dir, messages, n = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5])
out = {"openai_version": openai.__version__, "transformers_version": transformers.__version__}

tok = AutoTokenizer.from_pretrained(model_dir)
out["reference_text"] = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
out["reference_ids"] = list(ids["input_ids"] if hasattr(ids, "keys") else ids)

key = sys.argv[6] if len(sys.argv) > 6 else "unused"
client = OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
greedy = dict(model=model, messages=messages, max_tokens=n, temperature=0, extra_body={"ignore_eos": True})
r = client.chat.completions.create(**greedy)
out["text"] = r.choices[0].message.content
out["role"] = r.choices[0].message.role
out["finish_reason"] = r.choices[0].finish_reason
out["usage"] = r.usage.model_dump()

parts, roles, finish, usage = [], [], None, None
for chunk in client.chat.completions.create(**greedy, stream=True, stream_options={"include_usage": True}):
    if chunk.choices:
        d = chunk.choices[0].delta
        if d.role:
            roles.append(d.role)
        if d.content:
            parts.append(d.content)
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage:
        usage = chunk.usage.model_dump()
out["stream_text"] = "".join(parts)
out["stream_chunks"] = len(parts)
out["stream_roles"] = roles
out["stream_finish_reason"] = finish
out["stream_usage"] = usage

# Without a limit, a chat answer may run to the end of the context (finish "length").
r = client.chat.completions.create(model=model, messages=messages, temperature=0, extra_body={"ignore_eos": True})
out["unlimited_finish_reason"] = r.choices[0].finish_reason
out["unlimited_usage"] = r.usage.model_dump()

try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    out["image_part"] = None
except openai.APIStatusError as e:
    out["image_part"] = {"status": e.status_code, "message": e.message}
print(json.dumps(out))
