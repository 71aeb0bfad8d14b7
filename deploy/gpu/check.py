#!/usr/bin/env python3
"""The zeroshard half of the GPU check, and the one table (see ../gpu-check.sh).

    python3 check.py --bundle gpu-bundle --logs LOGDIR [--torch torch.json]

1. Parity: every case of refs/stories260K_greedy_sample.json (stories260K and
   stories260K-f16) and refs/arch/*.json through `generate --device cuda`:
   greedy tokens equal to transformers', last-prompt-position logits within 1%
   of the reference's largest magnitude; and CUDA vs CPU logits per fixture.
   Then a cluster of CUDA workers (`up --workers 2 --device cuda`, every layer
   streamed, then every layer resident) and `query` over the stories260K cases.
2. Speed: `bench --device cuda --synthetic <TinyLlama-1.1B shape>` fully
   resident (batch 1 and 32, ratio to the device-copy bound) and with
   `--max-live-bytes 0` (step time over the pinned host->device bound).
3. The PyTorch figures from torch_bench.py, as ratios.

Every command's output goes to LOGDIR; the table is printed and written to
LOGDIR/table.txt. Exit status 0 when every row passes.
"""
import argparse
import json
import os
import select
import signal
import subprocess
import sys
import time

TINYLLAMA = "llama:hidden=2048,layers=22,heads=32,kv_heads=4,ffn=5632,vocab=32000,max_pos=2048"


class Runner:
    def __init__(self, bundle, logs):
        self.bin = os.path.join(bundle, "zeroshard")
        self.logs = logs
        self.n = 0

    def run(self, name, args, timeout=300):
        """Runs the binary; returns (rc, stdout). Logs command, stdout, stderr."""
        self.n += 1
        log = os.path.join(self.logs, f"{self.n:03d}-{name}.log")
        t = time.time()
        try:
            p = subprocess.run([self.bin, *args], capture_output=True, text=True, timeout=timeout)
            rc, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            rc, out, err = 124, e.stdout or "", (e.stderr or "") + f"\ntimed out after {timeout}s"
            out = out if isinstance(out, str) else out.decode(errors="replace")
            err = err if isinstance(err, str) else err.decode(errors="replace")
        with open(log, "w") as f:
            f.write(f"$ zeroshard {' '.join(args)}\n# rc {rc}, {time.time() - t:.1f}s\n--- stdout\n{out}\n--- stderr\n{err}")
        return rc, out, err


def rel_err(got, want):
    scale = max(abs(x) for x in want)
    return max(abs(a - b) for a, b in zip(got, want)) / scale


def generate(r, name, model, device, prompts, new_tokens, extra=()):
    """Greedy generation of every prompt (ids) in one batch; returns (tokens per prompt, logits per prompt) or an error."""
    logits_path = os.path.join(r.logs, f"{name}-{device}-logits.json")
    args = ["generate", "--model", model, "--device", device, "--temperature", "0", "--ignore-eos",
            "--max-new-tokens", str(new_tokens), "--json", "--logits-out", logits_path, *extra]
    for p in prompts:
        args += ["--prompt-ids", ",".join(map(str, p))]
    rc, out, err = r.run(f"{name}-{device}", args)
    if rc != 0:
        return None, None, (err.strip().splitlines() or [f"exit {rc}"])[-1]
    tokens = [json.loads(line)["token_ids"] for line in out.splitlines() if line.strip()]
    logits = json.load(open(logits_path))
    if len(prompts) == 1:
        logits = [logits]
    return tokens, logits, None


