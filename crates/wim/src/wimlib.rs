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
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
            // Paths in an image are Windows paths: looked up ignoring case.
            sys::wimlib_global_init(
                (sys::WIMLIB_INIT_FLAG_ASSUME_UTF8 | sys::WIMLIB_INIT_FLAG_DEFAULT_CASE_INSENSITIVE)
                    as c_int,
            );
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

/// One change to an image, as wimlib's update commands express it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpdateCmd {
    /// Adds the file at `source` (on the local file system) at `target`
    /// inside the image, replacing a file already there and creating missing
    /// parent folders.
    Add {
        /// The file to add.
        source: PathBuf,
        /// Its path inside the image (`/`-separated).
        target: String,
    },
    /// Deletes `path` (a file, or a folder with everything below it) from
    /// the image; an error if it does not exist.
    Delete {
        /// The path inside the image.
        path: String,
    },
}

impl UpdateCmd {
    fn describe(&self) -> String {
        match self {
            UpdateCmd::Add { target, .. } => format!("add /{}", target.trim_start_matches('/')),
            UpdateCmd::Delete { path } => format!("delete /{}", path.trim_start_matches('/')),
        }
    }
}

impl Wim {
    /// Opens a WIM read-only. wimlib checks the header, blob table and XML.
    pub fn open(path: &Path) -> Result<Self, WimError> {
        Self::open_with(path, 0)
    }

    /// Opens a WIM for [`Wim::update_image`] and [`Wim::overwrite`]: only
    /// ever on a file Ferry made for itself.
    pub fn open_for_update(path: &Path) -> Result<Self, WimError> {
        Self::open_with(path, sys::WIMLIB_OPEN_FLAG_WRITE_ACCESS as c_int)
    }

