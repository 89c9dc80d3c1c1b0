# bridgekeys tasks. `just` is optional: each recipe is one plain command,
# and README.md lists the same commands without it.

# The demo: a local Synapse, the echo bridge, a key claim and an echo.
run:
    cargo run --release -p echo-bridge --features demo -- demo

# The key path alone, without a homeserver.
quickstart:
    cargo run -p quickstart

# The key-claim service mounted alone in an existing axum app (checks itself, exits).
claim-only:
    cargo run -p claim-only

# The test command CI runs.
test:
    cargo test --workspace --all-features

# Format, lint and test, as .ci/run does.
ci:
    bash .ci/run

# Benchmark: raw crypto against durable claims (writes bench-results/manager.json).
bench-manager:
    mkdir -p bench-results && cargo run --release -p bridgekeys-bench -- manager --json bench-results/manager.json

# The long crash torture (100 SIGKILL cycles).
crash:
    cargo run --release -p bridgekeys-bench -- crash --cycles 100
