#!/usr/bin/env python3
"""Checks the Grafana dashboard against the metrics zeroshard has. Run by
scripts/check-k8s.sh, with the venv's Python (promql-parser).

    check-dashboard.py DASHBOARD.json REPO
    check-dashboard.py --self-test DASHBOARD.json REPO

Prints the number of panels and queries on stdout; exits 1 with one line per
problem on stderr:

- valid JSON without repeated keys; schemaVersion, uid and title set; panel
  ids unique; every panel inside the 24-column grid, none overlapping;
- one data source input, DS_PROMETHEUS (Prometheus), used by every panel,
  query and variable;
- every query (and every variable's label_values) parses as PromQL, with
  Grafana's $__rate_interval and the like replaced by a duration;
- every series it selects is a zeroshard_* metric named in the Rust sources
  of REPO (coordinator, worker, engine, offload, src: read at check time, so a
  renamed metric fails here), _bucket/_sum/_count only of a histogram;
  rate() and increase() only of counters (_total) and histogram parts;
  histogram_quantile() over buckets summed by le;
- every label it groups or matches by is one zeroshard records (model,
  worker, outcome, ...: read from the sources too), le, or one Prometheus adds
  when it discovers a target in Kubernetes (namespace, pod, ...).

--self-test breaks the dashboard in several ways and fails unless each
breakage is caught.
"""
import copy
import json
import pathlib
import re
import sys

import promql_parser as pq

SOURCES = ("coordinator", "worker", "engine", "offload", "src")
DATASOURCE = "${DS_PROMETHEUS}"
# What Prometheus' Kubernetes discovery (and the Prometheus Operator's
# monitors) put on every target, and what a histogram adds.
TARGET_LABELS = {"namespace", "pod", "instance", "job", "container", "service", "endpoint"}
HISTOGRAM_PARTS = ("_bucket", "_sum", "_count")
# Grafana's own variables, as durations PromQL accepts.
GRAFANA_DURATIONS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
COUNTER_FUNCTIONS = {"rate", "irate", "increase"}

STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
NAME = re.compile(r"zeroshard_[a-z0-9_]+")
HISTOGRAM = re.compile(r'histogram!\(\s*"(zeroshard_[a-z0-9_]+)"')
MACRO_LABEL = re.compile(r'(?:counter|gauge|histogram)!\(\s*"zeroshard_[a-z0-9_]+"\s*,([^;]*?)\)', re.S)
LABEL_KEY = re.compile(r'"([a-z_]+)"\s*=>')
GLOBAL_LABEL = re.compile(r'add_global_label\(\s*"([a-z_]+)"')
TEXT_LABEL = re.compile(r'[{,]([a-z_]+)=\\"')
CRATE = re.compile(r'^name\s*=\s*"(zeroshard[a-z0-9-]*)"', re.M)
LABEL_VALUES = re.compile(r"^label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)$", re.S)


def source_metrics(repo):
    """(metric names, histogram names, label names) from the Rust sources:
    names inside string literals of lines that are not comments, less the
    crates' own names (zeroshard_worker in a log filter is no metric)."""
    names, histograms, labels = set(), set(), set()
    crates = set()
    for manifest in repo.glob("*/Cargo.toml"):
        crates.update(n.replace("-", "_") for n in CRATE.findall(manifest.read_text(encoding="utf-8")))
    for top in SOURCES:
        for path in sorted((repo / top).rglob("*.rs")):
            text = path.read_text(encoding="utf-8", errors="replace")
            code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("//"))
            for literal in STRING.findall(code):
                names.update(NAME.findall(literal))
                labels.update(TEXT_LABEL.findall(literal))
            histograms.update(HISTOGRAM.findall(code))
            for args in MACRO_LABEL.findall(code):
                labels.update(LABEL_KEY.findall(args))
            labels.update(GLOBAL_LABEL.findall(code))
    return names - crates, histograms, labels


def no_repeated_keys(pairs):
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"repeated keys {repeated}")
    return dict(pairs)


def all_panels(dash):
    for p in dash.get("panels", []):
        yield p
        yield from p.get("panels", [])


