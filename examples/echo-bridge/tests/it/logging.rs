//! `echo-bridge run` logs without colour codes when its output is not a
//! terminal (a file, a pipe, the journal), and one JSON object per line with
//! `[logging] format = "json"` (issue 14, item 5).
#![allow(clippy::unwrap_used)]

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use echo_bridge::{InitOptions, init};

/// Run the bridge of a fresh `init` (its homeserver unreachable: nothing
/// here needs one) with `extra` appended to its config, until it logs that
/// it serves; its stdout so far.
fn logs_until_serving(extra: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let done = init(&InitOptions {
        dir: dir.path().join("bridge"),
        homeserver_url: "http://127.0.0.1:9".into(),
        server_name: "example.org".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        database: None,
    })
    .unwrap();
    let mut text = std::fs::read_to_string(&done.config).unwrap();
    text.push_str(extra);
    std::fs::write(&done.config, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_echo-bridge"))
        .arg("run")
        .arg("--config")
        .arg(&done.config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut out = String::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("no serving line ({e}); logs so far:\n{out}"));
        out.push_str(&line);
        out.push('\n');
        if line.contains("serving the appservice API") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    out
}

#[test]
fn text_logs_to_a_pipe_carry_no_colour_codes() {
    let out = logs_until_serving("");
    assert!(out.contains("INFO"), "{out}");
    assert!(!out.contains('\u{1b}'), "an escape code in:\n{out}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let out = logs_until_serving("\n[logging]\nformat = \"json\"\n");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let serving = lines.last().unwrap();
    assert_eq!(serving["level"], "INFO");
    assert!(
        serving["fields"]["message"]
            .as_str()
            .unwrap()
            .contains("serving the appservice API")
    );
    assert!(!out.contains('\u{1b}'));
}
