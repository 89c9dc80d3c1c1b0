//! `manager --store postgres` and `http --store postgres` on tiny loads:
//! sled's and PostgreSQL's figures side by side in one run (a throwaway
//! local PostgreSQL from the testkit), the ratio being the two divided,
//! and the multi-process load. A smoke run: no figure is compared with a
//! goal.
#![allow(clippy::unwrap_used)]

use std::process::Command;

fn bench(args: &[&str], dir: &std::path::Path, json: &std::path::Path) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_bridgekeys-bench"))
        .args(args)
        .arg("--dir")
        .arg(dir.join("data"))
        .arg("--json")
        .arg(json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("postgres_to_sled"), "{stdout}");
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

fn positive(v: &serde_json::Value) -> f64 {
    let f = v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"));
    assert!(f > 0.0 && f.is_finite(), "{f}");
    f
}

#[test]
fn manager_store_postgres_reports_both_backends_and_processes() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("manager.json");
    let r = bench(
        &[
            "manager",
            "--store",
            "postgres",
            "--devices",
            "30",
            "--claims",
            "200",
            "--concurrency",
            "6",
            "--raw-seconds",
            "0.05",
            "--processes",
            "3",
        ],
        dir.path(),
        &json,
    );
    // sled's figures where they always were.
    assert_eq!(
        (r["devices"].as_u64(), r["claims"].as_u64()),
        (Some(30), Some(200))
    );
    let sled = positive(&r["manager_claims_per_s"]);
    assert!(positive(&r["manager_p50_ms"]) <= positive(&r["manager_p99_ms"]));
    // PostgreSQL's beside them.
    let pg = &r["postgres"];
    assert_eq!(pg["claims"], 200);
    let pg_per_s = positive(&pg["claims_per_s"]);
    assert!(positive(&pg["p50_ms"]) <= positive(&pg["p99_ms"]));
    let ratio = positive(&pg["postgres_to_sled"]);
    assert!((ratio - pg_per_s / sled).abs() < 1e-9, "{ratio}");
    assert_eq!(pg["goal_postgres_to_sled"], 0.5);
    assert!(pg["server"].as_str().unwrap().contains("same machine"));
    // One process against three, the same total load.
    let x = &pg["processes"];
    assert_eq!(x["one"]["processes"], 1);
    assert_eq!(x["many"]["processes"], 3);
    // Each load ran twice (1, 3, 3, 1): a side merges both runs' claims.
    assert_eq!(x["round_ratios"].as_array().unwrap().len(), 2);
    for run in [&x["one"], &x["many"]] {
        assert_eq!(run["claims"], 400, "{run}");
        assert_eq!(run["claimers"], 6, "{run}");
        positive(&run["claims_per_s"]);
        assert!(positive(&run["p50_ms"]) <= positive(&run["p99_ms"]));
    }
    let to_one = positive(&x["processes_to_one"]);
    let expected =
        x["many"]["claims_per_s"].as_f64().unwrap() / x["one"]["claims_per_s"].as_f64().unwrap();
    assert!((to_one - expected).abs() < 1e-9);
}

#[test]
fn http_store_postgres_reports_both_backends() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("http.json");
    let r = bench(
        &[
            "http",
            "--store",
            "postgres",
            "--devices",
            "30",
            "--claims",
            "200",
            "--connections",
            "4",
            "--raw-seconds",
            "0.05",
        ],
        dir.path(),
        &json,
    );
    let sled = positive(&r["http_claims_per_s"]);
    let pg = &r["postgres"];
    assert_eq!(pg["claims"], 200);
    let pg_per_s = positive(&pg["http_claims_per_s"]);
    assert!(positive(&pg["http_p50_ms"]) <= positive(&pg["http_p99_ms"]));
    let ratio = positive(&pg["postgres_to_sled"]);
    assert!((ratio - pg_per_s / sled).abs() < 1e-9, "{ratio}");
}
