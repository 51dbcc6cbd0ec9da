//! The confab-bench binary as a user runs it. Besides what it checks, this test is why
//! `cargo test --workspace` builds the binary itself (Cargo builds a package's binaries for
//! its integration tests), which the server's tests/it/bench.rs runs against the server.

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_confab-bench"))
        .args(args)
        .output()
        .expect("run confab-bench")
}

#[test]
fn a_target_off_loopback_is_refused_before_any_connection() {
    // 192.0.2.0/24 is TEST-NET-1: nothing answers there, so a tool that tried to connect would
    // time out (--connect-timeout) rather than fail at once with this message.
    let out = run(&[
        "--url",
        "ws://192.0.2.1:80",
        "--max-secs",
        "5",
        "idle",
        "--connections",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit status: {:?}", out.status);
    assert!(
        stderr.contains("--url ws://192.0.2.1:80: only loopback targets"),
        "{stderr}"
    );
}

#[test]
fn a_source_address_off_loopback_is_refused() {
    let out = run(&[
        "--url",
        "ws://127.0.0.1:9",
        "--source",
        "192.0.2.1",
        "idle",
        "--connections",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit status: {:?}", out.status);
    assert!(
        stderr.contains("--source 192.0.2.1: only loopback addresses"),
        "{stderr}"
    );
}