def query_problems(where, expr, known):
    """Problems of one PromQL expression, as lines."""
    names, histograms, labels = known
    text = expr
    for var, duration in GRAFANA_DURATIONS.items():
        text = text.replace(var, duration)
    try:
        ast = pq.parse(text)
    except ValueError as e:
        return [f"{where}: not PromQL ({e}): {expr}"]
    out = []
    allowed_labels = labels | TARGET_LABELS | {"le"}

    def label_use(ls, what):
        for label in ls:
            if label not in allowed_labels:
                out.append(f"{where}: {what} label {label!r}, which no zeroshard series carries: {expr}")

    def selected(node):
        """The metric names a subtree selects."""
        found = []
        pq.walk(node, pre_visit=lambda n: found.append(n.name) if isinstance(n, pq.VectorSelector) else None)
        return found

    def visit(n):
        if isinstance(n, pq.VectorSelector):
            name = n.name
            if name is None:
                out.append(f"{where}: a selector without a metric name: {expr}")
                return
            label_use([m.name for m in n.matchers.matchers], "matches")
            base = next((name[: -len(s)] for s in HISTOGRAM_PARTS if name.endswith(s)), None)
            if not name.startswith("zeroshard_"):
                out.append(f"{where}: {name} is not a zeroshard_* metric: {expr}")
            elif name in names:
                pass
            elif base in histograms:
                pass
            elif base in names:
                out.append(f"{where}: {name}: {base} is not a histogram in the sources: {expr}")
            else:
                out.append(f"{where}: {name} is named nowhere in the Rust sources ({', '.join(SOURCES)}): {expr}")
        elif isinstance(n, pq.AggregateExpr) and n.modifier is not None:
            label_use(n.modifier.labels, str(n.modifier.type).rsplit(".", 1)[-1].lower())
        elif isinstance(n, pq.BinaryExpr) and n.modifier is not None:
            if n.modifier.matching is not None:
                label_use(n.modifier.matching.labels, "joins on")
            label_use(n.modifier.group_labels or [], "groups")
        elif isinstance(n, pq.Call):
            fn = n.func.name
            if fn in COUNTER_FUNCTIONS:
                for name in selected(n):
                    if not name.endswith("_total") and not name.endswith(HISTOGRAM_PARTS):
                        out.append(f"{where}: {fn}() of {name}, which is no counter: {expr}")
            if fn == "histogram_quantile":
                q, inner = n.args
                if not isinstance(q, pq.NumberLiteral) or not 0 <= q.val <= 1:
                    out.append(f"{where}: histogram_quantile's quantile is not a number in [0, 1]: {expr}")
                sums = []
                pq.walk(inner, pre_visit=lambda m: sums.append(m) if isinstance(m, pq.AggregateExpr) else None)
                by_le = sums and sums[0].modifier is not None and "le" in sums[0].modifier.labels \
                    and str(sums[0].modifier.type).endswith("By")
                if not by_le or not all(s.endswith("_bucket") for s in selected(inner)):
                    out.append(f"{where}: histogram_quantile() needs _bucket series summed by (le, ...): {expr}")

    pq.walk(ast, pre_visit=visit)
    return out


