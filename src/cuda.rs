//! `zeroshard cuda`: what CUDA this machine offers the backend (`info`), and
//! compiling every kernel with the NVRTC on the library path for chosen
//! architectures (`kernels`), which needs neither a GPU nor a driver.
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::json;
use zeroshard_engine::cuda::kernels::{self, Nvrtc, Output, SOURCES};
use zeroshard_engine::cuda::{self, versions};

use crate::args::{CudaCommand, CudaKernelsArgs};

pub(crate) fn run(c: CudaCommand) -> Result<()> {
    match c {
        CudaCommand::Info => info(),
        CudaCommand::Kernels(a) => compile_kernels(a),
    }
}

/// One JSON object: the driver, NVRTC and cuBLAS versions found (null where
/// none), the devices when CUDA is usable, and the problem when it is not.
/// Succeeds either way: this reports, it does not judge.
fn info() -> Result<()> {
    let (report, usable) = versions::check();
    let devices = match usable {
        Ok(_) => cuda::devices()?,
        Err(_) => Vec::new(),
    };
    // Only asked of an NVRTC the check found (calling a missing one panics in cudarc).
    let nvrtc_archs = report.nvrtc.as_ref().and_then(|_| Nvrtc::loaded().ok()).map(|n| n.archs);
    let out = json!({
        "driver": report.driver,
        "nvrtc": report.nvrtc,
        "nvrtc_archs": nvrtc_archs,
        "cublas": report.cublas,
        "min_driver": versions::MIN_DRIVER.to_string(),
        "devices": devices,
        "usable": !devices.is_empty(),
        "problem": report.problem,
    });
    zeroshard_offload::outln!("{out}");
    Ok(())
}

/// Every kernel source, for every architecture asked for, to PTX (`compute_XY`)
/// and CUBIN (`sm_XY`) through the backend's own NVRTC path; any error or
/// warning fails. With `--out`, the images and `launch.tsv` (each kernel's
/// block size) are written there.
fn compile_kernels(a: CudaKernelsArgs) -> Result<()> {
    let nvrtc = Nvrtc::loaded().map_err(anyhow::Error::msg)?;
    let version = nvrtc.version;
    let archs: Vec<u32> = match &a.arch {
        Some(list) => list.iter().map(|s| parse_arch(s)).collect::<Result<_>>()?,
        None => {
            [80, 86, 89, 90, 100].into_iter().filter(|cc| *cc < 100 || nvrtc.archs.contains(cc)).collect()
        }
    };
    for cc in &archs {
        nvrtc.targets(*cc).map_err(anyhow::Error::msg)?;
    }
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        write_launch(dir)?;
    }
    let extra = a.append_source.as_deref().map(|s| format!("\n{s}\n")).unwrap_or_default();
    let mut failures = Vec::new();
    for cc in &archs {
        let (mut ptx_bytes, mut cubin_bytes) = (0, 0);
        for (file, src, _) in SOURCES {
            for output in [Output::Ptx, Output::Cubin] {
                let target = output.target(*cc);
                match kernels::compile(file, src, &extra, *cc, output) {
                    Err(e) => failures.push(e),
                    Ok(c) if !c.log.is_empty() => failures
                        .push(format!("{file} ({target}): warning: {}", c.log.lines().next().unwrap_or(""))),
                    Ok(c) => {
                        match output {
                            Output::Ptx => ptx_bytes += c.image.len(),
                            Output::Cubin => cubin_bytes += c.image.len(),
                        }
                        if let Some(dir) = &a.out {
                            let path = dir.join(format!("{file}-{target}.{}", output.extension()));
                            std::fs::write(&path, &c.image)
                                .with_context(|| format!("writing {}", path.display()))?;
                        }
                    }
                }
            }
        }
        zeroshard_offload::outln!(
            "NVRTC {version} sm_{cc}: {} sources, PTX {ptx_bytes} bytes, CUBIN {cubin_bytes} bytes",
            SOURCES.len()
        );
    }
    for f in &failures {
        zeroshard_offload::errln!("{f}");
    }
    if let Some(first) = failures.first() {
        bail!(
            "{} of {} compilations failed or warned with NVRTC {version}; first: {first}",
            failures.len(),
            2 * SOURCES.len() * archs.len()
        );
    }
    zeroshard_offload::outln!(
        "NVRTC {version}: every kernel compiled for {} architecture(s) without a warning",
        archs.len()
    );
    Ok(())
}

/// `sm_90`, `compute_90` or `90` → 90.
fn parse_arch(s: &str) -> Result<u32> {
    let digits = s.trim_start_matches("sm_").trim_start_matches("compute_");
    digits
        .parse()
        .ok()
        .filter(|cc| (30..=1000).contains(cc))
        .with_context(|| format!("--arch {s}: expected sm_XY"))
}

/// `DIR/launch.tsv`: each kernel's threads per block (no dynamic shared memory).
fn write_launch(dir: &Path) -> Result<()> {
    let mut tsv = String::from("kernel\tthreads_per_block\tdynamic_shared_bytes\n");
    for (_, _, names) in SOURCES {
        for n in *names {
            tsv.push_str(&format!("{n}\t{}\t0\n", kernels::threads_per_block(n)));
        }
    }
    let path = dir.join("launch.tsv");
    std::fs::write(&path, tsv).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn architectures_parse() {
        assert_eq!(super::parse_arch("sm_90").ok(), Some(90));
        assert_eq!(super::parse_arch("compute_86").ok(), Some(86));
        assert_eq!(super::parse_arch("100").ok(), Some(100));
        assert!(super::parse_arch("sm_x").is_err() && super::parse_arch("sm_9").is_err());
    }
}
