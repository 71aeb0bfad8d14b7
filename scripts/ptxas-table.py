#!/usr/bin/env python3
"""Per-kernel resources of the CUDA kernels, read from ptxas, as a markdown table.

    scripts/ptxas-table.py --ptxas PATH --ptx-dir DIR [--arch sm_90]
        [--launch DIR/launch.tsv] [--check]
        [--write-readme deploy/README.md | --compare-readme deploy/README.md]

DIR holds the PTX the backend compiles with NVRTC, one file per kernel source,
named `<source>-compute_XY.ptx` (e.g. `norm.cu-compute_90.ptx`); `--arch sm_XY`
takes the `*-compute_XY.ptx` files and assembles each with
`ptxas -v -arch=sm_XY`, which reports, per `.entry` kernel, its registers per
thread, spill stores and loads, stack frame and static shared memory.

launch.tsv (tab-separated, header `kernel<TAB>threads_per_block<TAB>dynamic_shared_bytes`)
gives each kernel's launch block. A kernel fails `--check` when
  - it spills (spill stores or spill loads above 0 bytes);
  - its block needs more than 65536 registers: registers are allocated per
    warp in units of 256, so ceil(regs * 32 / 256) * 256 per warp, times the
    warps of the block (a block over 1024 threads fails too);
  - static + dynamic shared memory is over 49152 bytes (48 KiB, the most a
    block gets without opting in);
  - it is in the PTX but not in launch.tsv, or in launch.tsv but not in the PTX.
These limits are sm_90's, and the same on every architecture from sm_70 on.

The table goes to stdout, sorted by source then kernel, with a line naming the
ptxas used. `--write-readme FILE` replaces what lies between
`<!-- ptxas-table:begin -->` and `<!-- ptxas-table:end -->` in FILE with it;
`--compare-readme FILE` only says whether that text is current.

Exit status: 0; 1 when `--check` finds a failing kernel (one line each on
stderr) or `--compare-readme` finds the table stale; 2 when it cannot run
(ptxas fails, no PTX files, a malformed launch.tsv, markers missing).
"""
import argparse
import difflib
import math
import pathlib
import re
import subprocess
import sys
import tempfile

REGISTERS_PER_BLOCK = 65536
REGISTER_UNIT = 256  # registers are allocated per warp in multiples of this
WARP = 32
MAX_THREADS = 1024
SHARED_PER_BLOCK = 49152
BEGIN = "<!-- ptxas-table:begin -->"
END = "<!-- ptxas-table:end -->"
LAUNCH_HEADER = ["kernel", "threads_per_block", "dynamic_shared_bytes"]


class Fatal(Exception):
    """Something that stops the run (exit 2)."""


def entries_in_ptx(text):
    """The `.entry` kernel names a PTX file defines."""
    return re.findall(r"^\s*(?:\.visible\s+|\.weak\s+)?\.entry\s+([A-Za-z_$][\w$]*)", text, re.M)


def parse_ptxas(output, arch):
    """Per entry kernel, from `ptxas -v` output: registers, spill_stores,
    spill_loads, stack, smem (static shared bytes)."""
    kernels, props = {}, {}
    current = None  # the entry whose "Used ..." line comes next
    in_props = None  # the function whose "stack frame" line comes next
    for line in output.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '([^']+)'", line)
        if m:
            if m.group(2) != arch:
                raise Fatal(f"ptxas compiled {m.group(1)} for {m.group(2)}, not {arch}")
            current = m.group(1)
            kernels[current] = {}
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            in_props = m.group(1)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and in_props is not None:
            props[in_props] = {"stack": int(m.group(1)), "spill_stores": int(m.group(2)),
                               "spill_loads": int(m.group(3))}
            in_props = None
            continue
        m = re.search(r"\bUsed (\d+) registers\b", line)
        if m and current is not None:
            smem = re.search(r"(\d+) bytes smem", line)
            kernels[current]["registers"] = int(m.group(1))
            kernels[current]["smem"] = int(smem.group(1)) if smem else 0
            current = None
    for name, k in kernels.items():
        if "registers" not in k or name not in props:
            raise Fatal(f"ptxas -v output has no register or spill line for {name}")
        k.update(props[name])
    return kernels


