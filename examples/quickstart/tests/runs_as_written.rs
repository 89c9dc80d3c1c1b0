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

#[test]
fn the_second_page_exchanges_olm_both_ways_and_refuses_the_misaddressed_message() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_olm-exchange"))
        .output()
        .expect("the olm-exchange binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "olm-exchange failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for step in [
        "1. tracking @alice:example.org: 2 devices verified, 0 refused",
        "2. puppet decrypted a pre-key message from @alice:example.org (PHONE): \"hi bob\", sender device verified: true",
        "3. the phone decrypted the puppet's answer (type 1): \"hello alice\"",
        "4. puppet decrypted a normal message on the stored session: \"how are you?\"",
        "5. misaddressed message refused",
        "6. the laptop opened the puppet's new session: \"hello laptop\"",
    ] {
        assert!(
            stdout.contains(step),
            "step {step:?} missing from:\n{stdout}"
        );
    }
}
