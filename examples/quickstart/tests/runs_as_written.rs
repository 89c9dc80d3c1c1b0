//! The quickstart runs as the README says and shows every step of the key path.

#[test]
fn quickstart_runs_to_completion_and_refuses_the_reused_key() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_quickstart"))
        .output()
        .expect("the quickstart binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "quickstart failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for step in [
        "1. store opened",
        "2. device_keys",
        "3. keys/claim answer",
        "4. pre-key message decrypted",
        "5. second use of",
    ] {
        assert!(
            stdout.contains(step),
            "step {step:?} missing from:\n{stdout}"
        );
    }
    assert!(stdout.contains("refused"), "{stdout}");
}
