#!/usr/bin/env python3
"""Checks what a schema cannot: that the objects of one rendered overlay fit
together and fit zeroshard. Run by scripts/check-k8s.sh, with the venv's
Python (PyYAML).

    check-rendered.py OVERLAY RENDERED.yaml [OTHER_RENDERING.yaml]
    check-rendered.py --same RENDERED.yaml OTHER_RENDERING.yaml
    check-rendered.py --self-test RENDERED.yaml

Prints the number of objects on stdout; exits 1 with one line per problem on
stderr. With a second rendering (the same overlay by another Kustomize), the
two must hold the same objects once generated names lose their hash suffix
(--same: only that).
--self-test breaks a rendering in several ways and fails unless each breakage
is caught, so that these checks cannot silently pass everything.
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
# part of it, and whether workers pull their ranges.
EXPECT = {
    "cpu": {"device": "cpu", "gpus": 0, "etcd": True, "pull": False},
    "gpu": {"device": "cuda", "gpus": 1, "etcd": True, "pull": False},
    "external-etcd": {"device": "auto", "gpus": 0, "etcd": False, "pull": False},
    "pull": {"device": "cpu", "gpus": 0, "etcd": True, "pull": True},
}

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


def self_test(objs):
    """Breaks the rendering in ways the checks must catch."""
    def worker(o):
        return o["kind"] == "StatefulSet" and o["metadata"]["name"] == "zeroshard-worker"

    def container(o):
        return o["spec"]["template"]["spec"]["containers"][0]

    def set_env(c, name, value):
        for e in c["env"]:
            if e["name"] == name:
                e["value"] = value

    breakages = {
        "worker count": lambda o: worker(o) and o["spec"].update(replicas=o["spec"]["replicas"] + 1),
        "liveness probe": lambda o: worker(o) and container(o).pop("livenessProbe"),
        "probe port": lambda o: worker(o) and container(o)["readinessProbe"]["grpc"].update(port=8080),
        "selector": lambda o: o["kind"] == "Service" and o["spec"]["selector"].update(x="y"),
        "GPU limit": lambda o: worker(o) and container(o)["resources"]["limits"].update({"nvidia.com/gpu": 1}),
        "TLS path": lambda o: worker(o) and set_env(container(o), "ZEROSHARD_TLS_KEY", "/etc/other/worker.key"),
        "advertised address": lambda o: worker(o) and set_env(container(o), "ZEROSHARD_WORKER_ADVERTISE", "0.0.0.0:50061"),
    }
    base = problems(objs, "cpu")
    if base:
        return [f"self-test: the unbroken rendering already fails: {base[0]}"]
    failed = []
    for what, breakage in breakages.items():
        broken = copy.deepcopy(objs)
        for o in broken:
            breakage(o)
        if not problems(broken, "cpu"):
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
    if len(argv) == 3 and argv[1] == "--self-test":
        errs = self_test(load(argv[2]))
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
