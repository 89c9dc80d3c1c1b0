//! echo-bridge on PostgreSQL (a real, throwaway server from the testkit):
//! `migrate --to` copies a sled store whole, and the bridge's store then
//! opens from the configuration it rewrote.

use std::{process::Command, sync::Arc};

use bridgekeys::{
    olm::{AccountManager, ManagerConfig},
    store::{Backend, DeviceKey, PuppetRegistry, SledStore, TransactionLog},
    vodozemac::{
        Curve25519PublicKey,
        olm::{Account, OlmMessage, SessionConfig},
    },
};
use bridgekeys_testkit::Postgres;
use echo_bridge::{Config, InitOptions, init, storage};
use ruma::{OneTimeKeyAlgorithm, OwnedDeviceId, OwnedUserId, UserId};

const PEER: &str = "@peer:example.org";

fn options(dir: &std::path::Path, database: Option<String>) -> InitOptions {
    InitOptions {
        dir: dir.to_owned(),
        homeserver_url: "http://127.0.0.1:8008".into(),
        server_name: "example.org".into(),
        listen: "127.0.0.1:29300".parse().unwrap(),
        database,
    }
}

fn puppet(i: usize) -> (OwnedUserId, OwnedDeviceId) {
    (
        format!("@echo_{i}:example.org").try_into().unwrap(),
        "BRIDGEKEYS".into(),
    )
}

fn migrate(config: &std::path::Path, to: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_echo-bridge"))
        .arg("migrate")
        .arg("--config")
        .arg(config)
        .args(["--to", to])
        .output()
        .unwrap()
}

