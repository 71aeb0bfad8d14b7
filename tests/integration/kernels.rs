//! The CUDA backend before any GPU: every kernel through the real NVRTC (12.x
//! and 13.x, from PyPI's wheels) on the backend's own compile path, ptxas's
//! register and spill figures for sm_90, the entry points the release binary can
//! call against the CUDA 12 bindings, and drivers and libraries that are
//! missing, too old or mismatched (stub libraries built here) refused in one
//! line with exit code 1, never a panic.
//!
//! The `nvrtc_*` tests need the wheels: `scripts/cuda-wheels.sh` installs them in
//! a cache folder (the test command runs it first and, where they cannot be had,
//! skips these tests and counts them as skipped).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use crate::common::*;
use zeroshard_engine::cuda::versions::{CUBLAS_SYMBOLS, DRIVER_SYMBOLS, MIN_DRIVER, NVRTC_SYMBOLS};

/// `scripts/cuda-wheels.sh`'s env file, read (installs the wheels when missing).
fn wheels() -> BTreeMap<String, String> {
    let out =
        Command::new(repo().join("scripts/cuda-wheels.sh")).output().expect("run scripts/cuda-wheels.sh");
    assert!(
        out.status.success(),
        "the NVRTC wheels cannot be had (scripts/cuda-wheels.sh exit {:?}): {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
    );
    let path = String::from_utf8(out.stdout).expect("utf-8");
    let text = std::fs::read_to_string(path.trim()).expect("the env file cuda-wheels.sh printed");
    text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// The binary with `LD_LIBRARY_PATH` set to `dirs` (and nothing else).
fn run_with_libs(dirs: &[&Path], args: &[&str]) -> Output {
    let path = std::env::join_paths(dirs).expect("library path");
    bin().env("LD_LIBRARY_PATH", path).args(args).output().expect("run zeroshard")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn nvrtc_12_and_13_compile_every_kernel_for_every_architecture() {
    let w = wheels();
    for (lib, version, archs) in [
        ("NVRTC13_LIB", "NVRTC13_VERSION", &["sm_80", "sm_86", "sm_89", "sm_90", "sm_100"][..]),
        ("NVRTC12_LIB", "NVRTC12_VERSION", &["sm_80", "sm_86", "sm_89", "sm_90"][..]),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = run_with_libs(
            &[Path::new(&w[lib])],
            &["cuda", "kernels", "--arch", &archs.join(","), "--out", dir.path().to_str().expect("path")],
        );
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        eprintln!("{lib} ({}):\n{stdout}", w[version]);
        assert!(out.status.success(), "{lib}: {stderr}");
        let major_minor: String = w[version].split('.').take(2).collect::<Vec<_>>().join(".");
        assert!(stdout.contains(&format!(
            "NVRTC {major_minor}: every kernel compiled for {} architecture",
            archs.len()
        )));
        for arch in archs {
            let cc = arch.trim_start_matches("sm_");
            for (file, _, _) in zeroshard_engine::cuda::kernels::SOURCES {
                for name in [format!("{file}-compute_{cc}.ptx"), format!("{file}-sm_{cc}.cubin")] {
                    let len = std::fs::metadata(dir.path().join(&name)).map(|m| m.len()).unwrap_or(0);
                    assert!(len > 1000, "{lib}: {name} missing or empty ({len} bytes)");
                }
            }
            // Machine code for the architecture asked for (ELF, `sm_XY` in its flags) and
            // PTX naming its target.
            let ptx =
                std::fs::read_to_string(dir.path().join(format!("norm.cu-compute_{cc}.ptx"))).expect("ptx");
            assert!(ptx.contains(&format!(".target sm_{cc}")), "{lib}: {arch}");
            let cubin = std::fs::read(dir.path().join(format!("norm.cu-sm_{cc}.cubin"))).expect("cubin");
            assert_eq!(&cubin[..4], b"\x7fELF", "{lib}: {arch}");
        }
    }
}

#[test]
fn nvrtc_fails_on_a_broken_kernel_and_on_a_warning() {
    let w = wheels();
    let lib = Path::new(&w["NVRTC13_LIB"]);
    for (extra, expect) in [
        ("extern \"C\" __global__ void broken(float* x) { x[0] = undeclared_name; }", "undeclared_name"),
        ("#warning \"deliberate\"", "warning"),
    ] {
        let out = run_with_libs(&[lib], &["cuda", "kernels", "--arch", "sm_90", "--append-source", extra]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra}: {stderr}");
        let last = stderr.trim_end().lines().last().unwrap_or("");
        assert!(last.starts_with("error: 8 of 8 compilations failed or warned with NVRTC 13."), "{last}");
        assert!(last.contains(expect) && last.contains("elementwise.cu"), "{last}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn nvrtc_ptxas_finds_no_spill_and_the_readme_table_is_current() {
    let w = wheels();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("path");
    let out =
        run_with_libs(&[Path::new(&w["NVRTC13_LIB"])], &["cuda", "kernels", "--arch", "sm_90", "--out", d]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let readme = repo().join("deploy/README.md");
    let readme = readme.to_str().expect("path");
    // ZEROSHARD_WRITE_PTXAS_TABLE=1 rewrites the table instead of comparing.
    let table_arg = if std::env::var_os("ZEROSHARD_WRITE_PTXAS_TABLE").is_some() {
        "--write-readme"
    } else {
        "--compare-readme"
    };
    let launch = format!("{d}/launch.tsv");
    let out = Command::new("python3")
        .arg(repo().join("scripts/ptxas-table.py"))
        .args(["--ptxas", &w["PTXAS"], "--ptx-dir", d, "--arch", "sm_90", "--launch", &launch, "--check"])
        .args([table_arg, readme])
        .output()
        .expect("run ptxas-table.py");
    eprintln!("{}", text(&out.stdout));
    assert!(out.status.success(), "ptxas-table: {}{}", text(&out.stdout), text(&out.stderr));
    // Every kernel the backend launches is in the table.
    let table = text(&out.stdout);
    for (_, _, names) in zeroshard_engine::cuda::kernels::SOURCES {
        for n in *names {
            assert!(table.contains(&format!("| `{n}` |")), "{n} missing from the table");
        }
    }
}

/// Each CUDA entry point cudarc loads by name (`load::<_F>("name")` in its
/// bindings' `pub unsafe fn`s), with the oldest CUDA version whose bindings have it.
fn cudarc_symbols(lib: &str) -> BTreeMap<String, u32> {
    let meta = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(repo().join("Cargo.toml"))
        .output()
        .expect("cargo metadata");
    let meta: serde_json::Value = serde_json::from_slice(&meta.stdout).expect("metadata json");
    let manifest = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .find(|p| p["name"] == "cudarc")
        .and_then(|p| p["manifest_path"].as_str())
        .expect("cudarc among the packages");
    let src = Path::new(manifest).parent().expect("dir").join(format!("src/{lib}/sys/mod.rs"));
    let text = std::fs::read_to_string(&src).expect("cudarc bindings");
    let lines: Vec<&str> = text.lines().collect();
    let mut out = BTreeMap::new();
    let mut oldest = 11040;
    for (i, l) in lines.iter().enumerate() {
        if l.starts_with("pub unsafe fn ") {
            // The `#[cfg(any(feature = "cuda-12080", ...))]` above it, if any; none: every version.
            oldest = lines[i.saturating_sub(1)]
                .split("feature = \"cuda-")
                .skip(1)
                .filter_map(|s| s.get(..5).and_then(|v| v.parse::<u32>().ok()))
                .min()
                .unwrap_or(11040);
        }
        if let Some(name) = l.split("load::<_F>(\"").nth(1).and_then(|r| r.split('"').next()) {
            let e = out.entry(name.to_string()).or_insert(oldest);
            *e = (*e).min(oldest);
        }
    }
    out
}

#[test]
fn every_entry_point_the_binary_calls_is_checked_and_in_cuda_12_0() {
    let binary = std::fs::read(env!("CARGO_BIN_EXE_zeroshard")).expect("the release binary");
    // The binary's identifier-like runs that can hold an entry point's name (the
    // names sit side by side in the read-only data, with no separator).
    let runs: Vec<String> = binary
        .split(|b| !(b.is_ascii_alphanumeric() || *b == b'_'))
        .filter(|r| {
            r.windows(3).any(|w| w[0] == b'c' && w[1] == b'u' && w[2].is_ascii_uppercase())
                || r.windows(5).any(|w| w == b"nvrtc")
                || r.windows(6).any(|w| w == b"cublas")
        })
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .collect();
    let contains = |s: &str| runs.iter().map(|r| r.matches(s).count()).sum::<usize>();
    for (lib, checked) in [("driver", DRIVER_SYMBOLS), ("nvrtc", NVRTC_SYMBOLS), ("cublas", CUBLAS_SYMBOLS)] {
        let known = cudarc_symbols(lib);
        let found: Vec<&String> = known.keys().filter(|n| contains(n) > 0).collect();
        // A name seen only inside longer names found (`cuMemAlloc` in `cuMemAlloc_v2`) is not called.
        let inside_longer = |n: &str| -> usize {
            found.iter().filter(|o| o.as_str() != n && o.contains(n)).map(|o| contains(o)).sum()
        };
        let called: Vec<&String> = found.iter().copied().filter(|n| contains(n) > inside_longer(n)).collect();
        assert!(called.len() >= 4, "{lib}: only {called:?} found in the binary");
        let min = MIN_DRIVER.major * 1000 + MIN_DRIVER.minor * 10;
        for n in called {
            assert!(known[n] <= min, "{lib}: {n} first appears in CUDA {}, after {MIN_DRIVER}", known[n]);
            assert!(
                checked.contains(&n.as_str()),
                "{lib}: {n} is called but not among the symbols the backend checks"
            );
        }
        for n in checked {
            assert!(
                known.get(*n).is_some_and(|v| *v <= min),
                "{lib}: {n} is not in CUDA {MIN_DRIVER}'s bindings"
            );
        }
    }
}

/// A stub library `name` (e.g. `libcuda.so`) in `dir` exporting `symbols`, each
/// returning `fail` (a valid error code), with `bodies` defining the rest.
fn stub(dir: &Path, names: &[&str], symbols: &[&str], bodies: &str, fail: i32) {
    let mut c = String::from(bodies);
    for s in symbols {
        if !bodies.contains(&format!(" {s}(")) {
            c.push_str(&format!("int {s}(void) {{ return {fail}; }}\n"));
        }
    }
    let src = dir.join(format!("{}.c", names[0]));
    std::fs::write(&src, c).expect("write stub source");
    let lib = dir.join(names[0]);
    let out =
        Command::new("cc").args(["-shared", "-fPIC", "-o"]).arg(&lib).arg(&src).output().expect("run cc");
    assert!(out.status.success(), "cc: {}", text(&out.stderr));
    for alias in &names[1..] {
        std::fs::copy(&lib, dir.join(alias)).expect("copy stub");
    }
}

/// A driver stub reporting CUDA `version` (12040 is 12.4) with one device,
/// exporting every checked entry point but `without`.
fn driver_stub(dir: &Path, version: i32, without: Option<&str>) {
    let bodies = format!(
        "int cuDriverGetVersion(int* v) {{ *v = {version}; return 0; }}\n\
         int cuInit(unsigned f) {{ return 0; }}\n\
         int cuDeviceGetCount(int* n) {{ *n = 1; return 0; }}\n\
         int cuGetErrorString(int e, const char** s) {{ *s = \"stub driver\"; return 0; }}\n"
    );
    let symbols: Vec<&str> = DRIVER_SYMBOLS.iter().copied().filter(|s| Some(*s) != without).collect();
    // 801: CUDA_ERROR_NOT_SUPPORTED.
    stub(dir, &["libcuda.so", "libcuda.so.1"], &symbols, &bodies, 801);
}

/// A cuBLAS stub of version `major.minor`.
fn cublas_stub(dir: &Path, major: i32, minor: i32) {
    let bodies = format!(
        "int cublasGetProperty(int which, int* v) {{ *v = which == 0 ? {major} : which == 1 ? {minor} : 1; return 0; }}\n"
    );
    // 15: CUBLAS_STATUS_NOT_SUPPORTED.
    stub(dir, &["libcublas.so", "libcublas.so.12"], CUBLAS_SYMBOLS, &bodies, 15);
}

/// `generate --device cuda` on stories260K with the libraries of `dirs`: exit 1
/// and one line, no panic; returns the line.
fn refused(dirs: &[&Path]) -> String {
    let m = model("stories260K");
    let args = ["generate", "--model", m.to_str().expect("path"), "--prompt", "Once", "--device", "cuda"];
    let out = run_with_libs(dirs, &args);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line expected: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err.trim_end().to_string()
}

#[test]
fn drivers_and_libraries_the_backend_cannot_use_are_refused_in_one_line() {
    if std::fs::metadata("/usr/lib/x86_64-linux-gnu/libcuda.so.1").is_ok()
        || Path::new("/dev/nvidiactl").exists()
    {
        eprintln!("a real CUDA driver is installed: the stub drivers would not be the ones loaded; skipping");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = |n: &str| {
        let d = tmp.path().join(n);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    };
    // No driver at all.
    let none = dir("none");
    let e = refused(&[&none]);
    assert!(
        e.contains("CUDA is not available here: the CUDA driver library (libcuda.so) is not installed"),
        "{e}"
    );

    // A CUDA 11.8 driver.
    let old = dir("old");
    driver_stub(&old, 11080, None);
    let e = refused(&[&old]);
    assert!(
        e.contains("the CUDA driver is 11.8") && e.contains(&format!("needs CUDA {MIN_DRIVER} or newer")),
        "{e}"
    );

    // A driver without an entry point the backend calls.
    let partial = dir("partial");
    driver_stub(&partial, 12040, Some("cuMemcpyDtoDAsync_v2"));
    let e = refused(&[&partial]);
    assert!(e.contains("the CUDA driver (CUDA 12.4) has no cuMemcpyDtoDAsync_v2"), "{e}");

    // A good driver, no NVRTC; then an NVRTC stub, no cuBLAS; then a cuBLAS 11.
    let good = dir("good");
    driver_stub(&good, 12040, None);
    let e = refused(&[&good]);
    assert!(e.contains("NVRTC (libnvrtc.so.12 or .13) is not on the library path"), "{e}");
    let nvrtc = dir("nvrtc");
    let nvrtc_bodies = "int nvrtcVersion(int* a, int* b) { *a = 12; *b = 9; return 0; }\n";
    stub(&nvrtc, &["libnvrtc.so", "libnvrtc.so.12"], NVRTC_SYMBOLS, nvrtc_bodies, 11);
    let e = refused(&[&good, &nvrtc]);
    assert!(e.contains("cuBLAS (libcublas.so.12 or .13) is not on the library path"), "{e}");
    let cublas11 = dir("cublas11");
    cublas_stub(&cublas11, 11, 11);
    let e = refused(&[&good, &nvrtc, &cublas11]);
    assert!(e.contains("cuBLAS 11.11 is too old: zeroshard needs cuBLAS 12.0 or newer"), "{e}");

    // A CUDA 13 cuBLAS on a CUDA 12.4 driver.
    let cublas13 = dir("cublas13");
    cublas_stub(&cublas13, 13, 1);
    let e = refused(&[&good, &nvrtc, &cublas13]);
    assert!(e.contains("cuBLAS 13.1 needs a CUDA 13.x driver but the driver is CUDA 12.4"), "{e}");

    // Everything the right version: the stub driver's own failure, in one line.
    let cublas12 = dir("cublas12");
    cublas_stub(&cublas12, 12, 9);
    let e = refused(&[&good, &nvrtc, &cublas12]);
    assert!(e.contains("CUDA_ERROR_NOT_SUPPORTED"), "{e}");

    // `cuda info` reports rather than fails; `--device auto` falls back to the CPU.
    let out = run_with_libs(&[&old], &["cuda", "info"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(info["usable"], false);
    assert!(info["problem"].as_str().is_some_and(|p| p.contains("11.8")), "{info}");
    let m = model("stories260K");
    let args =
        ["generate", "--model", m.to_str().expect("path"), "--prompt", "Once", "--max-new-tokens", "4"];
    let out = run_with_libs(&[&old], &[&args[..], &["--device", "auto"]].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
}
