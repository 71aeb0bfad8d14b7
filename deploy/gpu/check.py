#!/usr/bin/env python3
"""The rows of the GPU check (see ../gpu-check.sh, which sets the library path
and calls this), most important first, each under its own time limit and
printed, one table line, the moment it is known:

  versions         nvidia-smi's devices, driver and memory; `zeroshard cuda info`
                   (the CUDA driver, cuBLAS and NVRTC it sees); the library folders
  ops              the worker crate's unit tests `engine-tests cuda::`: every CUDA
                   op and small whole models against the CPU backend
  model:NAME       one per fixture: refs/stories260K_greedy_sample.json (stories260K,
                   stories260K-f16) and refs/arch/*.json through `generate --device
                   DEVICE`: greedy tokens equal to the refs, last-prompt-position
                   logits within 1% of the ref's largest magnitude; DEVICE vs CPU logits
  cluster:streamed `up --workers 2 --device DEVICE --max-live-bytes 0` and `query` of
  cluster:resident the stories260K refs; then with every layer resident
  speed:resident   `bench --synthetic <TinyLlama-1.1B shape>`, batch 1 and 32, against
                   the device-copy bound
  speed:offloaded  the same with `--max-live-bytes 0`, against the pinned-copy bound
  torch            torch_bench.py (transformers fp16 on the GPU, Accelerate CPU
                   offload) on the same shape, as ratios to the speed rows

    python3 check.py --bundle gpu-bundle --logs LOGDIR [--device cpu] [--budget 460]

A row is pass, FAIL, skipped or timeout ("timeout after Ns"; the check goes on
with the next row). Rows go to stdout and are appended to LOGDIR/table.txt as
they come, so a run cut short keeps what it reached. The last two lines are

  rows: versions,ops,model:...,cluster:streamed,cluster:resident,speed:resident,speed:offloaded,torch
  result: pass|FAIL (N rows: P pass, F FAIL, S skipped, T timeout) in Ss

(the row ids in printed order, then the tally). Exit status 0 when no row
failed or timed out. Every command's output goes to RAWDIR (default
LOGDIR/raw); when RAWDIR is elsewhere it is packed into LOGDIR/logs.tar.gz
after every row.

With --device cpu every row runs on the CPU instead (a dry run of the harness:
a small synthetic shape for the speed rows, whose figures are then not judged;
the ops row is "skipped" when the CUDA tests skipped; torch is skipped without
a CUDA PyTorch).
"""
import argparse
import importlib.util
import json
import os
import re
import select
import signal
import subprocess
import sys
import tarfile
import time
import traceback

TINYLLAMA = "llama:hidden=2048,layers=22,heads=32,kv_heads=4,ffn=5632,vocab=32000,max_pos=2048"
SMALL = "llama:hidden=256,layers=4,heads=8,kv_heads=2,ffn=512,vocab=1000"

# Seconds per row (see the budget in ../gpu-check.sh); the check's whole
# budget (--budget) caps them further, so the last rows are the ones cut.
LIMITS = {
    "versions": 20,
    "ops": 60,
    "model-first": 40,  # compiles the kernels if the ops row left none in the cache
    "model": 14,
    "cluster:streamed": 30,
    "cluster:resident": 25,
    "speed:resident": 45,
    "speed:offloaded": 40,
    "torch": 75,
}

# The order rows must come in: a row's rank is that of the first prefix it starts with.
ORDER = ["versions", "ops", "model:", "cluster:", "speed:resident", "speed:offloaded", "torch"]

STATUSES = ("pass", "FAIL", "skipped", "timeout")


class RowTimeout(Exception):
    """The row's time ran out; the message says where."""


def exit_text(rc):
    if rc is not None and rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            pass
    return f"exit {rc}"


def last_line(text, rc):
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else exit_text(rc)


