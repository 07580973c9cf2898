//! Compiles `proto/ferry/v1/ferry.proto` with protox (pure Rust, no protoc).

fn main() {
    // Read at run time: a build script compiled in another checkout of the
    // same sources may be reused by cargo, and must not point back there.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let root = std::path::Path::new(&manifest_dir).join("../../proto");
    let file = "ferry/v1/ferry.proto";
    println!("cargo:rerun-if-changed={}", root.join(file).display());
    let fds = match protox::compile([file], [&root]) {
        Ok(fds) => fds,
        Err(e) => panic!("cannot compile {file}: {e:?}"),
    };
    if let Err(e) = prost_build::Config::new().bytes(["."]).compile_fds(fds) {
        panic!("cannot generate Rust for {file}: {e}");
    }
}
