//! The claim-only example runs as its docs say: it mounts the claim
//! service, checks itself as the homeserver would call it, and exits.

#[test]
fn claim_only_serves_a_signed_key_refuses_a_wrong_token_and_exits_cleanly() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_claim-only"))
        .output()
        .expect("the claim-only binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "claim-only failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for step in [
        "1. the bridge's own app serves /health",
        "2. the claim service is mounted on /_matrix/app/v1/keys/claim",
        "3. claimed signed_curve25519:",
        "signature verified",
        "a wrong token is refused: 403 Forbidden \"M_FORBIDDEN\"",
        "(the bridge's own framework handled transaction t1)",
        "4. stopped cleanly",
        "bridgekeys_appservice_claims_total 1",
        "bridgekeys_appservice_keys_issued_total 1",
    ] {
        assert!(
            stdout.contains(step),
            "step {step:?} missing from:\n{stdout}"
        );
    }
}

/// `--serve ADDR` keeps serving until SIGTERM, then stops gracefully.
#[cfg(unix)]
#[test]
fn with_serve_it_answers_claims_until_sigterm() {
    use std::io::{BufRead, BufReader};

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_claim-only"))
        .args(["--serve", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the claim-only binary runs");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut next = || lines.next().expect("a line").expect("the line is readable");
    let first = next();
    let addr = first
        .rsplit("http://")
        .next()
        .expect("the address")
        .to_owned();
    let _mounted = next();
    let token_line = next();
    let token = token_line
        .trim()
        .strip_prefix("hs_token: ")
        .expect("the token is printed")
        .to_owned();

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (status, body) = runtime.block_on(async {
        let answer = reqwest::Client::new()
            .post(format!("http://{addr}/_matrix/app/v1/keys/claim"))
            .bearer_auth(&token)
            .body(r#"{"@claim_bob:example.org": {"BRIDGEKEYS": ["signed_curve25519"]}}"#)
            .send()
            .await
            .expect("the server answers");
        (answer.status(), answer.text().await.expect("a body"))
    });
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        body["@claim_bob:example.org"]["BRIDGEKEYS"]
            .as_object()
            .map(serde_json::Map::len),
        Some(1),
        "{body}"
    );

    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let exit = child.wait().expect("the server exits");
    assert!(exit.success(), "{exit:?}");
    assert_eq!(next(), "4. stopped");
}
