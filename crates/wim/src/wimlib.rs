//! A safe wrapper over the parts of wimlib Ferry uses.
//!
//! Every `unsafe` block in Ferry is in this module. The invariants are
//! simple: a [`Wim`] owns one non-null `WIMStruct` from `wimlib_open_wim` or
//! `wimlib_create_new_wim` and frees it exactly once on drop; strings passed
//! in are NUL-terminated `CString`s that outlive the call; strings returned
//! by wimlib are copied before the `WIMStruct` can change.

use std::ffi::{CStr, CString};
use std::os::raw::c_int;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr::{self, NonNull};
use std::sync::Once;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use wimlib_sys as sys;

/// A wimlib call failed.
#[derive(Debug, Error)]
#[error("{op} {path}: {message} (wimlib error {code})")]
pub struct WimError {
    /// What Ferry was doing (`open`, `export image 2 of`, …).
    pub op: String,
    /// The file concerned.
    pub path: String,
    /// wimlib's error code.
    pub code: i32,
    /// wimlib's description of the code.
    pub message: String,
}

/// Facts about a whole WIM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WimInfo {
    /// Number of images.
    pub image_count: u32,
    /// 1-based bootable image, 0 for none.
    pub boot_index: u32,
    /// Compression name (`None`, `XPRESS`, `LZX`, `LZMS`).
    pub compression: String,
    /// Uncompressed bytes per compressed chunk.
    pub chunk_size: u32,
    /// The GUID, as hex.
    pub guid: String,
}

/// Properties of one image in a WIM, read from its XML data.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// 1-based image index.
    pub index: u32,
    /// `NAME`.
    pub name: String,
    /// `DESCRIPTION`.
    pub description: String,
    /// Architecture from `WINDOWS/ARCH` (`x86`, `x64`, `arm64`, …), empty if unknown.
    pub architecture: String,
    /// Languages from `WINDOWS/LANGUAGES/LANGUAGE`.
    pub languages: Vec<String>,
    /// `major.minor.build.spbuild` from `WINDOWS/VERSION`, empty if unknown.
    pub build: String,
    /// `WINDOWS/EDITIONID`, or `FLAGS` when there is no edition id.
    pub edition: String,
    /// `FILECOUNT`.
    pub file_count: u64,
    /// `DIRCOUNT`.
    pub dir_count: u64,
    /// `TOTALBYTES`: the image's files, uncompressed.
    pub total_bytes: u64,
}

/// An open WIM.
#[derive(Debug)]
pub struct Wim {
    raw: NonNull<sys::WIMStruct>,
    path: PathBuf,
}

// SAFETY: a WIMStruct is not tied to the thread that opened it; wimlib only
// forbids using one WIMStruct from two threads at once, which `&mut self` on
// every mutating method and the absence of `Sync` prevent.
unsafe impl Send for Wim {}

fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // SAFETY: called once, before any other wimlib function.
        unsafe {
            sys::wimlib_global_init(sys::WIMLIB_INIT_FLAG_ASSUME_UTF8 as c_int);
            sys::wimlib_set_print_errors(false);
        }
    });
}

fn cstring_path(path: &Path) -> Result<CString, WimError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| WimError {
        op: "open".into(),
        path: path.display().to_string(),
        code: -1,
        message: "path contains a NUL byte".into(),
    })
}

fn error_message(code: c_int) -> String {
    // SAFETY: wimlib_get_error_string returns a static string or NULL.
    let p = unsafe { sys::wimlib_get_error_string(code as sys::wimlib_error_code) };
    if p.is_null() {
        return "unknown error".into();
    }
    // SAFETY: non-null, NUL-terminated static string.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn check(code: c_int, op: impl Into<String>, path: &Path) -> Result<(), WimError> {
    if code == 0 {
        Ok(())
    } else {
        Err(WimError {
            op: op.into(),
            path: path.display().to_string(),
            code,
            message: error_message(code),
        })
    }
}