def problems(dash, known):
    """Every problem of the dashboard, as lines."""
    out = []
    for key in ("schemaVersion", "uid", "title"):
        if not dash.get(key):
            out.append(f"dashboard: no {key}")
    if not isinstance(dash.get("schemaVersion"), int):
        out.append("dashboard: schemaVersion is not a number")
    inputs = dash.get("__inputs", [])
    if [(i.get("name"), i.get("type"), i.get("pluginId")) for i in inputs] != \
            [("DS_PROMETHEUS", "datasource", "prometheus")]:
        out.append(f"dashboard: __inputs must be the one Prometheus data source DS_PROMETHEUS, not {inputs}")

    def datasource(where, ds):
        if not isinstance(ds, dict) or ds.get("type") != "prometheus" or ds.get("uid") != DATASOURCE:
            out.append(f"{where}: data source {ds!r} is not {{type: prometheus, uid: {DATASOURCE}}}")

    ids, cells, queries = {}, {}, 0
    for p in all_panels(dash):
        where = f"panel {p.get('id')} {p.get('title')!r}"
        if not isinstance(p.get("id"), int):
            out.append(f"{where}: no numeric id")
        elif p["id"] in ids:
            out.append(f"{where}: id {p['id']} is taken by {ids[p['id']]!r}")
        else:
            ids[p["id"]] = p.get("title")
        if not p.get("title"):
            out.append(f"{where}: no title")
        g = p.get("gridPos", {})
        if not all(isinstance(g.get(k), int) for k in "hwxy") or g["w"] < 1 or g["h"] < 1 \
                or g["x"] < 0 or g["y"] < 0 or g["x"] + g["w"] > 24:
            out.append(f"{where}: gridPos {g} is not inside the 24-column grid")
        else:
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    if (x, y) in cells:
                        out.append(f"{where}: overlaps panel {cells[(x, y)]!r}")
                        break
                    cells[(x, y)] = p.get("title")
                else:
                    continue
                break
        if p.get("type") == "row":
            continue
        datasource(where, p.get("datasource"))
        targets = p.get("targets") or []
        if not targets:
            out.append(f"{where}: no query")
        refs = [t.get("refId") for t in targets]
        if len(set(refs)) != len(refs) or not all(refs):
            out.append(f"{where}: refIds {refs} are not unique")
        for t in targets:
            datasource(f"{where} query {t.get('refId')}", t.get("datasource"))
            queries += 1
            out += query_problems(f"{where} query {t.get('refId')}", t.get("expr", ""), known)
    if not ids:
        out.append("dashboard: no panels")
    for v in dash.get("templating", {}).get("list", []):
        where = f"variable {v.get('name')}"
        if v.get("type") != "query":
            continue
        datasource(where, v.get("datasource"))
        query = v.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        m = LABEL_VALUES.match(query or "")
        if not m:
            out.append(f"{where}: query {query!r} is not label_values(SERIES, LABEL)")
            continue
        out += query_problems(where, m.group(1), known)
        _, _, labels = known
        if m.group(2) not in labels | TARGET_LABELS:
            out.append(f"{where}: label {m.group(2)!r} is carried by no zeroshard series")
    return out, len(ids), queries


def self_test(dash, known):
    """Breaks the dashboard in ways the checks must catch."""
    def first_query(d, title):
        return next(p for p in all_panels(d) if p.get("title") == title)["targets"][0]

    def setq(title, f):
        return lambda d: first_query(d, title).update(expr=f(first_query(d, title)["expr"]))

    breakages = {
        "a misspelled metric": setq("Tokens per second", lambda e: e.replace("generated_tokens", "generated_token")),
        "a metric of another program": setq("Tokens per second", lambda e: e.replace(
            "zeroshard_generated_tokens_total", "vllm:generation_tokens_total")),
        "PromQL syntax": setq("Tokens per second", lambda e: e + " +"),
        "a label no series carries": setq("Requests by outcome", lambda e: e.replace("(outcome)", "(outcomes)")),
        "rate() of a gauge": setq("Queue", lambda e: f"rate({e.replace('sum(', '').rstrip(')')}[5m])"),
        "a histogram part of a counter": setq("Tokens per second", lambda e: e.replace("_total", "_total_bucket")),
        "a quantile without le": setq("Time to first token", lambda e: e.replace("sum by (le)", "sum")),
        "a repeated panel id": lambda d: d["panels"][2].update(id=d["panels"][1]["id"]),
        "overlapping panels": lambda d: d["panels"][2]["gridPos"].update(x=d["panels"][1]["gridPos"]["x"]),
        "another data source": lambda d: first_query(d, "Queue").update(datasource={"type": "prometheus",
                                                                                    "uid": "prom"}),
    }
    base, _, _ = problems(dash, known)
    if base:
        return [f"self-test: the unbroken dashboard already fails: {base[0]}"]
    failed = []
    for what, breakage in breakages.items():
        broken = copy.deepcopy(dash)
        breakage(broken)
        if not problems(broken, known)[0]:
            failed.append(f"self-test: {what} went unnoticed")
    return failed


def main(argv):
    test = len(argv) == 4 and argv[1] == "--self-test"
    if not test and len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    path, repo = pathlib.Path(argv[-2]), pathlib.Path(argv[-1])
    try:
        dash = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=no_repeated_keys)
    except ValueError as e:
        print(f"{path}: not valid JSON: {e}", file=sys.stderr)
        return 1
    known = source_metrics(repo)
    if not known[0] or not known[1]:
        print(f"{repo}: found no zeroshard_* metric or histogram in {', '.join(SOURCES)}", file=sys.stderr)
        return 1
    if test:
        errs = self_test(dash, known)
    else:
        errs, panels, queries = problems(dash, known)
        if not errs:
            print(f"{panels} panels, {queries} queries")
    for e in errs:
        print(e, file=sys.stderr)
    return 1 if errs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
