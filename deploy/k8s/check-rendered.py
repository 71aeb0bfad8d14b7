#!/usr/bin/env python3
"""Checks what a schema cannot: that the objects of one rendered overlay fit
together and fit zeroshard. Run by scripts/check-k8s.sh, with the venv's
Python (PyYAML).

    check-rendered.py OVERLAY RENDERED.yaml [OTHER_RENDERING.yaml]
    check-rendered.py --same RENDERED.yaml OTHER_RENDERING.yaml
    check-rendered.py --self-test OVERLAY RENDERED.yaml
    check-rendered.py --core RENDERED.yaml

Prints the number of objects on stdout; exits 1 with one line per problem on
stderr. With a second rendering (the same overlay by another Kustomize), the
two must hold the same objects once generated names lose their hash suffix
(--same: only that).
--self-test breaks a rendering in several ways and fails unless each breakage
is caught, so that these checks cannot silently pass everything.
--core prints the documents the Kubernetes schemas know: all but the
Prometheus Operator's (monitoring.coreos.com), which no schema of
kubernetes-validate covers and these checks check instead.
"""
import copy
import json
import re
import sys

import yaml

# What the overlays expect to exist in the namespace and do not create.
EXTERNAL_SECRETS = {"zeroshard-tls", "zeroshard-api-keys"}
EXTERNAL_CLAIMS = {"zeroshard-models"}
HEALTH_PORT = 8081
# preStop pause + the drain (coordinator: default drain time; worker: at most
# 30 s serving ranges to peers).
PRESTOP_S, DRAIN_S = 5, 30

# Per overlay: the device, GPUs per worker, whether the in-cluster etcd is
# part of it, whether workers pull their ranges, and whether it holds the
# Prometheus Operator's monitors (which need its CRDs in the cluster).
EXPECT = {
    "cpu": {"device": "cpu", "gpus": 0, "etcd": True, "pull": False, "monitors": False},
    "gpu": {"device": "cuda", "gpus": 1, "etcd": True, "pull": False, "monitors": False},
    "external-etcd": {"device": "auto", "gpus": 0, "etcd": False, "pull": False, "monitors": False},
    "pull": {"device": "cpu", "gpus": 0, "etcd": True, "pull": True, "monitors": False},
    "prometheus-operator": {"device": "cpu", "gpus": 0, "etcd": True, "pull": False, "monitors": True},
}

# Each role's listeners: the container port's name and the variable of the
# flag that binds it. /metrics is served by the coordinator's HTTP front and
# by a worker's --metrics-listen; the coordinator has no --metrics-listen.
LISTENERS = {
    "coordinator": {"grpc": "ZEROSHARD_LISTEN", "http": "ZEROSHARD_HTTP_LISTEN",
                    "health": "ZEROSHARD_HEALTH_LISTEN"},
    "worker": {"grpc": "ZEROSHARD_WORKER_LISTEN", "metrics": "ZEROSHARD_METRICS_LISTEN",
               "health": "ZEROSHARD_HEALTH_LISTEN"},
}
METRICS_PORT = {"coordinator": "http", "worker": "metrics"}
METRICS_PATH = "/metrics"

# The Prometheus Operator's objects: API group, and the fields (of its v1
# CRDs) that these checks know; any other field is reported, as
# kubernetes-validate --strict reports one of a built-in kind.
MONITORING = "monitoring.coreos.com/"
MONITOR_ENDPOINTS = {"ServiceMonitor": "endpoints", "PodMonitor": "podMetricsEndpoints"}
MONITOR_SPEC_FIELDS = {
    "ServiceMonitor": {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels",
                       "podTargetLabels", "sampleLimit", "targetLimit", "labelLimit", "attachMetadata"},
    "PodMonitor": {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels",
                   "sampleLimit", "targetLimit", "labelLimit", "attachMetadata"},
}
MONITOR_ENDPOINT_FIELDS = {"port", "path", "scheme", "interval", "scrapeTimeout", "honorLabels",
                           "honorTimestamps", "relabelings", "metricRelabelings", "params"}
DURATION = re.compile(r"^([0-9]+)(ms|s|m|h)$")

