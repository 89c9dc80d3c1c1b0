//! The homeserver configuration a test needs: Synapse's own generated
//! config (server name, signing key, secrets) plus an override file with
//! the loopback listener, SQLite, logging to our file, the appservice
//! registrations, rate limits off and the experimental features an
//! on-demand-key bridge relies on (MSC2409 to-device, MSC3202, MSC3983,
//! MSC3984).
//!
//! The override file is JSON, which is YAML too; Synapse merges `-c` files
//! in order, later top-level keys winning.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

const UNLIMITED: fn() -> Value = || json!({ "per_second": 9999, "burst_count": 9999 });

/// The override configuration for a test homeserver.
pub(crate) fn overrides(
    dir: &Path,
    port: u16,
    registrations: &[PathBuf],
    proxy_key_claims: bool,
    proxy_key_queries: bool,
) -> Value {
    json!({
        "listeners": [{
            "port": port,
            "bind_addresses": ["127.0.0.1"],
            "type": "http",
            "tls": false,
            "x_forwarded": false,
            "resources": [{ "names": ["client"], "compress": false }]
        }],
        "database": { "name": "sqlite3", "args": { "database": dir.join("homeserver.db") } },
        "log_config": dir.join("log.config.yaml"),
        "media_store_path": dir.join("media"),
        "app_service_config_files": registrations,
        "enable_registration": true,
        "enable_registration_without_verification": true,
        "report_stats": false,
        "trusted_key_servers": [],
        "suppress_key_server_warning": true,
        "url_preview_enabled": false,
        "rc_message": UNLIMITED(),
        "rc_registration": UNLIMITED(),
        "rc_login": {
            "address": UNLIMITED(),
            "account": UNLIMITED(),
            "failed_attempts": UNLIMITED()
        },
        "rc_key_requests": UNLIMITED(),
        "rc_joins": { "local": UNLIMITED(), "remote": UNLIMITED() },
        "rc_invites": { "per_room": UNLIMITED(), "per_user": UNLIMITED(), "per_issuer": UNLIMITED() },
        "experimental_features": {
            "msc2409_to_device_messages_enabled": true,
            "msc3202_transaction_extensions": true,
            "msc3983_appservice_otk_claims": proxy_key_claims,
            "msc3984_appservice_key_query": proxy_key_queries
        }
    })
}

/// Python logging to the process's stderr, which the testkit sends to a file.
pub(crate) fn log_config() -> Value {
    json!({
        "version": 1,
        "formatters": { "plain": { "format": "%(asctime)s %(name)s %(levelname)s %(message)s" } },
        "handlers": { "console": { "class": "logging.StreamHandler", "formatter": "plain" } },
        "root": { "level": "INFO", "handlers": ["console"] },
        "disable_existing_loggers": false
    })
}
