"""Scrapes a Prometheus endpoint and parses it with prometheus_client's text
parser (the exposition format's reference implementation in Python); prints
one JSON object: {"families": {name: type}, "samples": [[name, labels, value]]}.
A text that does not parse is an exception (exit status 1).

    python metrics_check.py URL
"""
import json
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
    content_type = r.headers.get("Content-Type", "")
    text = r.read().decode("utf-8")
families, samples = {}, []
for f in text_string_to_metric_families(text):
    families[f.name] = f.type
    for s in f.samples:
        samples.append([s.name, s.labels, s.value])
print(json.dumps({"content_type": content_type, "families": families, "samples": samples}))
