//! The `ferry` binary starts and explains itself. (Also makes `cargo test`
//! build the binary the end-to-end tests run.)

use std::process::Command;

#[test]
fn help_lists_every_command_and_bad_input_fails_cleanly() {
    let bin = env!("CARGO_BIN_EXE_ferry");
    let out = Command::new(bin).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "site",
        "image",
        "content",
        "dp",
        "group",
        "distribute",
        "undistribute",
        "status",
    ] {
        assert!(help.contains(cmd), "help lacks {cmd}: {help}");
    }
    let out = Command::new(bin)
        .args([
            "dp",
            "serve",
            "--max-rate",
            "fast",
            "--data",
            "/nonexistent",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a rate"));
    let out = Command::new(bin)
        .args(["dp", "serve", "--data", "/nonexistent/ferry-dp"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("dp.toml") && err.contains("ferry dp init"),
        "{err}"
    );
}