/// A peer's first Olm message to `user`'s device on one of its claimed
/// keys, with a spec payload.
fn prekey_message(
    manager: &AccountManager,
    user: &UserId,
    device: &OwnedDeviceId,
    one_time_key: Curve25519PublicKey,
) -> (Curve25519PublicKey, OlmMessage) {
    let identity = manager.identity_keys(user, device).unwrap();
    let peer = Account::new();
    let mut session = peer
        .create_outbound_session(
            SessionConfig::version_1(),
            identity.curve25519,
            one_time_key,
        )
        .unwrap();
    let payload = serde_json::json!({
        "type": "m.test",
        "content": { "body": "after the migration" },
        "sender": PEER,
        "recipient": user,
        "recipient_keys": { "ed25519": identity.ed25519.to_base64() },
        "keys": { "ed25519": peer.ed25519_key().to_base64() },
    })
    .to_string();
    (peer.curve25519_key(), session.encrypt(payload).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_copies_a_sled_store_into_postgres_and_every_outstanding_key_still_decrypts() {
    let postgres = Postgres::start().await.unwrap();
    let url = postgres.create_database("echo_migrate").await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let done = init(&options(&tmp.path().join("bridge"), None)).unwrap();

    // A sled store in use: three puppet devices, two keys claimed from
    // each (outstanding: handed out, no message yet), one completed
    // transaction, the puppets recorded.
    let mut claimed = Vec::new();
    let identities;
    {
        let config = Config::load(&done.config).unwrap();
        let store = Arc::new(SledStore::open(config.store_config().unwrap()).unwrap());
        let manager = AccountManager::new(store.clone(), ManagerConfig::default());
        let mut ids = Vec::new();
        for i in 0..3 {
            let (user, device) = puppet(i);
            manager.create_device(&user, &device).await.unwrap();
            ids.push(manager.identity_keys(&user, &device).unwrap().curve25519);
            for key in manager
                .claim(&user, &device, &OneTimeKeyAlgorithm::SignedCurve25519, 2)
                .await
                .unwrap()
            {
                let public = key.key.key.encode();
                claimed.push((i, key.key_id.to_string(), public));
            }
            store
                .record_puppet(&DeviceKey::new(user.as_str(), device.as_str()))
                .unwrap()
                .durable()
                .await
                .unwrap();
        }
        store
            .record_transaction("echo", "txn-before")
            .unwrap()
            .durable()
            .await
            .unwrap();
        identities = ids;
    }

    let out = migrate(&done.config, &url);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "migrate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("copied 3 accounts, 6 one-time keys"),
        "{stdout}"
    );
    for printed in [
        stdout.to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ] {
        assert!(
            !printed.contains(&format!(":{}@", postgres.password())),
            "the database password was printed: {printed}"
        );
    }

    // The configuration now names the database and the new store; the sled
    // store was moved out of the way.
    let config = Config::load(&done.config).unwrap();
    assert_eq!(config.database.as_deref(), Some(url.as_str()));
    assert!(!std::path::Path::new(&done.store).exists());
    assert!(std::path::Path::new(&format!("{}.migrated", done.store)).is_dir());
    let opened = storage::open(&config).unwrap();
    assert_eq!(Some(opened.id), config.store_id().unwrap());
    let store: Arc<dyn Backend> = opened.store;
    assert!(store.transaction_completed("echo", "txn-before").unwrap());
    assert_eq!(store.puppets().unwrap().len(), 3);

    // Same identities; every outstanding key starts a session; new ids
    // never repeat the old ones.
    let manager = AccountManager::new(store.clone(), ManagerConfig::default());
    let peer = UserId::parse(PEER).unwrap();
    for (i, key_id, public) in &claimed {
        let (user, device) = puppet(*i);
        assert_eq!(
            manager.identity_keys(&user, &device).unwrap().curve25519,
            identities[*i]
        );
        let otk = Curve25519PublicKey::from_base64(public).unwrap();
        let (sender, message) = prekey_message(&manager, &user, &device, otk);
        let decrypted = manager
            .decrypt_olm((&user, &device), &peer, sender, &message, None)
            .await
            .unwrap_or_else(|e| panic!("key {key_id} of puppet {i}: {e}"));
        assert!(decrypted.new_session && !decrypted.used_fallback_key);
        assert_eq!(decrypted.payload.event_type, "m.test");
    }
    let (user, device) = puppet(0);
    let fresh = manager
        .claim(&user, &device, &OneTimeKeyAlgorithm::SignedCurve25519, 1)
        .await
        .unwrap();
    let fresh_id = fresh[0].key_id.to_string();
    assert!(
        claimed.iter().all(|(_, id, _)| *id != fresh_id),
        "a key id was issued again after the migration"
    );

    // A second bridge cannot migrate into the same (now non-empty)
    // database, and is left exactly as it was.
    let other = init(&options(&tmp.path().join("other"), None)).unwrap();
    let before = std::fs::read_to_string(&other.config).unwrap();
    let out = migrate(&other.config, &url);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already holds a store"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&other.config).unwrap(), before);
    assert!(std::path::Path::new(&other.store).is_dir());

    // And a configuration already on PostgreSQL is not migrated again.
    let out = migrate(&done.config, &url);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already names a PostgreSQL database"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_with_a_database_creates_the_store_there_and_refuses_one_that_holds_a_store() {
    let postgres = Postgres::start().await.unwrap();
    let url = postgres.create_database("echo_init").await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let done = init(&options(&tmp.path().join("a"), Some(url.clone()))).unwrap();
    assert!(
        !tmp.path().join("a").join("store").exists(),
        "no sled store is made"
    );
    let config = Config::load(&done.config).unwrap();
    assert_eq!(config.database.as_deref(), Some(url.as_str()));
    let opened = storage::open(&config).unwrap();
    assert_eq!(Some(opened.id), config.store_id().unwrap());
    assert!(
        !format!("{config:?}").contains(postgres.password()),
        "Debug hides the database password"
    );
    drop(opened);

    let err = init(&options(&tmp.path().join("b"), Some(url))).unwrap_err();
    assert!(format!("{err:#}").contains("already"), "{err:#}");
    assert!(!tmp.path().join("b").join("config.toml").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_url_without_a_password_takes_it_from_pgpassword() {
    let postgres = Postgres::start().await.unwrap();
    let url = postgres.create_database("echo_pgpassword").await.unwrap();
    let bare = format!(
        "postgres://{}@127.0.0.1:{}/echo_pgpassword",
        postgres.user(),
        postgres.port()
    );
    assert_ne!(url, bare, "the testkit's URL carries a password");
    let tmp = tempfile::tempdir().unwrap();
    let init = |dir: &str, password: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_echo-bridge"));
        command
            .arg("init")
            .arg("--dir")
            .arg(tmp.path().join(dir))
            .args(["--homeserver-url", "http://127.0.0.1:8008"])
            .args(["--server-name", "example.org"])
            .args(["--listen", "127.0.0.1:29301"])
            .args(["--database", &bare])
            .env_remove("PGPASSWORD");
        if let Some(password) = password {
            command.env("PGPASSWORD", password);
        }
        command.output().unwrap()
    };
    let refused = init("without", None);
    assert!(!refused.status.success(), "the server asks for a password");
    let created = init("with", Some(postgres.password()));
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let config = Config::load(&tmp.path().join("with").join("config.toml")).unwrap();
    assert_eq!(config.database.as_deref(), Some(bare.as_str()));
    let written = std::fs::read_to_string(tmp.path().join("with").join("config.toml")).unwrap();
    assert!(
        !written.contains(&format!(":{}@", postgres.password())),
        "no password in the config"
    );
}
