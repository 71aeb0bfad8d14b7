//! Which CUDA driver, cuBLAS and NVRTC this process finds, and whether the
//! backend can run on them: read before anything else is called in them, so a
//! driver or library that is missing, too old or lacks an entry point the
//! backend calls is refused in one line instead of a panic on a missing symbol.
//!
//! The build's bindings are cudarc's CUDA 13.0 ones (so that both
//! `libcublas.so.13`/`libnvrtc.so.13` and `.12` are looked for), but each entry
//! point is resolved by name when first called, and every one the backend calls
//! ([`DRIVER_SYMBOLS`], [`NVRTC_SYMBOLS`], [`CUBLAS_SYMBOLS`]) exists in every
//! CUDA 12 driver and library: the `kernels` test checks the release binary
//! against cudarc's bindings. So the backend runs on any driver from CUDA 12.0
//! (R525) on, with a cuBLAS and an NVRTC of major version 12 or 13 no newer than
//! the driver's major version: kernels are compiled to the device's own
//! machine code (CUBIN), which CUDA's minor-version compatibility lets a newer
//! 12.x NVRTC hand to an older 12.x driver (PTX it would not take).
use std::ffi::{c_int, c_uint};
use std::fmt;

use serde::Serialize;

/// A CUDA version, `major.minor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
}

