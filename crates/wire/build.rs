//! Compiles `proto/ferry/v1/ferry.proto` with protox (pure Rust, no protoc).

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
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
