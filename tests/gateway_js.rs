//! The JS client (`gateway/js/syncline.js`) against the real binaries: runs its `node:test`
//! suite (`gateway/js/test/`), which starts brokers and gateways itself (ready after the
//! snapshot, live changes, compare-and-set conflicts, resume across a gateway killed with
//! SIGKILL, the offline queue with each conflict strategy, reset, plain topics).
//!
//! Needs `node` (20 or newer; `.ci/run` installs it). Without it the test fails under CI and
//! is skipped, loudly, elsewhere.

mod common;

use std::path::Path;
use std::process::Command;

#[test]
fn the_js_client_suite_passes_against_the_real_binaries() {
    let node = Command::new("node").arg("--version").output();
    if !matches!(&node, Ok(output) if output.status.success()) {
        assert!(
            std::env::var_os("CI").is_none(),
            "node is required under CI"
        );
        eprintln!("SKIPPED: node is not installed; .ci/run installs it");
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway/js");
    let output = Command::new("node")
        .args(["--experimental-websocket", "--test", "test/"])
        .current_dir(&dir)
        .env("SYNCLINE_BROKER_BIN", common::binary("syncline-broker"))
        .env("SYNCLINE_GATEWAY_BIN", common::binary("syncline-gateway"))
        .env("SYNCLINE_CLI_BIN", common::binary("syncline"))
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the JS client's tests failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("# fail 0"), "{stdout}");
    eprintln!("{stdout}");
}