impl Version {
    /// From the driver's encoding, `1000 * major + 10 * minor` (12040 is 12.4).
    pub fn from_driver(v: i32) -> Self {
        let v = v.max(0) as u32;
        Self { major: v / 1000, minor: v % 1000 / 10 }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The oldest driver the backend runs on: the first CUDA 12 one.
pub const MIN_DRIVER: Version = Version { major: 12, minor: 0 };
/// The oldest cuBLAS and NVRTC major version.
pub const MIN_LIBRARY_MAJOR: u32 = 12;

/// Every driver entry point the backend can call (through cudarc).
pub const DRIVER_SYMBOLS: &[&str] = &[
    "cuDriverGetVersion",
    "cuInit",
    "cuGetErrorString",
    "cuDeviceGet",
    "cuDeviceGetAttribute",
    "cuDeviceGetCount",
    "cuDeviceGetName",
    "cuDeviceTotalMem_v2",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxDestroy_v2",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuCtxSynchronize",
    "cuEventCreate",
    "cuEventDestroy_v2",
    "cuEventQuery",
    "cuEventRecord",
    "cuEventSynchronize",
    "cuLaunchKernel",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemFreeHost",
    "cuMemGetInfo_v2",
    "cuMemHostAlloc",
    "cuMemcpyDtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyHtoDAsync_v2",
    "cuModuleGetFunction",
    "cuModuleLoad",
    "cuModuleLoadData",
    "cuModuleUnload",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuStreamWaitEvent",
];

/// Every NVRTC entry point the backend calls.
pub const NVRTC_SYMBOLS: &[&str] = &[
    "nvrtcVersion",
    "nvrtcGetSupportedArchs",
    "nvrtcGetNumSupportedArchs",
    "nvrtcCreateProgram",
    "nvrtcCompileProgram",
    "nvrtcDestroyProgram",
    "nvrtcGetProgramLog",
    "nvrtcGetProgramLogSize",
    "nvrtcGetPTX",
    "nvrtcGetPTXSize",
    "nvrtcGetCUBIN",
    "nvrtcGetCUBINSize",
];

/// Every cuBLAS entry point the backend calls.
pub const CUBLAS_SYMBOLS: &[&str] =
    &["cublasGetProperty", "cublasCreate_v2", "cublasDestroy_v2", "cublasGemmEx", "cublasSetStream_v2"];

/// What was found of one library: its version, or why there is none to use.
pub type Found<T> = std::result::Result<T, String>;

/// The driver's CUDA version, or why the driver cannot be used.
pub fn driver() -> Found<Version> {
    // SAFETY: only tries to open the library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("the CUDA driver library (libcuda.so) is not installed".into());
    }
    // SAFETY: the library is present (checked above), so `culib` opens it.
    let lib = unsafe { cudarc::driver::sys::culib() };
    let missing = |s: &str| unsafe { lib.get::<*const ()>(s.as_bytes()) }.is_err();
    if let Some(s) = DRIVER_SYMBOLS.iter().find(|s| missing(s)) {
        let version = read_driver_version(lib).map(|v| format!(" (CUDA {v})")).unwrap_or_default();
        return Err(format!(
            "the CUDA driver{version} has no {s}: a CUDA {MIN_DRIVER} or newer driver is needed"
        ));
    }
    let v = read_driver_version(lib).ok_or("the CUDA driver failed to report its version")?;
    if v < MIN_DRIVER {
        return Err(format!(
            "the CUDA driver is {v} (cuDriverGetVersion); zeroshard needs CUDA {MIN_DRIVER} or newer (NVIDIA driver R525+)"
        ));
    }
    Ok(v)
}

fn read_driver_version(lib: &libloading::Library) -> Option<Version> {
    // SAFETY: `cuDriverGetVersion(int*)` has this signature in every driver; it
    // only writes the int.
    let f = unsafe { lib.get::<unsafe extern "C" fn(*mut c_int) -> c_int>(b"cuDriverGetVersion") }.ok()?;
    let mut v = 0;
    // SAFETY: as above.
    (unsafe { f(&mut v) } == 0).then(|| Version::from_driver(v))
}

/// NVRTC's version, or why it cannot be used with a driver of `driver`.
pub fn nvrtc(driver: Option<Version>) -> Found<Version> {
    // SAFETY: only tries to open the library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(
            "NVRTC (libnvrtc.so.12 or .13) is not on the library path: add its folder to LD_LIBRARY_PATH"
                .into(),
        );
    }
    // SAFETY: present (checked above).
    let lib = unsafe { cudarc::nvrtc::sys::culib() };
    let v = library_version("NVRTC", lib, NVRTC_SYMBOLS, |lib| {
        // SAFETY: `nvrtcVersion(int*, int*)` in every NVRTC; writes the two ints.
        let f = unsafe { lib.get::<unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int>(b"nvrtcVersion") }
            .ok()?;
        let (mut major, mut minor) = (0, 0);
        // SAFETY: as above.
        (unsafe { f(&mut major, &mut minor) } == 0)
            .then(|| Version { major: major.max(0) as u32, minor: minor.max(0) as u32 })
    })?;
    within_driver("NVRTC", v, driver, "nvidia-cuda-nvrtc-cu12")?;
    Ok(v)
}

/// cuBLAS's version (`major.minor`, and the patch level), or why it cannot be used
/// with a driver of `driver`.
pub fn cublas(driver: Option<Version>) -> Found<(Version, u32)> {
    // SAFETY: only tries to open the library.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(
            "cuBLAS (libcublas.so.12 or .13) is not on the library path: add its folder to LD_LIBRARY_PATH"
                .into(),
        );
    }
    // SAFETY: present (checked above).
    let lib = unsafe { cudarc::cublas::sys::culib() };
    let mut patch = 0;
    let v = library_version("cuBLAS", lib, CUBLAS_SYMBOLS, |lib| {
        // SAFETY: `cublasGetProperty(libraryPropertyType, int*)` in every cuBLAS
        // (0: major, 1: minor, 2: patch level); writes the int.
        let f = unsafe { lib.get::<unsafe extern "C" fn(c_uint, *mut c_int) -> c_int>(b"cublasGetProperty") }
            .ok()?;
        let get = |which| {
            let mut v = 0;
            // SAFETY: as above.
            (unsafe { f(which, &mut v) } == 0).then_some(v.max(0) as u32)
        };
        patch = get(2)?;
        Some(Version { major: get(0)?, minor: get(1)? })
    })?;
    within_driver("cuBLAS", v, driver, "nvidia-cublas-cu12")?;
    Ok((v, patch))
}

