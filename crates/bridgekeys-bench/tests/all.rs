//! `bridgekeys-bench all --quick` runs every scenario (Synapse left out:
//! `tests/scenarios.rs` runs it, and a first install takes minutes) in one
//! process and writes one JSON with every goal and the charts next to it.
//! A smoke run of the binary: a few seconds in a debug build, no figure is
//! compared with anything.
#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn all_quick_writes_one_json_with_every_scenario_and_goal_and_the_charts() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("summary.json");
    let output = Command::new(env!("CARGO_BIN_EXE_bridgekeys-bench"))
        .args(["all", "--quick", "--skip", "synapse", "--crash-cycles", "2"])
        .arg("--dir")
        .arg(dir.path().join("data"))
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["quick"], true);
    assert!(report["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(report["date"].as_str().unwrap().ends_with('Z'));
    assert_eq!(report["skipped"], serde_json::json!(["synapse"]));
    assert_eq!(report["errors"], serde_json::json!({}));
    let scenarios = report["scenarios"].as_object().unwrap();
    let mut ran: Vec<_> = scenarios.keys().map(String::as_str).collect();
    ran.sort_unstable();
    assert_eq!(
        ran,
        [
            "crash", "http", "manager", "postgres", "raw", "scale", "storage"
        ]
    );
    // The HTTP load at each connection count of the goal's chart.
    let connections: Vec<_> = scenarios["http"]["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["connections"].as_u64().unwrap())
        .collect();
    assert_eq!(connections, [1, 4, 16, 64]);
    assert_eq!(scenarios["crash"]["cycles"], 2);
    assert_eq!(
        scenarios["crash"]["keys_verified"],
        scenarios["crash"]["keys_reported"]
    );

    // Every goal has its entry; a quick run is never at the goal's load.
    let goals = report["goals"].as_array().unwrap();
    let names: Vec<_> = goals.iter().map(|g| g["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "http.ratio_to_raw",
            "manager.ratio_to_raw",
            "postgres.manager_ratio_to_sled",
            "postgres.processes_to_one",
            "storage.bytes_per_device",
            "scale.scale_ratio",
            "scale.p99_ms_1m",
            "synapse.serial_appservice_share",
            "crash.keys_verified_share",
        ]
    );
    for g in goals {
        assert!(g["goal"].is_string() && g["met"].is_boolean(), "{g}");
        assert_eq!(g["at_goal_conditions"], false, "{g}");
    }
    let value = |name: &str| goals.iter().find(|g| g["name"] == name).unwrap()["value"].clone();
    assert!(value("http.ratio_to_raw").as_f64().unwrap() > 0.0);
    assert_eq!(value("crash.keys_verified_share"), 1.0);
    // PostgreSQL beside sled, and 3 processes on one database against 1.
    assert!(value("postgres.manager_ratio_to_sled").as_f64().unwrap() > 0.0);
    assert!(value("postgres.processes_to_one").as_f64().unwrap() > 0.0);
    let pg = &scenarios["postgres"]["postgres"];
    assert_eq!(pg["processes"]["many"]["processes"], 3);
    // Each load ran twice (1, 3, 3, 1), merged: the claims of both runs.
    assert_eq!(pg["processes"]["many"]["claims"], 600);
    assert_eq!(pg["processes"]["one"]["claims"], 600);
    assert_eq!(pg["processes"]["round_ratios"].as_array().unwrap().len(), 2);
    assert!(
        value("synapse.serial_appservice_share").is_null(),
        "skipped"
    );

    // The charts, next to the JSON, named after it.
    let charts = report["charts"].as_array().unwrap();
    assert_eq!(charts.len(), 3, "{charts:?}");
    for name in [
        "summary-claims-vs-connections.svg",
        "summary-p99-vs-devices.svg",
        "summary-bytes-per-device.svg",
    ] {
        assert!(charts.iter().any(|c| c == name), "{name} not in {charts:?}");
        let svg = std::fs::read_to_string(dir.path().join(name)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("</svg>"), "{name}");
    }
    // The summary table and the progress lines.
    assert!(stdout.contains("crash.keys_verified_share"), "{stdout}");
    assert!(
        stderr.contains("crash: survived 2/2 cycles (100%"),
        "{stderr}"
    );
    assert!(
        stderr.contains("scale: provisioned 1000/1000 devices (100%"),
        "{stderr}"
    );
}

#[test]
fn all_only_runs_the_scenarios_named_and_still_lists_every_goal() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("raw-only.json");
    let output = Command::new(env!("CARGO_BIN_EXE_bridgekeys-bench"))
        .args(["all", "--quick", "--only", "raw"])
        .arg("--dir")
        .arg(dir.path().join("data"))
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let ran: Vec<_> = report["scenarios"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(ran, ["raw"]);
    assert_eq!(report["goals"].as_array().unwrap().len(), 9);
    assert!(
        report["goals"]
            .as_array()
            .unwrap()
            .iter()
            .all(|g| g["value"].is_null() && g["met"] == false)
    );
    assert_eq!(report["charts"], serde_json::json!([]), "nothing to chart");
}