def parity(r, bundle, device):
    rows = []
    refs = os.path.join(bundle, "refs")
    # stories260K: text prompts, 48 greedy tokens.
    cases = json.load(open(os.path.join(refs, "stories260K_greedy_sample.json")))["cases"]
    for model in ["stories260K", "stories260K-f16"]:
        path = os.path.join(bundle, "models", model)
        prompts = [c["input_ids"] for c in cases]
        want = [c["new_token_ids"] for c in cases]
        n = max(len(w) for w in want)
        got, glog, err = generate(r, model, path, device, prompts, n)
        cpu, clog, cerr = generate(r, model, path, "cpu", prompts, n)
        if err or cerr:
            rows.append((f"{model} ({len(cases)} refs)", "FAIL", err or cerr))
            continue
        exact = sum(g[: len(w)] == w for g, w in zip(got, want))
        vs_cpu = max(rel_err(g, c) for g, c in zip(glog, clog))
        ok = exact == len(cases) and vs_cpu <= 0.01
        rows.append((f"{model} ({len(cases)} refs)", "pass" if ok else "FAIL",
                     f"greedy tokens exact {exact}/{len(cases)}; CUDA vs CPU logits err/scale {vs_cpu:.4f}"))
    # Architecture fixtures: id prompts, reference last-position logits.
    for fname in sorted(os.listdir(os.path.join(refs, "arch"))):
        name = fname[:-5]
        ref = json.load(open(os.path.join(refs, "arch", fname)))
        path = os.path.join(bundle, "models", "fixtures", name)
        prompts = [p["input_ids"] for p in ref["prompts"]]
        want = [p["new_token_ids"] for p in ref["prompts"]]
        n = max(len(w) for w in want)
        got, glog, err = generate(r, name, path, device, prompts, n)
        cpu, clog, cerr = generate(r, name, path, "cpu", prompts, n)
        if err or cerr:
            rows.append((f"{name} ({len(prompts)} refs)", "FAIL", err or cerr))
            continue
        exact = sum(g[: len(w)] == w for g, w in zip(got, want))
        vs_ref = max(rel_err(g, p["last_logits"]) for g, p in zip(glog, ref["prompts"]))
        vs_cpu = max(rel_err(g, c) for g, c in zip(glog, clog))
        ok = exact == len(prompts) and vs_ref <= 0.01
        rows.append((f"{name} ({len(prompts)} refs)", "pass" if ok else "FAIL",
                     f"greedy tokens exact {exact}/{len(prompts)}; logits err/scale vs transformers {vs_ref:.4f}, "
                     f"vs CPU {vs_cpu:.4f}"))
    return rows