    fn open_with(path: &Path, flags: c_int) -> Result<Self, WimError> {
        init();
        check_magic(path)?;
        let c = cstring_path(path)?;
        let mut raw = ptr::null_mut();
        // SAFETY: `c` is a valid C string; `raw` receives an owned WIMStruct.
        let code = unsafe {
            sys::wimlib_open_wim(
                c.as_ptr(),
                sys::WIMLIB_OPEN_FLAG_ERROR_IF_SPLIT as c_int | flags,
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

    /// Applies `cmds` to image `index` (1-based) in memory, all or nothing:
    /// wimlib rolls every command back when one fails. The change reaches
    /// the file at the next [`Wim::overwrite`].
    pub fn update_image(&mut self, index: u32, cmds: &[UpdateCmd]) -> Result<(), WimError> {
        let op = format!("update image {index} of");
        let mut strings = Vec::with_capacity(cmds.len() * 2);
        let text = |s: &str, what: &str| {
            CString::new(s).map_err(|_| WimError {
                op: op.clone(),
                path: self.path.display().to_string(),
                code: -1,
                message: format!("{what} contains a NUL byte"),
            })
        };
        // wimlib takes mutable C strings; they live in `strings` until the
        // call returns.
        let mut raw_cmds = Vec::with_capacity(cmds.len());
        for cmd in cmds {
            // SAFETY: an all-zero update command is valid (op ADD, null
            // pointers, zero flags); the fields are set below.
            let mut c: sys::wimlib_update_command = unsafe { std::mem::zeroed() };
            match cmd {
                UpdateCmd::Add { source, target } => {
                    let mut src = cstring_path(source)?.into_bytes_with_nul();
                    let mut dst = text(&format!("/{}", target.trim_start_matches('/')), "a path")?
                        .into_bytes_with_nul();
                    c.op = sys::wimlib_update_op_WIMLIB_UPDATE_OP_ADD;
                    c.__bindgen_anon_1.add = sys::wimlib_add_command {
                        fs_source_path: src.as_mut_ptr().cast(),
                        wim_target_path: dst.as_mut_ptr().cast(),
                        config_file: ptr::null_mut(),
                        add_flags: 0,
                    };
                    strings.push(src);
                    strings.push(dst);
                }
                UpdateCmd::Delete { path } => {
                    let mut p = text(&format!("/{}", path.trim_start_matches('/')), "a path")?
                        .into_bytes_with_nul();
                    c.op = sys::wimlib_update_op_WIMLIB_UPDATE_OP_DELETE;
                    c.__bindgen_anon_1.delete_ = sys::wimlib_delete_command {
                        wim_path: p.as_mut_ptr().cast(),
                        delete_flags: sys::WIMLIB_DELETE_FLAG_RECURSIVE as c_int,
                    };
                    strings.push(p);
                }
            }
            raw_cmds.push(c);
        }
        // SAFETY: live WIMStruct opened with write access; `raw_cmds` points
        // into `strings`, which outlives the call (Vec<u8> buffers do not
        // move when the outer Vec grows).
        let code = unsafe {
            sys::wimlib_update_image(
                self.raw.as_ptr(),
                index as c_int,
                raw_cmds.as_ptr(),
                raw_cmds.len(),
                0,
            )
        };
        drop(strings);
        if code != 0 {
            // wimlib does not say which path was missing; find out, so the
            // operator reads the path rather than a bare error code.
            let mut message = error_message(code);
            if code == sys::wimlib_error_code_WIMLIB_ERR_PATH_DOES_NOT_EXIST as c_int {
                let missing: Vec<String> = cmds
                    .iter()
                    .filter_map(|c| match c {
                        UpdateCmd::Delete { path } if !self.exists(index, path) => {
                            Some(c.describe())
                        }
                        _ => None,
                    })
                    .collect();
                if !missing.is_empty() {
                    message = format!("{message}: {}", missing.join(", "));
                }
            }
            return Err(WimError {
                op,
                path: self.path.display().to_string(),
                code,
                message,
            });
        }
        Ok(())
    }

    /// Whether `path` exists in image `index`.
    pub fn exists(&mut self, index: u32, path: &str) -> bool {
        let Ok(c) = CString::new(format!("/{}", path.trim_start_matches('/'))) else {
            return false;
        };
        // SAFETY: live WIMStruct, valid C string; with no flags wimlib calls
        // the callback for the path itself only, and the callback touches
        // nothing.
        let code = unsafe {
            sys::wimlib_iterate_dir_tree(
                self.raw.as_ptr(),
                index as c_int,
                c.as_ptr(),
                0,
                Some(ignore_dentry),
                ptr::null_mut(),
            )
        };
        code == 0
    }

    /// Commits changes to the file this WIM was opened from. Plain, it
    /// appends the new data and a new blob table, leaving the old resources
    /// in place (cheap, and unchanged resources keep their offsets); with
    /// `rebuild` it rewrites the file so data no image refers to any more is
    /// dropped. Not synced (as `wimupdate` does not): Ferry services a work
    /// copy, whose result is imported, and the import is what is durable.
    pub fn overwrite(&mut self, rebuild: bool) -> Result<(), WimError> {
        let flags = if rebuild {
            sys::WIMLIB_WRITE_FLAG_REBUILD
        } else {
            0
        };
        // SAFETY: live WIMStruct opened with write access; default threads.
        let code = unsafe { sys::wimlib_overwrite(self.raw.as_ptr(), flags as c_int, 0) };
        check(code, if rebuild { "rebuild" } else { "write" }, &self.path)
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

unsafe extern "C" fn ignore_dentry(
    _dentry: *const sys::wimlib_dir_entry,
    _ctx: *mut std::os::raw::c_void,
) -> c_int {
    0
}

impl Drop for Wim {
    fn drop(&mut self) {
        // SAFETY: self.raw came from wimlib and is freed exactly once here.
        unsafe { sys::wimlib_free(self.raw.as_ptr()) };
    }
}

/// The first bytes of a WIM (`MSWIM`) and of a pipable WIM (`WLPWM`).
const MAGICS: [&[u8; 8]; 2] = [b"MSWIM\0\0\0", b"WLPWM\0\0\0"];

/// Refuses a file that does not begin like a WIM, in those words: wimlib
/// says "unexpectedly reached the end of the file" for a short text file.
/// A file that cannot be read is left for wimlib to name.
fn check_magic(path: &Path) -> Result<(), WimError> {
    use std::io::Read;
    let Ok(f) = std::fs::File::open(path) else {
        return Ok(());
    };
    let mut head = Vec::with_capacity(8);
    if f.take(8).read_to_end(&mut head).is_err() {
        return Ok(());
    }
    if MAGICS.iter().any(|m| head == m[..]) {
        return Ok(());
    }
    Err(WimError {
        op: "open".into(),
        path: path.display().to_string(),
        code: sys::wimlib_error_code_WIMLIB_ERR_NOT_A_WIM_FILE as i32,
        message: "not a WIM file: it does not begin with the WIM signature \"MSWIM\"".into(),
    })
}

/// A compression format of WIM resources, for [`Decompressor`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// XPRESS (`--compress=fast`).
    Xpress,
    /// LZX (`--compress=maximum`, the default of DISM and wimlib).
    Lzx,
    /// LZMS (`--compress=recovery`).
    Lzms,
}

/// wimlib's decompressor for one format and chunk size: what reading a
/// compressed resource chunk by chunk needs, without a `WIMStruct`.
pub struct Decompressor {
    raw: NonNull<sys::wimlib_decompressor>,
    max_block: usize,
}

// SAFETY: a decompressor has no thread affinity; `&mut self` serialises use.
unsafe impl Send for Decompressor {}

impl Decompressor {
    /// A decompressor for chunks of up to `max_block` uncompressed bytes.
    pub fn new(kind: Compression, max_block: usize) -> Result<Self, WimError> {
        init();
        let ctype = match kind {
            Compression::Xpress => sys::wimlib_compression_type_WIMLIB_COMPRESSION_TYPE_XPRESS,
            Compression::Lzx => sys::wimlib_compression_type_WIMLIB_COMPRESSION_TYPE_LZX,
            Compression::Lzms => sys::wimlib_compression_type_WIMLIB_COMPRESSION_TYPE_LZMS,
        };
        let mut raw = ptr::null_mut();
        // SAFETY: valid out-pointer; wimlib validates type and size.
        let code = unsafe { sys::wimlib_create_decompressor(ctype, max_block, &mut raw) };
        let err = |code: c_int| WimError {
            op: format!("create a {kind:?} decompressor for {max_block}-byte chunks"),
            path: String::new(),
            code,
            message: error_message(code),
        };
        if code != 0 {
            return Err(err(code));
        }
        let raw = NonNull::new(raw).ok_or_else(|| err(-1))?;
        Ok(Self { raw, max_block })
    }

    /// Decompresses `input` into all of `out` (its length is the chunk's
    /// uncompressed size). False when the data is invalid.
    pub fn decompress(&mut self, input: &[u8], out: &mut [u8]) -> bool {
        if out.len() > self.max_block {
            return false;
        }
        // SAFETY: both buffers are valid for their lengths; the
        // decompressor is live and used by one caller at a time.
        let code = unsafe {
            sys::wimlib_decompress(
                input.as_ptr().cast(),
                input.len(),
                out.as_mut_ptr().cast(),
                out.len(),
                self.raw.as_ptr(),
            )
        };
        code == 0
    }
}

impl Drop for Decompressor {
    fn drop(&mut self) {
        // SAFETY: created by wimlib_create_decompressor, freed once.
        unsafe { sys::wimlib_free_decompressor(self.raw.as_ptr()) }
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
    fn a_text_file_is_not_a_wim_file() {
        let dir = tempfile::tempdir().unwrap();
        for (name, body) in [("notes.txt", &b"hello\n"[..]), ("empty.wim", &b""[..])] {
            let p = dir.path().join(name);
            std::fs::write(&p, body).unwrap();
            let e = Wim::open(&p).unwrap_err();
            assert!(e.message.contains("not a WIM file"), "{e}");
            assert!(e.to_string().contains(name), "{e}");
        }
    }

    #[test]
    fn arch_names() {
        assert_eq!(arch_name("9"), "x64");
        assert_eq!(arch_name("12"), "arm64");
        assert_eq!(arch_name(""), "");
    }
}