def ptxas_version(ptxas):
    try:
        out = subprocess.run([ptxas, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise Fatal(f"{ptxas} --version failed: {e}")
    m = re.search(r"release (\d+\.\d+), (V[\d.]+)", out)
    return m.group(2) if m else out.strip().splitlines()[-1]


def assemble(ptxas, ptx, arch):
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [ptxas, "-v", f"-arch={arch}", "-o", str(pathlib.Path(tmp) / "out.cubin"), str(ptx)]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            raise Fatal(f"running {ptxas}: {e}")
    out = run.stdout + run.stderr
    if run.returncode != 0:
        errors = [l.strip() for l in out.splitlines() if re.search(r"\b(error|fatal)\b", l)]
        raise Fatal(f"ptxas failed on {ptx.name}: " + " | ".join((errors or out.splitlines())[:3]))
    for line in out.splitlines():
        if "warning" in line.lower():
            print(f"ptxas-table: {ptx.name}: {line.strip()}", file=sys.stderr)
    return out


def read_launch(path):
    """kernel -> (threads_per_block, dynamic_shared_bytes)."""
    try:
        lines = pathlib.Path(path).read_text().splitlines()
    except OSError as e:
        raise Fatal(f"reading {path}: {e}")
    rows = [l for l in lines if l.strip() and not l.startswith("#")]
    if not rows or rows[0].split("\t") != LAUNCH_HEADER:
        raise Fatal(f"{path}: the first line must be the tab-separated header " + " ".join(LAUNCH_HEADER))
    launch = {}
    for n, row in enumerate(rows[1:], start=2):
        cols = row.split("\t")
        if len(cols) != 3 or not cols[1].isdigit() or not cols[2].isdigit():
            raise Fatal(f"{path}: line {n} is not kernel, threads, bytes: {row!r}")
        if cols[0] in launch:
            raise Fatal(f"{path}: {cols[0]} is listed twice")
        launch[cols[0]] = (int(cols[1]), int(cols[2]))
    return launch


def allocated_registers(registers, threads):
    """Registers a block of `threads` holds: whole warps, each rounded up to the unit."""
    per_warp = math.ceil(registers * WARP / REGISTER_UNIT) * REGISTER_UNIT
    return per_warp * math.ceil(threads / WARP)


def collect(args):
    compute = "compute_" + args.arch[len("sm_"):]
    files = sorted(pathlib.Path(args.ptx_dir).glob(f"*-{compute}.ptx"))
    if not files:
        raise Fatal(f"no *-{compute}.ptx files in {args.ptx_dir}")
    rows = []
    seen = {}
    for ptx in files:
        source = ptx.name[: -len(f"-{compute}.ptx")]
        entries = entries_in_ptx(ptx.read_text())
        found = parse_ptxas(assemble(args.ptxas, ptx, args.arch), args.arch)
        if sorted(entries) != sorted(found):
            raise Fatal(f"{ptx.name}: .entry kernels {sorted(entries)} but ptxas reported {sorted(found)}")
        for name, k in found.items():
            if name in seen:
                raise Fatal(f"kernel {name} is in both {seen[name]} and {source}")
            seen[name] = source
            rows.append(dict(k, kernel=name, source=source))
    rows.sort(key=lambda r: (r["source"], r["kernel"]))
    return rows


def failures(rows, launch):
    bad = []
    for r in rows:
        where = f"{r['kernel']} ({r['source']})"
        if r["spill_stores"] or r["spill_loads"]:
            bad.append(f"{where}: spills ({r['spill_stores']} bytes stores, {r['spill_loads']} bytes loads)")
        if launch is None:
            continue
        if r["kernel"] not in launch:
            bad.append(f"{where}: not in launch.tsv")
            continue
        threads, dynamic = launch[r["kernel"]]
        if not 1 <= threads <= MAX_THREADS:
            bad.append(f"{where}: {threads} threads per block (1 to {MAX_THREADS})")
        regs = allocated_registers(r["registers"], threads)
        if regs > REGISTERS_PER_BLOCK:
            bad.append(f"{where}: {r['registers']} registers x {threads} threads allocate {regs} registers"
                       f" per block, over {REGISTERS_PER_BLOCK}")
        if r["smem"] + dynamic > SHARED_PER_BLOCK:
            bad.append(f"{where}: {r['smem']} bytes static + {dynamic} bytes dynamic shared memory,"
                       f" over {SHARED_PER_BLOCK}")
    if launch is not None:
        known = {r["kernel"] for r in rows}
        bad += [f"{k}: in launch.tsv but in no PTX file" for k in sorted(launch) if k not in known]
    return bad


def table(rows, launch, version, arch):
    head = ["kernel", "source", "registers", "spill stores", "spill loads", "stack", "shared (static)",
            "block", f"regs × block ≤ {REGISTERS_PER_BLOCK}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if launch is not None and r["kernel"] in launch:
            threads, dynamic = launch[r["kernel"]]
            regs = allocated_registers(r["registers"], threads)
            block = str(threads) + (f" + {dynamic} B dyn" if dynamic else "")
            fit = f"{regs} {'ok' if regs <= REGISTERS_PER_BLOCK else 'OVER'}"
        else:
            block, fit = "?", "?"
        cells = [f"`{r['kernel']}`", r["source"], r["registers"], r["spill_stores"], r["spill_loads"],
                 r["stack"], r["smem"], block, fit]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append("")
    lines.append(f"ptxas {version}, `-arch={arch}`. Spills, stack and shared memory in bytes; the last column "
                 f"is the registers a block is allocated (each warp's rounded up to a multiple of {REGISTER_UNIT}).")
    return "\n".join(lines) + "\n"


def split_readme(path):
    try:
        text = pathlib.Path(path).read_text()
    except OSError as e:
        raise Fatal(f"reading {path}: {e}")
    b, e = text.find(BEGIN), text.find(END)
    if b < 0 or e < 0 or e < b:
        raise Fatal(f"{path} has no {BEGIN} ... {END} markers")
    return text[: b + len(BEGIN)], text[b + len(BEGIN): e], text[e:]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ptxas", required=True, help="the ptxas executable")
    ap.add_argument("--ptx-dir", required=True, help="folder of <source>-compute_XY.ptx files")
    ap.add_argument("--arch", default="sm_90", help="target, sm_XY (default sm_90)")
    ap.add_argument("--launch", help="launch.tsv: kernel, threads_per_block, dynamic_shared_bytes")
    ap.add_argument("--check", action="store_true", help="exit 1 naming each failing kernel")
    out = ap.add_mutually_exclusive_group()
    out.add_argument("--write-readme", metavar="FILE", help="put the table between the markers in FILE")
    out.add_argument("--compare-readme", metavar="FILE", help="exit 1 if FILE's table is not current")
    args = ap.parse_args()
    if not re.fullmatch(r"sm_\d+[a-z]?", args.arch):
        ap.error(f"--arch {args.arch}: expected sm_XY, e.g. sm_90")

    try:
        launch = read_launch(args.launch) if args.launch else None
        rows = collect(args)
        text = table(rows, launch, ptxas_version(args.ptxas), args.arch)
        block = "\n" + text
        status = 0
        if args.write_readme:
            head, _, tail = split_readme(args.write_readme)
            pathlib.Path(args.write_readme).write_text(head + block + tail)
        if args.compare_readme:
            _, old, _ = split_readme(args.compare_readme)
            if old.strip() != block.strip():
                diff = difflib.unified_diff(old.strip().splitlines(), block.strip().splitlines(),
                                            f"{args.compare_readme} (committed)", "ptxas now", lineterm="")
                print("\n".join(diff), file=sys.stderr)
                print(f"ptxas-table: the table in {args.compare_readme} is stale; regenerate it with"
                      f" --write-readme", file=sys.stderr)
                status = 1
    except Fatal as e:
        print(f"ptxas-table: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    if args.check:
        bad = failures(rows, launch)
        for line in bad:
            print(f"ptxas-table: FAIL {line}", file=sys.stderr)
        if bad:
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