class Check:
    def __init__(self, a):
        self.a = a
        self.start = time.time()
        self.deadline = self.start + a.budget
        self.row_deadline = self.deadline
        self.bin = os.path.join(a.bundle, "zeroshard")
        self.logs = a.logs
        self.raw = a.raw or os.path.join(a.logs, "raw")
        os.makedirs(self.raw, exist_ok=True)
        self.table = os.path.join(a.logs, "table.txt")
        open(self.table, "w").close()
        self.n = 0
        self.rows = []  # (id, status)
        # Process groups of the commands running (each its own group, in this
        # session: whatever ends the check's session ends them too), to end on SIGTERM.
        self.live = set()
        self.figures = {}  # speed row -> {batch: decode tok/s}
        self.current = None  # (row id, start) of the row running

    # --- output

    def emit(self, line):
        print(line, flush=True)
        with open(self.table, "a") as f:
            f.write(line + "\n")

    def pack_logs(self):
        """RAWDIR into LOGDIR/logs.tar.gz (only when RAWDIR lies elsewhere)."""
        if os.path.abspath(self.raw).startswith(os.path.abspath(self.logs) + os.sep):
            return
        tmp = os.path.join(self.logs, "logs.tar.gz.tmp")
        try:
            with tarfile.open(tmp, "w:gz") as t:
                t.add(self.raw, arcname="gpu-check-logs")
            os.replace(tmp, os.path.join(self.logs, "logs.tar.gz"))
        except OSError as e:
            print(f"  (logs not packed: {e})", file=sys.stderr)

    # --- rows

    def row(self, rid, limit, fn, *args):
        """Runs fn(*args) as row `rid` under `limit` seconds (and the check's budget);
        fn returns (status, detail) or (status, detail, [continuation lines])."""
        t = time.time()
        left = self.deadline - t
        extra = []
        if left < 2:
            status = "timeout"
            detail = f"timeout after 0s: not started, the check's {self.a.budget:.0f}s budget is spent"
        else:
            lim = min(limit, left)
            self.row_deadline = t + lim
            self.current = (rid, t)
            cut = " (cut to the check's remaining budget)" if lim < limit else ""
            try:
                out = fn(*args)
                status, detail = out[0], out[1]
                extra = out[2] if len(out) > 2 else []
            except RowTimeout as e:
                status, detail = "timeout", f"timeout after {lim:.0f}s{cut}" + (f": {e}" if str(e) else "")
            except Exception as e:  # noqa: BLE001 - a harness error is this row's failure, not the check's end
                status, detail = "FAIL", f"harness error: {type(e).__name__}: {e}"
                with open(os.path.join(self.raw, f"harness-{rid.replace(':', '-')}.txt"), "w") as f:
                    traceback.print_exc(file=f)
            self.row_deadline = self.deadline
            self.current = None
        assert status in STATUSES, status
        self.put(rid, status, t, detail)
        for line in extra:
            self.emit(f"{'':<24}   {line}")
        self.pack_logs()

    def put(self, rid, status, t, detail):
        """One row's table line: id, status, its seconds (since t), seconds since the check began, detail."""
        self.rows.append((rid, status))
        now = time.time()
        self.emit(f"{rid:<24} {status:<7} {now - t:6.1f}s {now - self.start + self.a.setup_s:5.0f}s  {detail}")

    def left(self, cap=None):
        """Seconds left to the running row (at most `cap`); RowTimeout when none."""
        left = self.row_deadline - time.time()
        if left <= 0.2:
            raise RowTimeout("")
        return left if cap is None else min(cap, left)

    def run(self, name, argv, cap=None, merge=False):
        """Runs argv (the bundle's zeroshard when argv[0] is None) under the row's
        time; returns (rc, stdout, stderr) and logs all three in RAWDIR. Raises
        RowTimeout when the row's time ends first; returns rc 124 when only `cap` did.
        With `merge`, stderr goes into stdout (interleaved as written)."""
        argv = [self.bin if argv[0] is None else argv[0], *argv[1:]]
        self.n += 1
        log = os.path.join(self.raw, f"{self.n:03d}-{name}.log")
        row_left = self.left()
        limit = row_left if cap is None else min(cap, row_left)
        t = time.time()
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge else subprocess.PIPE,
                             text=True, errors="replace", preexec_fn=os.setpgrp)
        self.live.add(p.pid)
        timed_out = False
        try:
            out, err = p.communicate(timeout=limit)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            timed_out = True
            self.kill(p.pid)
            try:
                out, err = p.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # a descendant in another group holds the pipes
                out, err = "", "(its output pipes stayed open after the kill)"
                p.kill()
            rc = 124
            err = (err or "") + f"\n(killed after {limit:.0f}s)"
        finally:
            self.live.discard(p.pid)
        with open(log, "w") as f:
            f.write(f"$ {' '.join(argv)}\n# rc {rc}, {time.time() - t:.1f}s\n--- stdout\n{out}\n--- stderr\n{err}")
        if timed_out and limit >= row_left - 0.01:
            raise RowTimeout(f"{name} still running (log {os.path.basename(log)})")
        return rc, out or "", err or ""

    def kill(self, pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def end(self, signum, _frame):
        """SIGTERM/SIGINT: end the commands, report the row cut short, the tally, and exit."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for pgid in list(self.live):
            self.kill(pgid)
        if self.current:
            rid, t = self.current
            self.put(rid, "timeout", t,
                     f"timeout after {time.time() - t:.0f}s: the check was stopped ({signal.Signals(signum).name})")
        self.finish()
        os._exit(128 + signum)

    def finish(self):
        """The `rows:` and `result:` lines; True when no row failed or timed out and the order holds."""
        ids = [r for r, _ in self.rows]
        ranks = [next((i for i, pre in enumerate(ORDER) if r.startswith(pre)), len(ORDER)) for r in ids]
        in_order = ranks == sorted(ranks)
        counts = {s: sum(st == s for _, st in self.rows) for s in STATUSES}
        passed = counts["FAIL"] == 0 and counts["timeout"] == 0 and in_order
        self.emit("rows: " + ",".join(ids) + ("" if in_order else " (OUT OF ORDER)"))
        self.emit(f"result: {'pass' if passed else 'FAIL'} ({len(ids)} rows: {counts['pass']} pass, "
                  f"{counts['FAIL']} FAIL, {counts['skipped']} skipped, {counts['timeout']} timeout) in "
                  f"{time.time() - self.start + self.a.setup_s:.0f}s")
        self.pack_logs()
        return passed


# --- versions


def versions_row(c, libdirs):
    a = c.a
    parts, ok = [], True
    rc, out, err = (1, "", "")
    try:
        rc, out, err = c.run("nvidia-smi", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                            "--format=csv,noheader"], cap=10)
    except FileNotFoundError:
        err = "not found"
    if rc == 0 and out.strip():
        parts.append("nvidia-smi: " + "; ".join(line.strip() for line in out.strip().splitlines()))
        try:
            full = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=c.left(10))
            with open(os.path.join(c.raw, "nvidia-smi.txt"), "w") as f:
                f.write(full.stdout + full.stderr)
        except (OSError, subprocess.TimeoutExpired):
            pass
    else:
        parts.append(f"nvidia-smi: {last_line(err, rc)}")
        ok = False

    rc, out, err = c.run("cuda-info", [None, "cuda", "info"], cap=15)
    info = None
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            try:
                info = json.loads(line)
            except json.JSONDecodeError:
                pass
            break
    if info is None:
        if "unrecognized subcommand" in err or "unexpected argument" in err:
            parts.append("zeroshard cuda info: not available in this binary")
        else:
            parts.append(f"zeroshard cuda info: no JSON (exit {rc}: {last_line(err, rc)})")
    else:
        v = lambda k: info.get(k) or "none"  # noqa: E731
        devs = info.get("devices") or []
        d = ", ".join(f"{x.get('name')} (cc {x.get('capability')}, {(x.get('memory_bytes') or 0) / 2**30:.0f} GiB)"
                      for x in devs)
        s = f"zeroshard sees driver {v('driver')}, cuBLAS {v('cublas')}, NVRTC {v('nvrtc')}; "
        s += f"{len(devs)} device{'s' if len(devs) != 1 else ''}" + (f": {d}" if d else "")
        archs = info.get("nvrtc_archs")
        for x in devs:
            cc = str(x.get("capability", "")).replace(".", "")
            if archs and cc.isdigit() and int(cc) not in archs:
                s += f"; NVRTC cannot compile for sm_{cc} (it targets sm_{min(archs)}..sm_{max(archs)})"
                ok = False
        if info.get("usable"):
            s += "; usable"
        else:
            s += f"; NOT usable: {info.get('problem') or 'no reason given'}"
            ok = False
        parts.append(s)

    extra = []
    dirs = [d for d in libdirs.split(":") if d]
    for d in dirs[:20]:
        try:
            names = sorted(n for n in os.listdir(d) if re.match(r"lib(cublas|cublasLt|nvrtc|cudart)\.so", n))
        except OSError:
            names = []
        extra.append(f"lib: {d}" + (f" ({', '.join(names)})" if names else ""))
    if len(dirs) > 20:
        extra.append(f"lib: ... {len(dirs) - 20} more (raw/ld_library_path.txt)")
    if not dirs:
        extra.append("lib: no library folders found (no PyTorch nvidia-* wheels on this Python)")
    status = "pass" if ok or a.device == "cpu" else "FAIL"
    return status, "; ".join(parts), extra


# --- ops


def ops_row(c):
    tests = os.path.join(c.a.bundle, "engine-tests")
    if not os.path.exists(tests):
        why = "no engine-tests in the bundle (scripts/gpu-bundle.sh builds it)"
        return ("skipped" if c.a.device == "cpu" else "FAIL"), why
    rc, out, err = c.run("engine-tests", [tests, "cuda::", "--test-threads", "1", "--nocapture"], merge=True)
    text = out
    summary = re.findall(r"test result: (\w+)\. (\d+) passed; (\d+) failed", text)
    failed_names, skipped, why, current = [], set(), None, None
    for line in out.splitlines():
        m = re.match(r"test (\S+) \.\.\. ", line)
        if m:
            current = m.group(1)
        if line.rstrip().endswith("FAILED") and current and current not in failed_names:
            failed_names.append(current)
        m = re.search(r"no CUDA device: (.*); skipping", line)
        if m:
            skipped.add(current)
            why = why or m.group(1)
    if not summary:
        return "FAIL", f"no test summary ({exit_text(rc)}, in {current or 'no test yet'}: {last_line(out + err, rc)})"
    _, passed, failed = summary[-1]
    detail = f"{passed} passed, {failed} failed (engine-tests cuda::)"
    if int(failed) or rc != 0:
        names = ", ".join(failed_names[:3]) + (" ..." if len(failed_names) > 3 else "")
        return "FAIL", detail + (f": {names}" if names else f"; {exit_text(rc)}")
    if int(passed) == 0:
        return "FAIL", detail + ": no test matched"
    if skipped:
        detail += f"; skipped: no CUDA device: {why} ({len(skipped)} tests)"
        return ("skipped" if c.a.device == "cpu" else "FAIL"), detail
    return "pass", detail


# --- model parity


def rel_err(got, want):
    scale = max(abs(x) for x in want)
    return max(abs(a - b) for a, b in zip(got, want)) / scale


def generate(c, name, model, device, prompts, new_tokens):
    """Greedy generation of every prompt (ids) in one batch: (tokens per prompt, logits per prompt, error)."""
    logits_path = os.path.join(c.raw, f"{name}-{device}-logits.json")
    args = [None, "generate", "--model", model, "--device", device, "--temperature", "0", "--ignore-eos",
            "--max-new-tokens", str(new_tokens), "--json", "--logits-out", logits_path]
    for p in prompts:
        args += ["--prompt-ids", ",".join(map(str, p))]
    rc, out, err = c.run(f"{name}-{device}", args)
    if rc != 0:
        return None, None, f"{device}: {last_line(err, rc)}"
    tokens = [json.loads(line)["token_ids"] for line in out.splitlines() if line.strip()]
    logits = json.load(open(logits_path))
    if len(prompts) == 1:
        logits = [logits]
    return tokens, logits, None


def model_cases(bundle):
    """(name, model folder, prompts, wanted tokens, reference last logits or None), in row order."""
    refs = os.path.join(bundle, "refs")
    out = []
    cases = json.load(open(os.path.join(refs, "stories260K_greedy_sample.json")))["cases"]
    for model in ["stories260K", "stories260K-f16"]:
        out.append((model, os.path.join(bundle, "models", model), [x["input_ids"] for x in cases],
                    [x["new_token_ids"] for x in cases], None))
    for fname in sorted(os.listdir(os.path.join(refs, "arch"))):
        if not fname.endswith(".json"):
            continue
        ref = json.load(open(os.path.join(refs, "arch", fname)))
        out.append((fname[:-5], os.path.join(bundle, "models", "fixtures", fname[:-5]),
                    [p["input_ids"] for p in ref["prompts"]], [p["new_token_ids"] for p in ref["prompts"]],
                    [p["last_logits"] for p in ref["prompts"]]))
    return out


def model_row(c, name, path, prompts, want, ref_logits):
    dev = c.a.device
    n = max(len(w) for w in want)
    got, glog, err = generate(c, name, path, dev, prompts, n)
    if err:
        return "FAIL", err
    if dev == "cpu":
        clog = glog
    else:
        _, clog, err = generate(c, name, path, "cpu", prompts, n)
        if err:
            return "FAIL", err
    exact = sum(g[: len(w)] == w for g, w in zip(got, want))
    vs_cpu = max(rel_err(g, x) for g, x in zip(glog, clog))
    detail = f"greedy tokens exact {exact}/{len(want)}; logits err/scale "
    if ref_logits is None:
        ok = exact == len(want) and vs_cpu <= 0.01
        detail += f"{dev} vs cpu {vs_cpu:.4f}"
    else:
        vs_ref = max(rel_err(g, x) for g, x in zip(glog, ref_logits))
        ok = exact == len(want) and vs_ref <= 0.01
        detail += f"vs transformers {vs_ref:.4f}, {dev} vs cpu {vs_cpu:.4f}"
    return ("pass" if ok else "FAIL"), detail


# --- cluster


def cluster_row(c, live):
    """`up --workers 2 --device DEVICE --max-live-bytes LIVE` over stories260K, `query` of every case."""
    cases = json.load(open(os.path.join(c.a.bundle, "refs", "stories260K_greedy_sample.json")))["cases"]
    model = os.path.join(c.a.bundle, "models", "stories260K")
    c.n += 1
    logname = os.path.join(c.raw, f"{c.n:03d}-cluster-up-{live}.log")
    with open(logname, "w") as log:
        up = subprocess.Popen([c.bin, "up", "--model", model, "--workers", "2", "--device", c.a.device,
                               "--max-live-bytes", live, "--listen", "127.0.0.1:0"],
                              stdout=subprocess.PIPE, stderr=log, text=True, preexec_fn=os.setpgrp)
        c.live.add(up.pid)
        try:
            endpoint = None
            while endpoint is None and up.poll() is None:
                try:
                    c.left()
                except RowTimeout:
                    raise RowTimeout(f"up not ready (log {os.path.basename(logname)})") from None
                if select.select([up.stdout], [], [], 0.5)[0]:
                    line = up.stdout.readline()
                    if line.startswith("ready "):
                        endpoint = line.split()[1]
            if endpoint is None:
                return "FAIL", f"up exited {up.poll()} before ready (log {os.path.basename(logname)})"
            exact, errors = 0, []
            for x in cases:
                rc, out, err = c.run("cluster-query", [None, "query", "--endpoint", endpoint, "--json",
                                                       "--prompt-ids", ",".join(map(str, x["input_ids"])),
                                                       "--temperature", "0", "--ignore-eos", "--max-new-tokens",
                                                       str(len(x["new_token_ids"]))])
                if rc != 0:
                    errors.append(last_line(err, rc))
                    continue
                exact += json.loads(out.splitlines()[0])["token_ids"] == x["new_token_ids"]
            ok = exact == len(cases) and not errors
            return ("pass" if ok else "FAIL"), (f"2 workers, greedy tokens exact {exact}/{len(cases)} through query"
                                                + (f"; {errors[0]}" if errors else ""))
        finally:
            if up.poll() is None:
                os.killpg(up.pid, signal.SIGTERM)
                try:
                    up.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    c.kill(up.pid)
                    up.wait()
            c.live.discard(up.pid)


# --- speed


def size(n):
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def bench(c, name, extra, new_tokens):
    args = [None, "bench", "--device", c.a.device, "--synthetic", c.a.synthetic, "--batch", "1,32",
            "--prompt-len", "32", "--new-tokens", str(new_tokens), "--json", *extra]
    rc, out, err = c.run(name, args)
    if rc != 0:
        return None, last_line(err, rc)
    return json.loads(out.strip().splitlines()[-1]), None


def speed_resident_row(c):
    res, err = bench(c, "bench-resident", [], 64)
    if err:
        return "FAIL", err
    judged = c.a.device != "cpu"
    ok, parts = True, []
    c.figures["resident"] = {}
    for row in res["rows"]:
        b = row["batch"]
        c.figures["resident"][b] = row["decode_tokens_per_s"]
        if b == 1 and row["bound_ratio"] < 0.5:
            ok = False
        parts.append(f"batch {b}: {row['decode_tokens_per_s']:.1f} tok/s, step {row['decode_step_ms']:.3f} ms, "
                     f"{row['bound_ratio']:.2f} of the bound")
    b0 = res["rows"][0]
    detail = "; ".join(parts) + f" ({size(b0['bytes_per_step'])}/step at {res['bound_gbs']:.0f} GB/s device copy)"
    detail += "" if judged else " [cpu dry run: not judged]"
    extra = [f"backend: {res.get('backend')}" + (f"; placement: {res['placement']}" if res.get("placement") else "")]
    return ("pass" if ok or not judged else "FAIL"), detail, extra


def speed_offloaded_row(c):
    res, err = bench(c, "bench-offloaded", ["--max-live-bytes", "0", "--prefetch-layers", "2"], 8)
    if err:
        return "FAIL", err
    judged = c.a.device != "cpu"
    ok, parts = True, []
    c.figures["offloaded"] = {}
    for row in res["rows"]:
        b = row["batch"]
        c.figures["offloaded"][b] = row["decode_tokens_per_s"]
        bound = row["streamed_bound_ms"]
        step = row["decode_step_ms"]
        if bound:
            over = step / bound
            ok = ok and over <= 1.2
            parts.append(f"batch {b}: step {step:.1f} ms = {over:.2f} x the pinned-copy bound {bound:.1f} ms, "
                         f"{row['decode_tokens_per_s']:.2f} tok/s")
        else:
            ok = False
            parts.append(f"batch {b}: step {step:.1f} ms, no pinned-copy bound, {row['decode_tokens_per_s']:.2f} tok/s")
    b0 = res["rows"][0]
    detail = "; ".join(parts) + f" ({size(b0['streamed_bytes_per_step'])}/step at {res['pinned_h2d_gbs']:.1f} GB/s)"
    detail += "" if judged else " [cpu dry run: not judged]"
    extra = [f"placement: {res['placement']}"] if res.get("placement") else []
    return ("pass" if ok or not judged else "FAIL"), detail, extra


# --- PyTorch


def shape_args(spec):
    """torch_bench.py's flags for a `--synthetic` spec."""
    _, _, kv = spec.partition(":")
    fields = dict(f.split("=", 1) for f in kv.split(",") if "=" in f)
    names = {"hidden": "--hidden", "layers": "--layers", "heads": "--heads", "kv_heads": "--kv-heads",
             "ffn": "--ffn", "vocab": "--vocab"}
    out = []
    for k, flag in names.items():
        if k in fields:
            out += [flag, fields[k]]
    return out


def ratios(c, tb):
    """(all met, detail) of zeroshard's speed figures over torch_bench's."""
    ok, parts = True, []
    for kind, ours, need, label in [("gpu", "resident", 2.0, "transformers fp16 on GPU"),
                                    ("offload", "offloaded", 3.0, "Accelerate CPU offload")]:
        theirs = tb.get(kind) or {}
        zs = c.figures.get(ours)
        if "error" in theirs:
            ok = False
            parts.append(f"{label}: {theirs['error']}")
            continue
        if not zs:
            ok = False
            parts.append(f"{label}: no zeroshard figures (speed:{ours} did not pass)")
            continue
        each = []
        for b, t in sorted(zs.items()):
            ref = theirs.get(str(b))
            if not ref:
                ok = False
                each.append(f"batch {b} no figure")
                continue
            r = t / ref
            ok = ok and r >= need
            each.append(f"batch {b} {t:.1f}/{ref:.1f} tok/s = {r:.2f}x")
        parts.append(f"vs {label} (target >= {need:.0f}x): " + ", ".join(each))
    return ok, "; ".join(parts)


def torch_row(c):
    if importlib.util.find_spec("torch") is None:
        return "skipped", f"torch not importable by {sys.executable}"
    out = os.path.join(c.raw, "torch.json")
    args = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_bench.py"),
            "--out", out, *shape_args(c.a.synthetic)]
    timeout = None
    try:
        rc, _, err = c.run("torch-bench", args)
    except RowTimeout as e:
        rc, err, timeout = 124, "", e
    tb = json.load(open(out)) if os.path.exists(out) else None
    if tb and tb.get("skipped"):
        return ("skipped" if c.a.device == "cpu" else "FAIL"), tb["skipped"]
    if tb is None:
        if timeout:
            raise timeout
        return "FAIL", f"no torch_bench.py result (exit {rc}: {last_line(err, rc)})"
    ok, detail = ratios(c, tb)
    versions = tb.get("versions") or {}
    head = (f"torch {versions.get('torch')}, transformers {versions.get('transformers')}, {tb.get('device')}; "
            f"seconds {tb.get('seconds')}")
    if timeout:
        raise RowTimeout(f"torch_bench.py still running; so far: {detail}")
    if rc != 0:
        return "FAIL", f"torch_bench.py exit {rc}: {last_line(err, rc)}; {detail}"
    if c.a.device == "cpu":
        return "pass", detail + " [cpu dry run: not judged]", [head]
    return ("pass" if ok else "FAIL"), detail, [head]


