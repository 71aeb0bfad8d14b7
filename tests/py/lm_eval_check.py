"""Runs lm-evaluation-harness against a zeroshard HTTP front; prints one JSON object.

    OPENAI_API_KEY=KEY python lm_eval_check.py COMPLETIONS_URL MODEL_DIR LOGLIKELIHOOD_REFS WORK_DIR

Builds a two-choice task from the reference file's context/continuation
pairs (consecutive items share a context; the gold answer alternates between
the first and the second choice) over a local JSON dataset, runs it with
`local-completions` (token ids sent, BOS first as the references encode), and
prints each choice's log-likelihood and greedy flag as lm_eval computed them,
with the task's accuracy. Nothing is downloaded.
"""
import importlib.metadata
import json
import os
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

url, model_dir, refs_path, work = sys.argv[1:5]
items = json.load(open(refs_path))["items"]
docs = []
for i in range(0, len(items) - 1, 2):
    first, second = items[i], items[i + 1]
    assert first["context"] == second["context"], "consecutive items share a context"
    docs.append({"context": first["context"], "choices": [first["continuation"], second["continuation"]],
                 "gold": len(docs) % 2})
data = os.path.join(work, "stories_refs.jsonl")
with open(data, "w") as f:
    for d in docs:
        f.write(json.dumps(d) + "\n")
# The continuations carry their own leading space: no delimiter between.
task = f"""task: zeroshard_stories_refs
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
"""
with open(os.path.join(work, "stories_refs.yaml"), "w") as f:
    f.write(task)

model_args = ",".join([
    f"base_url={url}",
    "model=stories260K",
    f"tokenizer={model_dir}",
    "tokenizer_backend=huggingface",
    "add_bos_token=True",
    "num_concurrent=1",
    "max_retries=1",
])
results = lm_eval.simple_evaluate(
    model="local-completions",
    model_args=model_args,
    tasks=["zeroshard_stories_refs"],
    task_manager=TaskManager(include_path=work),
    log_samples=True,
    batch_size=4,
)
samples = sorted(results["samples"]["zeroshard_stories_refs"], key=lambda s: s["doc_id"])
out_items = []
for s in samples:
    for ll, greedy in s["filtered_resps"]:
        out_items.append({"loglikelihood": float(ll), "is_greedy": bool(greedy), "gold": s["doc"]["gold"]})
print(json.dumps({
    "lm_eval_version": importlib.metadata.version("lm_eval"),
    "acc": results["results"]["zeroshard_stories_refs"]["acc,none"],
    "items": out_items,
}))