/// Compression names as wimlib's command-line tools spell them.
fn compression_name(ctype: i32) -> &'static str {
    match ctype {
        0 => "None",
        1 => "XPRESS",
        2 => "LZX",
        3 => "LZMS",
        _ => "unknown",
    }
}

/// Names for `WINDOWS/ARCH` values (PROCESSOR_ARCHITECTURE_*).
pub fn arch_name(code: &str) -> String {
    match code {
        "0" => "x86".into(),
        "5" => "arm".into(),
        "6" => "ia64".into(),
        "9" => "x64".into(),
        "12" => "arm64".into(),
        "" => String::new(),
        other => format!("arch {other}"),
    }
}

impl Wim {
    /// Opens a WIM read-only. wimlib checks the header, blob table and XML.
    pub fn open(path: &Path) -> Result<Self, WimError> {
        init();
        let c = cstring_path(path)?;
        let mut raw = ptr::null_mut();
        // SAFETY: `c` is a valid C string; `raw` receives an owned WIMStruct.
        let code = unsafe {
            sys::wimlib_open_wim(
                c.as_ptr(),
                sys::WIMLIB_OPEN_FLAG_ERROR_IF_SPLIT as c_int,
                &mut raw,
            )
        };
        check(code, "open", path)?;
        let raw = NonNull::new(raw).ok_or_else(|| WimError {
            op: "open".into(),
            path: path.display().to_string(),
            code: -1,
            message: "wimlib returned no WIM".into(),
        })?;
        Ok(Self {
            raw,
            path: path.to_path_buf(),
        })
    }