# ---


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", required=True)
    p.add_argument("--logs", required=True)
    p.add_argument("--raw", default=None, help="per-command logs (default LOGS/raw)")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run")
    p.add_argument("--synthetic", default=None, help="the speed rows' shape (default TinyLlama-1.1B; small on cpu)")
    p.add_argument("--budget", type=float, default=460, help="seconds for all rows together")
    p.add_argument("--setup-s", type=float, default=0, help="seconds the caller spent before (for the 'at' column)")
    p.add_argument("--libdirs", default=os.environ.get("LD_LIBRARY_PATH", ""))
    a = p.parse_args()
    a.synthetic = a.synthetic or (SMALL if a.device == "cpu" else TINYLLAMA)
    a.bundle = os.path.abspath(a.bundle)
    os.makedirs(a.logs, exist_ok=True)
    c = Check(a)
    signal.signal(signal.SIGTERM, c.end)
    signal.signal(signal.SIGINT, c.end)

    commit = open(os.path.join(a.bundle, "commit")).read().strip() if os.path.exists(
        os.path.join(a.bundle, "commit")) else "?"
    c.emit(f"gpu-check: device {a.device}, bundle {a.bundle} (commit {commit}), rows budget {a.budget:.0f}s "
           f"after {a.setup_s:.0f}s set-up; logs {a.logs}")
    c.emit(f"{'row':<24} {'result':<7} {'secs':>7} {'at':>6}  detail")

    c.row("versions", LIMITS["versions"], versions_row, c, a.libdirs)
    c.row("ops", LIMITS["ops"], ops_row, c)
    try:
        cases = model_cases(a.bundle)
    except (OSError, ValueError, KeyError) as e:
        cases, why = [], f"refs unreadable: {type(e).__name__}: {e}"
        c.row("model:refs", LIMITS["model"], lambda: ("FAIL", why))
    for i, case in enumerate(cases):
        c.row(f"model:{case[0]}", LIMITS["model-first" if i == 0 else "model"], model_row, c, *case)
    c.row("cluster:streamed", LIMITS["cluster:streamed"], cluster_row, c, "0")
    c.row("cluster:resident", LIMITS["cluster:resident"], cluster_row, c, "1000000000")
    c.row("speed:resident", LIMITS["speed:resident"], speed_resident_row, c)
    c.row("speed:offloaded", LIMITS["speed:offloaded"], speed_offloaded_row, c)
    c.row("torch", LIMITS["torch"], torch_row, c)

    return 0 if c.finish() else 1


if __name__ == "__main__":
    sys.exit(main())