/// The version `read` finds in `lib`, once every symbol of `symbols` is there.
fn library_version(
    name: &str,
    lib: &libloading::Library,
    symbols: &[&str],
    read: impl FnOnce(&libloading::Library) -> Option<Version>,
) -> Found<Version> {
    // SAFETY: only looks the names up.
    if let Some(s) = symbols.iter().find(|s| unsafe { lib.get::<*const ()>(s.as_bytes()) }.is_err()) {
        return Err(format!(
            "the {name} library found has no {s}: {name} {MIN_LIBRARY_MAJOR}.x or 13.x is needed"
        ));
    }
    let v = read(lib).ok_or_else(|| format!("{name} failed to report its version"))?;
    if v.major < MIN_LIBRARY_MAJOR {
        return Err(format!("{name} {v} is too old: zeroshard needs {name} {MIN_LIBRARY_MAJOR}.0 or newer"));
    }
    Ok(v)
}

/// A library of major version above the driver's needs a newer driver.
fn within_driver(name: &str, v: Version, driver: Option<Version>, older_wheel: &str) -> Found<()> {
    match driver {
        Some(d) if v.major > d.major => Err(format!(
            "{name} {v} needs a CUDA {}.x driver but the driver is CUDA {d}: put a {name} {}.x first on \
             LD_LIBRARY_PATH (pip: {older_wheel}) or update the driver",
            v.major, d.major
        )),
        _ => Ok(()),
    }
}

/// Everything [`check`] found, for `zeroshard cuda info`.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub driver: Option<String>,
    pub nvrtc: Option<String>,
    pub cublas: Option<String>,
    /// Why CUDA cannot be used (the first problem), or `None`.
    pub problem: Option<String>,
}

/// The driver, NVRTC and cuBLAS, each checked; the first problem is the
/// backend's reason to refuse.
pub fn check() -> (Report, Found<Version>) {
    let driver = driver();
    let d = driver.as_ref().ok().copied();
    let nvrtc = nvrtc(d);
    let cublas = cublas(d);
    let problem = [driver.as_ref().err(), nvrtc.as_ref().err(), cublas.as_ref().err()]
        .into_iter()
        .flatten()
        .next()
        .cloned();
    let report = Report {
        driver: driver.as_ref().ok().map(|v| v.to_string()),
        nvrtc: nvrtc.as_ref().ok().map(|v| v.to_string()),
        cublas: cublas.as_ref().ok().map(|(v, p)| format!("{v}.{p}")),
        problem: problem.clone(),
    };
    let usable = match problem {
        Some(p) => Err(p),
        None => driver,
    };
    (report, usable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_versions_decode() {
        assert_eq!(Version::from_driver(12040).to_string(), "12.4");
        assert_eq!(Version::from_driver(13000).to_string(), "13.0");
        assert_eq!(Version::from_driver(11080).to_string(), "11.8");
        assert!(Version::from_driver(11080) < MIN_DRIVER && Version::from_driver(12000) >= MIN_DRIVER);
    }

    #[test]
    fn a_library_newer_than_the_driver_is_refused_naming_both() {
        let d = Some(Version { major: 12, minor: 4 });
        let v13 = Version { major: 13, minor: 0 };
        let e = within_driver("NVRTC", v13, d, "nvidia-cuda-nvrtc-cu12").expect_err("13 on a 12 driver");
        assert!(
            e.contains("NVRTC 13.0") && e.contains("CUDA 12.4") && e.contains("nvidia-cuda-nvrtc-cu12"),
            "{e}"
        );
        assert!(
            within_driver("NVRTC", Version { major: 12, minor: 9 }, d, "w").is_ok(),
            "minor-version compatibility"
        );
        assert!(within_driver("NVRTC", v13, None, "w").is_ok());
    }
}
