//! The gateway's web console and JS client in a real browser: headless Chromium (Debian's
//! `chromium`) driven by playwright-core from npm (`tests/browser/console.mjs`), against the
//! real broker and gateway binaries. The script opens the console, reads the cluster status
//! and the topics, watches a table live, sees a put made elsewhere appear, edits a value with
//! compare-and-set (and sees a lost race refused), adds a key, searches, produces a record,
//! reads a group's lag, and takes a screenshot that it checks is not blank.
//!
//! Needs `/usr/bin/chromium` (or `CHROMIUM`), `node`, and `npm ci` in `tests/browser`;
//! `.ci/run` installs all three. Without them the test fails under CI and is skipped, loudly,
//! elsewhere.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::gateway::{cli_ok, http, start_gateway};
use common::BrokerProcess;

/// What the browser test needs, or why it cannot run here.
fn browser_tools() -> Result<(PathBuf, PathBuf), String> {
    let chromium = PathBuf::from(std::env::var("CHROMIUM").unwrap_or("/usr/bin/chromium".into()));
    if !chromium.exists() {
        return Err(format!("{} is not installed", chromium.display()));
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    if !dir.join("node_modules/playwright-core").exists() {
        return Err(format!("run `npm ci` in {}", dir.display()));
    }
    match Command::new("node").arg("--version").output() {
        Ok(output) if output.status.success() => Ok((chromium, dir)),
        _ => Err("node is not installed".into()),
    }
}

#[test]
fn the_console_in_headless_chromium_watches_edits_and_produces() {
    let (chromium, dir) = match browser_tools() {
        Ok(tools) => tools,
        Err(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "the browser test is required under CI: {why}"
            );
            eprintln!(
                "SKIPPED: the browser test cannot run here ({why}); .ci/run installs what it needs"
            );
            return;
        }
    };
    let data = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&data.path().join("data"));
    let cli = |args: &[&str]| cli_ok(&broker.addr, args);
    cli(&["topic", "create", "prices", "--cleanup", "compact"]);
    cli(&["topic", "create", "events", "--partitions", "1"]);
    let gateway = start_gateway(&broker.addr, &[]);
    let (status, _, _) = http(
        &gateway.addr,
        "PUT",
        "/v1/tables/prices/apple",
        &[],
        b"1.20",
    );
    assert_eq!(status, 200);
    // A key that is not UTF-8 (bytes ff 00, base64 /wA=): shown as hex, in a row of its own.
    let (status, _, _) = http(
        &gateway.addr,
        "PUT",
        "/v1/tables/prices/%2FwA%3D?encoding=base64",
        &[],
        b"bytes",
    );
    assert_eq!(status, 200);
    // A group with a committed offset, for the lag view.
    let (status, _, _) = http(
        &gateway.addr,
        "POST",
        "/v1/topics/events/records",
        &[("Content-Type", "application/json")],
        br#"[{"key": "a", "value": "1"}, {"key": "b", "value": "2"}]"#,
    );
    assert_eq!(status, 200);
    cli(&[
        "consume",
        "events",
        "--group",
        "audit",
        "--max-records",
        "1",
        "--timeout-ms",
        "20000",
    ]);

    let screenshot = data.path().join("console.png");
    let output = Command::new("node")
        .arg(dir.join("console.mjs"))
        .current_dir(&dir)
        .env("GATEWAY_URL", format!("http://{}", gateway.addr))
        .env("SCREENSHOT", &screenshot)
        .env("CHROMIUM", &chromium)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the browser test failed:\n{stdout}\n{stderr}"
    );
    let png = std::fs::read(&screenshot).expect("the screenshot was written");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    assert!(
        png.len() > 10_000,
        "a {}-byte screenshot is blank",
        png.len()
    );
    eprintln!("{stdout}");
}