    /// The file this WIM was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn raw_info(&self) -> sys::wimlib_wim_info {
        // SAFETY: wimlib_wim_info is plain data; zeroed is a valid value.
        let mut info: sys::wimlib_wim_info = unsafe { std::mem::zeroed() };
        // SAFETY: self.raw is a live WIMStruct; info is a valid out pointer.
        // wimlib_get_wim_info cannot fail for an open WIM.
        unsafe { sys::wimlib_get_wim_info(self.raw.as_ptr(), &mut info) };
        info
    }

    /// Facts about the whole WIM.
    pub fn info(&self) -> WimInfo {
        let i = self.raw_info();
        WimInfo {
            image_count: i.image_count,
            boot_index: i.boot_index,
            compression: compression_name(i.compression_type).into(),
            chunk_size: i.chunk_size,
            guid: i.guid.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }

    /// One image property (`NAME`, `WINDOWS/ARCH`, …), if set.
    pub fn property(&self, image: u32, name: &str) -> Option<String> {
        let c = CString::new(name).ok()?;
        // SAFETY: live WIMStruct, valid C string; the result is NULL or a
        // string owned by the WIMStruct that we copy at once.
        let p = unsafe {
            sys::wimlib_get_image_property(self.raw.as_ptr(), image as c_int, c.as_ptr())
        };
        if p.is_null() {
            return None;
        }
        // SAFETY: non-null, NUL-terminated, valid until the WIM changes.
        Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }

    /// Every image's properties, in index order.
    pub fn images(&self) -> Vec<ImageInfo> {
        (1..=self.raw_info().image_count)
            .map(|i| self.image(i))
            .collect()
    }

    /// One image's properties (1-based index; must be in range).
    pub fn image(&self, index: u32) -> ImageInfo {
        let p = |n: &str| self.property(index, n).unwrap_or_default();
        let num = |n: &str| p(n).trim().parse::<u64>().unwrap_or(0);
        let mut languages = Vec::new();
        if let Some(first) = self.property(index, "WINDOWS/LANGUAGES/LANGUAGE") {
            languages.push(first);
            for n in 2.. {
                match self.property(index, &format!("WINDOWS/LANGUAGES/LANGUAGE[{n}]")) {
                    Some(l) => languages.push(l),
                    None => break,
                }
            }
        }
        let build = match self.property(index, "WINDOWS/VERSION/BUILD") {
            Some(b) => format!(
                "{}.{}.{}.{}",
                p("WINDOWS/VERSION/MAJOR"),
                p("WINDOWS/VERSION/MINOR"),
                b,
                self.property(index, "WINDOWS/VERSION/SPBUILD")
                    .unwrap_or_else(|| "0".into())
            ),
            None => String::new(),
        };
        let edition = self
            .property(index, "WINDOWS/EDITIONID")
            .or_else(|| self.property(index, "FLAGS"))
            .unwrap_or_default();
        ImageInfo {
            index,
            name: p("NAME"),
            description: p("DESCRIPTION"),
            architecture: arch_name(&p("WINDOWS/ARCH")),
            languages,
            build,
            edition,
            file_count: num("FILECOUNT"),
            dir_count: num("DIRCOUNT"),
            total_bytes: num("TOTALBYTES"),
        }
    }

    /// Re-reads every blob and checks its SHA-1 (wimlib's `wimverify`).
    pub fn verify(&mut self) -> Result<(), WimError> {
        // SAFETY: live WIMStruct, no flags.
        let code = unsafe { sys::wimlib_verify_wim(self.raw.as_ptr(), 0) };
        check(code, "verify", &self.path)
    }

    /// Writes image `index` (1-based) alone into a new WIM at `dest`, with the
    /// same compression and chunk size, so its resources are copied as they
    /// are rather than recompressed. The source file is only read.
    pub fn export_image(&mut self, index: u32, dest: &Path) -> Result<(), WimError> {
        let info = self.raw_info();
        let op = format!("export image {index} of");
        if index == 0 || index > info.image_count {
            return Err(WimError {
                op,
                path: self.path.display().to_string(),
                code: -1,
                message: format!(
                    "the WIM has {} image(s); there is no index {index}",
                    info.image_count
                ),
            });
        }
        let mut out = ptr::null_mut();
        // SAFETY: out receives an owned WIMStruct.
        let code = unsafe {
            sys::wimlib_create_new_wim(
                info.compression_type as sys::wimlib_compression_type,
                &mut out,
            )
        };
        check(code, op.clone(), &self.path)?;
        let out = NonNull::new(out).ok_or_else(|| WimError {
            op: op.clone(),
            path: self.path.display().to_string(),
            code: -1,
            message: "wimlib created no WIM".into(),
        })?;
        let dest_wim = Wim {
            raw: out,
            path: dest.to_path_buf(),
        };
        // SAFETY: both WIMStructs are live; NULL name/description keep the
        // source image's; the exported image keeps referring to self, which
        // outlives dest_wim (dropped at the end of this function).
        let code = unsafe {
            sys::wimlib_set_output_chunk_size(dest_wim.raw.as_ptr(), info.chunk_size);
            sys::wimlib_export_image(
                self.raw.as_ptr(),
                index as c_int,
                dest_wim.raw.as_ptr(),
                ptr::null(),
                ptr::null(),
                0,
            )
        };
        check(code, op.clone(), &self.path)?;
        let c = cstring_path(dest)?;
        // SAFETY: live WIMStruct, valid path, all images, default threads.
        let code = unsafe {
            sys::wimlib_write(
                dest_wim.raw.as_ptr(),
                c.as_ptr(),
                sys::WIMLIB_ALL_IMAGES,
                sys::WIMLIB_WRITE_FLAG_FSYNC as c_int,
                0,
            )
        };
        check(code, "write", dest)
    }
}

impl Drop for Wim {
    fn drop(&mut self) {
        // SAFETY: self.raw came from wimlib and is freed exactly once here.
        unsafe { sys::wimlib_free(self.raw.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("random.wim");
        std::fs::write(&p, vec![0x42u8; 4096]).unwrap();
        let e = Wim::open(&p).unwrap_err();
        assert!(e.to_string().contains("random.wim"), "{e}");
        assert_ne!(e.code, 0);
        let e = Wim::open(&dir.path().join("missing.wim")).unwrap_err();
        assert!(e.to_string().contains("missing.wim"), "{e}");
    }

    #[test]
    fn arch_names() {
        assert_eq!(arch_name("9"), "x64");
        assert_eq!(arch_name("12"), "arm64");
        assert_eq!(arch_name(""), "");
    }
}