def cluster_parity(r, bundle, device):
    """`up --workers 2 --device DEVICE` over stories260K, `query` of every case: greedy tokens equal to the refs."""
    rows = []
    cases = json.load(open(os.path.join(bundle, "refs", "stories260K_greedy_sample.json")))["cases"]
    model = os.path.join(bundle, "models", "stories260K")
    for live in ["0", "1000000000"]:
        label = f"cluster, 2 workers, max-live {'0 (streamed)' if live == '0' else 'all (resident)'}"
        r.n += 1
        log = open(os.path.join(r.logs, f"{r.n:03d}-cluster-up-{live}.log"), "w")
        up = subprocess.Popen([r.bin, "up", "--model", model, "--workers", "2", "--device", device,
                               "--max-live-bytes", live, "--listen", "127.0.0.1:0"],
                              stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
        endpoint, deadline = None, time.time() + 90
        while endpoint is None and time.time() < deadline and up.poll() is None:
            if select.select([up.stdout], [], [], 1.0)[0]:
                line = up.stdout.readline()
                if line.startswith("ready "):
                    endpoint = line.split()[1]
        try:
            if endpoint is None:
                rows.append((label, "FAIL", f"up not ready (exit {up.poll()}; see {log.name})"))
                continue
            exact, errors = 0, []
            for c in cases:
                rc, out, err = r.run("cluster-query", ["query", "--endpoint", endpoint, "--json", "--prompt-ids",
                                                       ",".join(map(str, c["input_ids"])), "--temperature", "0",
                                                       "--ignore-eos", "--max-new-tokens",
                                                       str(len(c["new_token_ids"]))], timeout=60)
                if rc != 0:
                    errors.append((err.strip().splitlines() or [f"exit {rc}"])[-1])
                    continue
                exact += json.loads(out.splitlines()[0])["token_ids"] == c["new_token_ids"]
            ok = exact == len(cases) and not errors
            rows.append((label, "pass" if ok else "FAIL",
                         f"greedy tokens exact {exact}/{len(cases)} through query" + (f"; {errors[0]}" if errors else "")))
        finally:
            if up.poll() is None:
                os.killpg(up.pid, signal.SIGTERM)
                try:
                    up.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(up.pid, signal.SIGKILL)
            log.close()
    return rows


def bench(r, a, name, extra, new_tokens, timeout=150):
    args = ["bench", "--device", a.device, "--synthetic", a.synthetic, "--batch", "1,32", "--prompt-len", "32",
            "--new-tokens", str(new_tokens), "--json", *extra]
    rc, out, err = r.run(name, args, timeout=timeout)
    if rc != 0:
        return None, (err.strip().splitlines() or [f"exit {rc}"])[-1]
    return json.loads(out.strip().splitlines()[-1]), None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", required=True)
    p.add_argument("--logs", required=True)
    p.add_argument("--torch", default=None)
    p.add_argument("--skip-parity", action="store_true")
    # Dry runs of this script without a GPU: --device cpu --synthetic <small shape>.
    p.add_argument("--device", default="cuda")
    p.add_argument("--synthetic", default=TINYLLAMA)
    a = p.parse_args()
    os.makedirs(a.logs, exist_ok=True)
    r = Runner(a.bundle, a.logs)
    rows = [] if a.skip_parity else parity(r, a.bundle, a.device) + cluster_parity(r, a.bundle, a.device)

    resident, err = bench(r, a, "bench-resident", [], 64)
    zs = {}
    if err:
        rows.append(("speed, resident", "FAIL", err))
    else:
        for row in resident["rows"]:
            b = row["batch"]
            zs[b] = row["decode_tokens_per_s"]
            ok = b != 1 or row["bound_ratio"] >= 0.5
            rows.append((f"speed, resident, batch {b}", "pass" if ok or b != 1 else "FAIL",
                         f"decode {row['decode_tokens_per_s']:.1f} tok/s, step {row['decode_step_ms']:.3f} ms, "
                         f"{row['bound_ratio']:.2f} of the bound ({row['bytes_per_step'] / 1e9:.2f} GB/step at "
                         f"{resident['bound_gbs']:.0f} GB/s device copy)"))
    offloaded, err = bench(r, a, "bench-offloaded", ["--max-live-bytes", "0", "--prefetch-layers", "2"], 8)
    zo = {}
    if err:
        rows.append(("speed, offloaded", "FAIL", err))
    else:
        for row in offloaded["rows"]:
            b = row["batch"]
            zo[b] = row["decode_tokens_per_s"]
            bound = row["streamed_bound_ms"]
            over = row["decode_step_ms"] / bound if bound else float("inf")
            rows.append((f"speed, offloaded, batch {b}", "pass" if over <= 1.2 else "FAIL",
                         f"step {row['decode_step_ms']:.1f} ms = {over:.2f} x the pinned-copy bound {bound:.1f} ms "
                         f"({row['streamed_bytes_per_step'] / 1e9:.2f} GB at {offloaded['pinned_h2d_gbs']:.1f} GB/s); "
                         f"decode {row['decode_tokens_per_s']:.2f} tok/s"))

    tb = json.load(open(a.torch)) if a.torch and os.path.exists(a.torch) else None
    if tb is None:
        rows.append(("PyTorch baselines", "FAIL", "no torch_bench.py result (see its log)"))
    else:
        for kind, ours, need, label in [("gpu", zs, 2.0, "transformers fp16 on GPU"),
                                        ("offload", zo, 3.0, "Accelerate CPU offload")]:
            theirs = tb.get(kind, {})
            if "error" in theirs:
                rows.append((f"vs {label}", "FAIL", theirs["error"]))
                continue
            for b, t in sorted(ours.items()):
                ref = theirs.get(str(b))
                if not ref:
                    rows.append((f"vs {label}, batch {b}", "FAIL", "no figure"))
                    continue
                ratio = t / ref
                rows.append((f"vs {label}, batch {b}", "pass" if ratio >= need else "FAIL",
                             f"zeroshard {t:.1f} / {ref:.1f} tok/s = {ratio:.2f}x (target >= {need:.0f}x)"))

    width = max(len(n) for n, _, _ in rows)
    lines = [f"{'check':<{width}}  result  figures", "-" * (width + 60)]
    lines += [f"{n:<{width}}  {s:<6}  {d}" for n, s, d in rows]
    head = [f"device: {resident['backend'] if resident else '?'}"]
    if resident and resident.get("placement"):
        head.append(f"resident placement: {resident['placement']}")
    if offloaded and offloaded.get("placement"):
        head.append(f"offloaded placement: {offloaded['placement']}")
    if tb:
        head.append(f"torch {tb['versions']['torch']}, transformers {tb['versions']['transformers']}, {tb['device']}")
    table = "\n".join(head + [""] + lines)
    print(table)
    with open(os.path.join(a.logs, "table.txt"), "w") as f:
        f.write(table + "\n")
    return 0 if all(s == "pass" for _, s, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