GENERATED_SUFFIX = re.compile(r"^(.*)-[a-z0-9]{10}$")


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def pod_specs(objs):
    """(workload, pod template) for every Deployment and StatefulSet."""
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet"):
            yield o, o["spec"]["template"]


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def seconds(duration):
    m = DURATION.match(duration)
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def listen_port(address):
    """The port of a listen address (HOST:PORT, [V6]:PORT), as an int or None."""
    port = (address or "").rsplit(":", 1)[-1]
    return int(port) if port.isdigit() else None


def named_ports(template):
    """name -> containerPort over the pod's containers."""
    return {q["name"]: q["containerPort"] for c in template["spec"]["containers"]
            for q in c.get("ports", []) if "name" in q}


def problems(objs, overlay):
    """Every problem found, as lines."""
    out = []
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    configmaps = by_kind.get("ConfigMap", {})
    services = by_kind.get("Service", {})
    templates = list(pod_specs(objs))

    def name(o):
        return f"{o['kind']} {o['metadata']['name']}"

    # Selectors pick the pods they are meant for.
    for w, t in templates:
        sel = w["spec"]["selector"].get("matchLabels", {})
        if not matches(sel, t["metadata"].get("labels", {})):
            out.append(f"{name(w)}: selector {sel} does not match its pod labels")
    for kind in ("Service", "PodDisruptionBudget", "NetworkPolicy"):
        for o in by_kind.get(kind, {}).values():
            spec = o["spec"]
            sel = spec.get("selector") if kind == "Service" else None
            if kind == "PodDisruptionBudget":
                sel = spec["selector"].get("matchLabels")
            if kind == "NetworkPolicy":
                sel = spec["podSelector"].get("matchLabels")
            picked = [t for _, t in templates if matches(sel, t["metadata"].get("labels", {}))]
            if not picked:
                out.append(f"{name(o)}: selector {sel} picks no pod")
            if kind == "Service":
                for p in spec.get("ports", []):
                    tp = p.get("targetPort", p["port"])
                    for t in picked:
                        declared = {
                            (q.get("name"), q["containerPort"])
                            for c in t["spec"]["containers"]
                            for q in c.get("ports", [])
                        }
                        if not any(tp in pair for pair in declared):
                            out.append(f"{name(o)}: port {p['name']} targets {tp}, which its pods do not declare")

    # StatefulSets have their headless Service, which lists pods before they
    # are ready (members dial each other while starting).
    for w, t in templates:
        if w["kind"] != "StatefulSet":
            continue
        svc = services.get(w["spec"].get("serviceName"))
        if svc is None:
            out.append(f"{name(w)}: serviceName {w['spec'].get('serviceName')} is not a rendered Service")
        elif svc["spec"].get("clusterIP") != "None" or not svc["spec"].get("publishNotReadyAddresses"):
            out.append(f"{name(w)}: Service {svc['metadata']['name']} must be headless with publishNotReadyAddresses")

    # Pods: references resolve, $(VAR)s are defined earlier, hardening.
    for w, t in templates:
        spec = t["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            if "secret" in v and v["secret"]["secretName"] not in EXTERNAL_SECRETS:
                out.append(f"{name(w)}: volume {v['name']} names Secret {v['secret']['secretName']}, not a documented one")
            if "persistentVolumeClaim" in v and v["persistentVolumeClaim"]["claimName"] not in EXTERNAL_CLAIMS:
                out.append(f"{name(w)}: volume {v['name']} names an undocumented claim")
        claims = {c["metadata"]["name"] for c in w["spec"].get("volumeClaimTemplates", [])}
        ctx = spec.get("securityContext", {})
        if ctx.get("runAsNonRoot") is not True or not ctx.get("runAsUser"):
            out.append(f"{name(w)}: pod must run as a non-root uid")
        if spec.get("automountServiceAccountToken") is not False:
            out.append(f"{name(w)}: mounts a service account token it does not need")
        for c in spec["containers"]:
            where = f"{name(w)} container {c['name']}"
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes and m["name"] not in claims:
                    out.append(f"{where}: mounts {m['name']}, which is no volume of the pod")
            for ef in c.get("envFrom", []):
                ref = ef.get("configMapRef", {}).get("name")
                if ref and ref not in configmaps:
                    out.append(f"{where}: envFrom names ConfigMap {ref}, which is not rendered")
            defined = set()
            for e in c.get("env", []):
                for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", e.get("value", "") or ""):
                    if var not in defined:
                        out.append(f"{where}: {e['name']} refers to $({var}) before it is defined")
                defined.add(e["name"])
            for arg in c.get("command", []) + c.get("args", []):
                for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
                    if var not in defined:
                        out.append(f"{where}: argument {arg!r} refers to undefined $({var})")
            sc = c.get("securityContext", {})
            if (
                sc.get("allowPrivilegeEscalation") is not False
                or sc.get("readOnlyRootFilesystem") is not True
                or sc.get("capabilities", {}).get("drop") != ["ALL"]
            ):
                out.append(f"{where}: needs allowPrivilegeEscalation false, a read-only root and capabilities dropped")
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in res.get(part, {}):
                        out.append(f"{where}: no {r} in resources.{part}")

    # zeroshard's own pods.
    zs = {t["metadata"]["labels"].get("app.kubernetes.io/component"): (w, t)
          for w, t in templates if t["metadata"]["labels"].get("app.kubernetes.io/name") == "zeroshard"}
    if set(zs) != {"coordinator", "worker"}:
        out.append(f"zeroshard workloads: expected a coordinator and workers, found {sorted(zs)}")
        return out
    config = {}
    for c in configmaps.values():
        if c["metadata"]["name"].startswith("zeroshard-config"):
            config = c.get("data", {})
    for role, (w, t) in zs.items():
        c = t["spec"]["containers"][0]
        where = f"{name(w)} ({role})"
        env = env_of(c)
        health = env.get("ZEROSHARD_HEALTH_LISTEN", "")
        if not health.endswith(f":{HEALTH_PORT}"):
            out.append(f"{where}: ZEROSHARD_HEALTH_LISTEN is {health!r}, not on port {HEALTH_PORT}")
        http = env.get("ZEROSHARD_HTTP_LISTEN", "")
        if http and not http.startswith(("127.", "localhost:", "[::1]:")) and not env.get("ZEROSHARD_API_KEY_FILE"):
            out.append(f"{where}: ZEROSHARD_HTTP_LISTEN={http} is off loopback without ZEROSHARD_API_KEY_FILE "
                       "(the coordinator refuses to start)")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            p = c.get(probe)
            if not p or p.get("grpc", {}).get("port") != HEALTH_PORT:
                out.append(f"{where}: {probe} is not a gRPC probe of port {HEALTH_PORT}: {p}")
        live = c.get("livenessProbe", {})
        if live.get("periodSeconds", 10) * live.get("failureThreshold", 3) < DRAIN_S:
            out.append(f"{where}: liveness gives up before a {DRAIN_S} s drain (NOT_SERVING) ends")
        grace = t["spec"].get("terminationGracePeriodSeconds", 30)
        if grace < PRESTOP_S + DRAIN_S:
            out.append(f"{where}: terminationGracePeriodSeconds {grace} < {PRESTOP_S + DRAIN_S} (preStop + drain)")
        for var in ("ZEROSHARD_TLS_CA", "ZEROSHARD_TLS_CERT", "ZEROSHARD_TLS_KEY"):
            path = env.get(var)
            mounted = False
            for m in c.get("volumeMounts", []):
                v = next((v for v in t["spec"].get("volumes", []) if v["name"] == m["name"]), None)
                if path and v and "secret" in v and path.startswith(m["mountPath"] + "/"):
                    items = [i["path"] for i in v["secret"].get("items", [])]
                    mounted = mounted or not items or path[len(m["mountPath"]) + 1:] in items
            if not mounted:
                out.append(f"{where}: {var}={path} is no file of a mounted Secret")
        if t["spec"].get("enableServiceLinks") is not False:
            out.append(f"{where}: service links would add ZEROSHARD_*_PORT variables")
    coord_w, coord_t = zs["coordinator"]
    work_w, work_t = zs["worker"]
    if coord_w["kind"] != "Deployment" or coord_w["spec"].get("replicas") != 1 \
            or coord_w["spec"].get("strategy", {}).get("type") != "Recreate":
        out.append("coordinator: must be one Deployment replica replaced with Recreate (two would both plan)")
    if not coord_t["spec"]["containers"][0].get("lifecycle", {}).get("preStop"):
        out.append("coordinator: no preStop pause")
    if work_w["kind"] != "StatefulSet" or work_w["spec"].get("podManagementPolicy") != "Parallel":
        out.append("workers: must be a StatefulSet with podManagementPolicy Parallel")
    if str(work_w["spec"].get("replicas")) != config.get("ZEROSHARD_WORKERS"):
        out.append(f"workers: {work_w['spec'].get('replicas')} replicas but ZEROSHARD_WORKERS="
                   f"{config.get('ZEROSHARD_WORKERS')}: the coordinator would plan for another count")
    wenv = env_of(work_t["spec"]["containers"][0])
    adv = wenv.get("ZEROSHARD_WORKER_ADVERTISE", "")
    svc = work_w["spec"].get("serviceName")
    if not adv.startswith(f"$(POD_NAME).{svc}.$(POD_NAMESPACE).svc."):
        out.append(f"workers: ZEROSHARD_WORKER_ADVERTISE {adv!r} is not the pod's DNS name under {svc}")
    port = adv.rsplit(":", 1)[-1]
    if not wenv.get("ZEROSHARD_WORKER_LISTEN", "").endswith(f":{port}"):
        out.append("workers: ZEROSHARD_WORKER_LISTEN and ZEROSHARD_WORKER_ADVERTISE name different ports")
    cadv = env_of(coord_t["spec"]["containers"][0]).get("ZEROSHARD_ADVERTISE", "")
    m = re.match(r"^grpcs://([a-z0-9-]+)(?:\.[a-z0-9.-]+)?:(\d+)$", cadv)
    if not m or m.group(1) not in services or not services[m.group(1)]["spec"].get("publishNotReadyAddresses"):
        out.append(f"coordinator: ZEROSHARD_ADVERTISE {cadv!r} is not a grpcs:// Service listing it before it is ready")
    coord_mounts = {m["mountPath"] for m in coord_t["spec"]["containers"][0].get("volumeMounts", [])}
    work_mounts = {m["mountPath"] for m in work_t["spec"]["containers"][0].get("volumeMounts", [])}
    model = config.get("ZEROSHARD_MODEL", "")
    if not any(model.startswith(p + "/") for p in coord_mounts):
        out.append(f"coordinator: ZEROSHARD_MODEL {model} is on no mounted volume")
    pull = config.get("ZEROSHARD_PULL") == "true"
    on_worker = any(model.startswith(p + "/") for p in work_mounts)
    if not pull and not on_worker:
        out.append(f"workers: ZEROSHARD_MODEL {model} is not mounted on them and ZEROSHARD_PULL is not true")
    if pull and on_worker:
        out.append("workers: ZEROSHARD_PULL=true but they still mount the model")
    device = config.get("ZEROSHARD_DEVICE", "auto")
    gpus = int(work_t["spec"]["containers"][0].get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
    if device.startswith("cuda") and gpus < 1:
        out.append(f"workers: ZEROSHARD_DEVICE={device} but no nvidia.com/gpu limit")
    if device == "cpu" and gpus:
        out.append("workers: ZEROSHARD_DEVICE=cpu but they claim GPUs")

    # etcd: in the overlay, the endpoints are its members and the initial
    # cluster names every ordinal; left out, nothing points at it.
    etcd = next((w for w, t in templates if t["metadata"]["labels"].get("app.kubernetes.io/name") == "etcd"), None)
    endpoints = [e for e in config.get("ZEROSHARD_ETCD", "").split(",") if e]
    if not endpoints:
        out.append("ZEROSHARD_ETCD is empty")
    if etcd is not None:
        n, sname, sts = etcd["spec"]["replicas"], etcd["spec"]["serviceName"], etcd["metadata"]["name"]
        want = [f"http://{sts}-{i}.{sname}:2379" for i in range(n)]
        if endpoints != want:
            out.append(f"ZEROSHARD_ETCD {endpoints} is not the etcd members {want}")
        args = etcd["spec"]["template"]["spec"]["containers"][0].get("args", [])
        ic = next((a.split("=", 1)[1] for a in args if a.startswith("--initial-cluster=")), "")
        want_ic = ",".join(f"{sts}-{i}=http://{sts}-{i}.{sname}:2380" for i in range(n))
        if ic != want_ic:
            out.append(f"etcd: --initial-cluster {ic} is not {want_ic}")
        if f"--initial-advertise-peer-urls=http://$(POD_NAME).{sname}:2380" not in args:
            out.append("etcd: --initial-advertise-peer-urls is not the member's own entry of the initial cluster")
        pdb = [p for p in by_kind.get("PodDisruptionBudget", {}).values()
               if matches(p["spec"]["selector"].get("matchLabels"), etcd["spec"]["template"]["metadata"]["labels"])]
        if not pdb or pdb[0]["spec"].get("minAvailable") != n // 2 + 1:
            out.append(f"etcd: needs a PodDisruptionBudget with minAvailable {n // 2 + 1} (quorum)")
    elif any("zeroshard-etcd" in e for e in endpoints):
        out.append("ZEROSHARD_ETCD names the in-cluster etcd, which this overlay leaves out")
    wpdb = [p for p in by_kind.get("PodDisruptionBudget", {}).values()
            if matches(p["spec"]["selector"].get("matchLabels"), work_t["metadata"]["labels"])]
    if not wpdb or wpdb[0]["spec"].get("maxUnavailable") != 1:
        out.append("workers: need a PodDisruptionBudget with maxUnavailable 1")

    out += metrics_problems(objs, zs, templates, services)

    exp = EXPECT.get(overlay)
    if exp:
        if device != exp["device"]:
            out.append(f"overlay {overlay}: ZEROSHARD_DEVICE={device}, expected {exp['device']}")
        if gpus != exp["gpus"]:
            out.append(f"overlay {overlay}: {gpus} nvidia.com/gpu per worker, expected {exp['gpus']}")
        if (etcd is not None) != exp["etcd"]:
            out.append(f"overlay {overlay}: in-cluster etcd {'present' if etcd else 'absent'}, expected otherwise")
        if pull != exp["pull"]:
            out.append(f"overlay {overlay}: ZEROSHARD_PULL={pull}, expected {exp['pull']}")
        monitors = any(o["apiVersion"].startswith(MONITORING) for o in objs)
        if monitors != exp["monitors"]:
            out.append(f"overlay {overlay}: Prometheus Operator monitors {'present' if monitors else 'absent'}, "
                       "expected otherwise (they need its CRDs in the cluster)")
    return out


def metrics_problems(objs, zs, templates, services):
    """Listeners, scrape annotations and Prometheus Operator monitors, as lines."""
    out = []
    # Each named port of a zeroshard container is what its listener binds,
    # and /metrics is served where the annotations say.
    for role, (w, t) in zs.items():
        c = t["spec"]["containers"][0]
        where = f"{w['kind']} {w['metadata']['name']} ({role})"
        env = env_of(c)
        ports = named_ports(t)
        for port_name, var in LISTENERS[role].items():
            bound = listen_port(env.get(var))
            if port_name in ports and bound != ports[port_name]:
                out.append(f"{where}: port {port_name} is {ports[port_name]} but {var}={env.get(var)!r}")
            if bound is not None and port_name not in ports:
                out.append(f"{where}: {var}={env.get(var)} but no container port named {port_name}")
        if role == "coordinator" and "ZEROSHARD_METRICS_LISTEN" in env:
            out.append(f"{where}: ZEROSHARD_METRICS_LISTEN is a worker's flag; the coordinator's /metrics "
                       "is on its HTTP front")
        metrics = METRICS_PORT[role]
        if metrics not in ports:
            out.append(f"{where}: no container port named {metrics}, where it serves {METRICS_PATH}")
        ann = t["metadata"].get("annotations", {})
        if ann.get("prometheus.io/scrape") != "true":
            out.append(f"{where}: no prometheus.io/scrape: \"true\" annotation on its pods")
    for w, t in templates:
        ann = t["metadata"].get("annotations", {})
        if ann.get("prometheus.io/scrape") != "true":
            continue
        where = f"{w['kind']} {w['metadata']['name']}"
        declared = {q["containerPort"] for c in t["spec"]["containers"] for q in c.get("ports", [])}
        port = ann.get("prometheus.io/port", "")
        if not port.isdigit() or int(port) not in declared:
            out.append(f"{where}: prometheus.io/port {port!r} is not a port its pods declare")
        if ann.get("prometheus.io/path", "/metrics") != METRICS_PATH:
            out.append(f"{where}: prometheus.io/path {ann.get('prometheus.io/path')!r} is not {METRICS_PATH}")
        role = t["metadata"]["labels"].get("app.kubernetes.io/component")
        if role in zs and zs[role][1] is t and port.isdigit() \
                and int(port) != named_ports(t).get(METRICS_PORT[role]):
            out.append(f"{where}: prometheus.io/port {port} is not its {METRICS_PORT[role]} port, "
                       f"where {role}s serve {METRICS_PATH}")

    # The Prometheus Operator's monitors: known fields, selectors that pick
    # zeroshard's pods (ServiceMonitor: Services by their labels, then the
    # Services' pods), ports that are those pods' /metrics, and each pod
    # scraped at most once.
    scraped = {}
    for o in objs:
        if not o["apiVersion"].startswith(MONITORING):
            continue
        kind, where = o["kind"], f"{o['kind']} {o['metadata']['name']}"
        if o["apiVersion"] != MONITORING + "v1" or kind not in MONITOR_ENDPOINTS:
            out.append(f"{where}: {o['apiVersion']} {kind} is not a ServiceMonitor or PodMonitor of "
                       f"{MONITORING}v1")
            continue
        unknown = set(o) - {"apiVersion", "kind", "metadata", "spec"}
        unknown |= set(o["metadata"]) - {"name", "labels", "annotations"}
        spec = o.get("spec", {})
        unknown |= set(spec) - MONITOR_SPEC_FIELDS[kind]
        endpoints = spec.get(MONITOR_ENDPOINTS[kind]) or []
        for e in endpoints:
            unknown |= set(e) - MONITOR_ENDPOINT_FIELDS
        if unknown:
            out.append(f"{where}: unknown fields {sorted(unknown)}")
        if not endpoints:
            out.append(f"{where}: no {MONITOR_ENDPOINTS[kind]}")
        sel = spec.get("selector", {})
        if set(sel) != {"matchLabels"}:
            out.append(f"{where}: selector must be matchLabels alone (these checks match no expressions)")
        sel = sel.get("matchLabels", {})
        if kind == "ServiceMonitor":
            picked_services = [svc for svc in services.values() if matches(sel, svc["metadata"].get("labels", {}))]
            if not picked_services:
                out.append(f"{where}: selector {sel} picks no Service (by the Services' labels)")
        else:
            picked_pods = [(w, t) for w, t in templates if matches(sel, t["metadata"].get("labels", {}))]
            if not picked_pods:
                out.append(f"{where}: selector {sel} picks no pod")
        for e in endpoints:
            port_name = e.get("port")
            if not isinstance(port_name, str) or not port_name:
                out.append(f"{where}: an endpoint without a port name: {e}")
                continue
            if e.get("path", "/metrics") != METRICS_PATH:
                out.append(f"{where}: port {port_name} path {e.get('path')!r} is not {METRICS_PATH}")
            if e.get("scheme", "http") != "http":
                out.append(f"{where}: port {port_name} scheme {e['scheme']!r}: /metrics is plain HTTP")
            for d in ("interval", "scrapeTimeout"):
                if d in e and not DURATION.match(str(e[d])):
                    out.append(f"{where}: {d} {e[d]!r} is not a duration such as 15s")
            if DURATION.match(str(e.get("interval", ""))) and DURATION.match(str(e.get("scrapeTimeout", ""))) \
                    and seconds(e["scrapeTimeout"]) > seconds(e["interval"]):
                out.append(f"{where}: scrapeTimeout {e['scrapeTimeout']} is longer than interval {e['interval']}")
            # (workload, pod template, the container port the scrape reaches)
            targets = []
            if kind == "ServiceMonitor":
                with_port = [svc for svc in picked_services
                             if any(p.get("name") == port_name for p in svc["spec"].get("ports", []))]
                if picked_services and not with_port:
                    out.append(f"{where}: no Service it picks has a port named {port_name}")
                for svc in with_port:
                    p = next(p for p in svc["spec"]["ports"] if p.get("name") == port_name)
                    tp = p.get("targetPort", p["port"])
                    for w, t in templates:
                        if matches(svc["spec"].get("selector"), t["metadata"].get("labels", {})):
                            ports = named_ports(t)
                            targets.append((w, t, ports.get(tp) if isinstance(tp, str) else tp,
                                            f"Service {svc['metadata']['name']} port {port_name}"))
            else:
                for w, t in picked_pods:
                    ports = named_ports(t)
                    if port_name not in ports:
                        out.append(f"{where}: {w['kind']} {w['metadata']['name']} has no container port "
                                   f"named {port_name}")
                    else:
                        targets.append((w, t, ports[port_name], f"port {port_name}"))
            for w, t, port, via in targets:
                role = t["metadata"]["labels"].get("app.kubernetes.io/component")
                wname = f"{w['kind']} {w['metadata']['name']}"
                if role not in zs or zs[role][1] is not t:
                    out.append(f"{where}: scrapes {wname}, which is no zeroshard pod")
                    continue
                if port != named_ports(t).get(METRICS_PORT[role]):
                    out.append(f"{where}: {via} reaches port {port} of {wname}, not its "
                               f"{METRICS_PORT[role]} port where {role}s serve {METRICS_PATH}")
                    continue
                scraped.setdefault(role, []).append(f"{where} ({via})")
    for role, by in scraped.items():
        if len(by) > 1:
            out.append(f"{role}: scraped more than once, by {by} (duplicate series)")
    if any(o["apiVersion"].startswith(MONITORING) for o in objs):
        for role in zs:
            if role not in scraped:
                out.append(f"{role}: no monitor scrapes its {METRICS_PATH}")
    return out


def normalized(objs):
    """The objects as sorted JSON, generated names without their hash suffix."""
    names = {}
    for o in objs:
        if o["kind"] in ("ConfigMap", "Secret"):
            m = GENERATED_SUFFIX.match(o["metadata"]["name"])
            if m:
                names[o["metadata"]["name"]] = m.group(1)
    text = json.dumps(objs, sort_keys=True)
    for full, short in names.items():
        text = text.replace(f'"{full}"', f'"{short}"')
    objs = json.loads(text)
    for o in objs:
        # v2.0.3 leaves `annotations: {}` on a merged generator's output.
        if o["metadata"].get("annotations") == {}:
            del o["metadata"]["annotations"]
        # ... and moves a patched env entry to the end (each rendering's
        # $(VAR) order is checked on its own).
        for _, t in pod_specs([o]):
            for c in t["spec"]["containers"]:
                c.get("env", []).sort(key=lambda e: e["name"])
    return sorted(json.dumps(o, sort_keys=True) for o in objs)


def self_test(objs, overlay):
    """Breaks the rendering of `overlay` in ways the checks must catch."""
    def worker(o):
        return o["kind"] == "StatefulSet" and o["metadata"]["name"] == "zeroshard-worker"

    def container(o):
        return o["spec"]["template"]["spec"]["containers"][0]

    def set_env(c, name, value):
        for e in c["env"]:
            if e["name"] == name:
                e["value"] = value

    def monitor(o, kind):
        return o["kind"] == kind and o["apiVersion"].startswith(MONITORING)

    def endpoint(o):
        return o["spec"][MONITOR_ENDPOINTS[o["kind"]]][0]

    def rename(d, old, new):
        d[new] = d.pop(old)

    breakages = {
        "worker count": lambda o: worker(o) and o["spec"].update(replicas=o["spec"]["replicas"] + 1),
        "liveness probe": lambda o: worker(o) and container(o).pop("livenessProbe"),
        "probe port": lambda o: worker(o) and container(o)["readinessProbe"]["grpc"].update(port=8080),
        "selector": lambda o: o["kind"] == "Service" and o["spec"]["selector"].update(x="y"),
        "GPU limit": lambda o: worker(o) and container(o)["resources"]["limits"].update({"nvidia.com/gpu": 1}),
        "TLS path": lambda o: worker(o) and set_env(container(o), "ZEROSHARD_TLS_KEY", "/etc/other/worker.key"),
        "advertised address": lambda o: worker(o) and set_env(container(o), "ZEROSHARD_WORKER_ADVERTISE", "0.0.0.0:50061"),
        "metrics listener": lambda o: worker(o) and set_env(container(o), "ZEROSHARD_METRICS_LISTEN", "0.0.0.0:9091"),
        "scrape annotation": lambda o: worker(o) and o["spec"]["template"]["metadata"]["annotations"].update(
            {"prometheus.io/port": "8081"}),
    }
    if any(o["apiVersion"].startswith(MONITORING) for o in objs):
        breakages.update({
            "ServiceMonitor port": lambda o: monitor(o, "ServiceMonitor") and endpoint(o).update(port="grpc"),
            "PodMonitor selector": lambda o: monitor(o, "PodMonitor") and o["spec"]["selector"]["matchLabels"].update(
                {"app.kubernetes.io/component": "workers"}),
            "monitor path": lambda o: monitor(o, "PodMonitor") and endpoint(o).update(path="/metric"),
            "monitor field": lambda o: monitor(o, "PodMonitor") and rename(
                o["spec"], "podMetricsEndpoints", "podMetricEndpoints"),
            "second scrape": lambda o: o["kind"] == "Service" and o["metadata"]["name"] == "zeroshard-coordinator-peer"
            and o["spec"]["ports"].append({"name": "http", "port": 8000, "targetPort": "http"}),
        })
    base = problems(objs, overlay)
    if base:
        return [f"self-test: the unbroken rendering already fails: {base[0]}"]
    failed = []
    for what, breakage in breakages.items():
        broken = copy.deepcopy(objs)
        for o in broken:
            breakage(o)
        if not problems(broken, overlay):
            failed.append(f"self-test: breaking the {what} went unnoticed")
    return failed


def differences(a_objs, b_objs):
    """Where two renderings differ, as lines (none when they hold the same objects)."""
    a, b = normalized(a_objs), normalized(b_objs)
    if a == b:
        return []
    only_a = sorted(f"{o['kind']} {o['metadata']['name']}" for o in map(json.loads, set(a) - set(b)))
    only_b = sorted(f"{o['kind']} {o['metadata']['name']}" for o in map(json.loads, set(b) - set(a)))
    return [f"the two renderings differ: {only_a} in the first, {only_b} in the second"]


def main(argv):
    if len(argv) == 3 and argv[1] == "--core":
        with open(argv[2]) as f:
            docs = re.split(r"(?m)^---\n", f.read())
        kept = [d for d in docs if not (yaml.safe_load(d) or {}).get("apiVersion", "").startswith(MONITORING)]
        sys.stdout.write("---\n".join(kept))
        return 0
    if len(argv) == 4 and argv[1] == "--self-test":
        errs = self_test(load(argv[3]), argv[2])
    elif len(argv) == 4 and argv[1] == "--same":
        errs = differences(load(argv[2]), load(argv[3]))
    elif len(argv) in (3, 4):
        overlay, renderings = argv[1], [load(f) for f in argv[2:]]
        errs = []
        for path, objs in zip(argv[2:], renderings):
            if not objs:
                errs.append(f"{path}: no objects")
            errs += problems(objs, overlay) if objs else []
        if len(renderings) == 2:
            errs += differences(*renderings)
        # Both renderings give the same problems; say each once.
        errs = list(dict.fromkeys(errs))
        if not errs:
            print(len(renderings[0]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for e in errs:
        print(e, file=sys.stderr)
    return 1 if errs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
