//! The echo bridge against a real Synapse (bridgekeys-testkit): set up the
//! way a deployment is (`init`, the registration loaded by Synapse, the
//! bridge run from its config), then driven through the client-server API.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bridgekeys::appservice::{DEFAULT_PUPPET_DEVICE_ID, Registration};
use bridgekeys_testkit::{Method, StatusCode};
use echo_bridge::{Config, InitOptions, demo::Local, init};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_writes_a_registration_synapse_accepts_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let options = InitOptions {
        dir: dir.path().join("bridge"),
        homeserver_url: "http://127.0.0.1:8008/".into(),
        server_name: "example.org".into(),
        listen: "127.0.0.1:29300".parse().unwrap(),
        database: None,
    };
    let done = init(&options).unwrap();

    // The registration: id, url, sender, exclusive escaped namespace, flags.
    let yaml = std::fs::read_to_string(&done.registration).unwrap();
    let reg = Registration::from_yaml(&yaml).unwrap();
    assert_eq!(reg.id, "echo");
    assert_eq!(reg.url.as_deref(), Some("http://127.0.0.1:29300"));
    assert_eq!(reg.sender_localpart, "echo_bot");
    assert_eq!(reg.namespaces.users.len(), 1);
    assert_eq!(reg.namespaces.users[0].regex, r"@echo_.*:example\.org");
    assert!(reg.namespaces.users[0].exclusive);
    assert!(reg.receive_ephemeral && reg.push_ephemeral_unstable);
    assert!(reg.msc3202 && reg.msc4190, "{yaml}");
    assert_ne!(reg.as_token, reg.hs_token);
    let raw: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml).unwrap();
    assert_eq!(raw["io.element.msc4190"], serde_yaml_ng::Value::Bool(true));
    assert_eq!(raw["org.matrix.msc3202"], serde_yaml_ng::Value::Bool(true));

    // The config: what was asked, a 32-byte store key, the store by default.
    let config = Config::load(&done.config).unwrap();
    assert_eq!(config.homeserver_url, "http://127.0.0.1:8008");
    assert_eq!(config.server_name, "example.org");
    assert_eq!(config.listen, options.listen);
    assert_eq!(config.registration, options.dir.join("registration.yaml"));
    assert_eq!(config.store_dir(), options.dir.join("store"));
    assert_eq!(config.store_key.len(), 64);
    config.store_key().unwrap();
    assert!(
        !format!("{config:?}").contains(&config.store_key),
        "the store key is printed"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for path in [&done.config, &done.registration] {
            let mode = std::fs::metadata(path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{} is readable by others", path.display());
        }
    }

    // A second init refuses, naming the file, and changes nothing.
    let config_text = std::fs::read_to_string(&done.config).unwrap();
    let error = init(&options).unwrap_err().to_string();
    assert!(
        error.contains("already exists") && error.contains("config.toml"),
        "{error}"
    );
    assert_eq!(std::fs::read_to_string(&done.config).unwrap(), config_text);
    assert_eq!(std::fs::read_to_string(&done.registration).unwrap(), yaml);
    // Also when only the registration is left.
    std::fs::remove_file(&done.config).unwrap();
    let error = init(&options).unwrap_err().to_string();
    assert!(error.contains("registration.yaml"), "{error}");
    assert!(!done.config.exists(), "a half-initialised directory");

    // And Synapse accepts what init writes: a ping from Synapse reaches the
    // bridge with the right hs_token.
    let dir = tempfile::tempdir().unwrap();
    let local = Local::start(dir.path()).await.unwrap();
    let (status, pong) = local
        .synapse
        .request(
            Method::POST,
            "/_matrix/client/v1/appservice/echo/ping",
            Some(&local.registration.as_token),
            Some(&json!({ "transaction_id": "init-test" })),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{pong}");
    assert!(pong["duration_ms"].is_number(), "{pong}");
    local.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invited_puppet_joins_and_echoes_each_text_message_once_but_not_edits_or_notices() {
    let dir = tempfile::tempdir().unwrap();
    let local = Local::start(dir.path()).await.unwrap();
    let alice = local
        .synapse
        .register_user("alice", "correct horse battery")
        .await
        .unwrap();
    let bob = "@echo_bob:localhost";

    let room = local.create_dm(&alice, bob).await.unwrap();
    local
        .wait_for_join(&alice, &room, bob, TIMEOUT)
        .await
        .unwrap();

    let mut first = String::new();
    for (i, body) in ["hello bridge", "second message"].iter().enumerate() {
        let sent = local
            .send_text(&alice, &room, &format!("t{i}"), body)
            .await
            .unwrap();
        let echo = format!("echo: {body}");
        let reply = local
            .wait_for_message(&alice, &room, bob, &echo, TIMEOUT)
            .await
            .unwrap();
        assert_eq!(reply["content"]["msgtype"], "m.text");
        if i == 0 {
            first = sent;
            // An edit of the first message (also an m.text) is not echoed,
            // nor is a notice.
            let path = format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/edit",
                room.replace('!', "%21").replace(':', "%3A")
            );
            let edit = json!({
                "msgtype": "m.text",
                "body": "* hello edited",
                "m.new_content": { "msgtype": "m.text", "body": "hello edited" },
                "m.relates_to": { "rel_type": "m.replace", "event_id": first }
            });
            local
                .call(&alice, Method::PUT, &path, Some(&edit))
                .await
                .unwrap();
            let path = path.replace("/edit", "/notice");
            let notice = json!({ "msgtype": "m.notice", "body": "a notice" });
            local
                .call(&alice, Method::PUT, &path, Some(&notice))
                .await
                .unwrap();
        }
    }
    assert!(!first.is_empty());
    // Transactions arrive in order: once the second echo is there, the
    // edit and the notice were processed too. Each text message was echoed
    // exactly once, the edit and the notice not at all, and the puppet
    // never echoed itself ("echo: echo: ...").
    let messages = local.messages(&alice, &room).await.unwrap();
    let from_bob: Vec<&str> = messages
        .iter()
        .filter(|e| e["sender"] == bob)
        .map(|e| e["content"]["body"].as_str().unwrap())
        .collect();
    assert_eq!(
        from_bob,
        ["echo: second message", "echo: hello bridge"],
        "{messages:#?}"
    );
    local.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_invite_keys_query_shows_the_puppets_device_with_the_bridges_keys() {
    let dir = tempfile::tempdir().unwrap();
    let local = Local::start(dir.path()).await.unwrap();
    let alice = local
        .synapse
        .register_user("alice", "correct horse battery")
        .await
        .unwrap();
    let bob = "@echo_bob:localhost";
    let room = local.create_dm(&alice, bob).await.unwrap();
    local
        .wait_for_join(&alice, &room, bob, TIMEOUT)
        .await
        .unwrap();

    let query = local
        .call(
            &alice,
            Method::POST,
            "/_matrix/client/v3/keys/query",
            Some(&json!({ "device_keys": { bob: [] } })),
        )
        .await
        .unwrap();
    let devices = query["device_keys"][bob].as_object().unwrap();
    assert_eq!(devices.len(), 1, "{query}");
    let published = &devices[DEFAULT_PUPPET_DEVICE_ID];
    let user = ruma::UserId::parse(bob).unwrap();
    let ours = local
        .manager()
        .unwrap()
        .device_keys(&user, &ruma::OwnedDeviceId::from(DEFAULT_PUPPET_DEVICE_ID))
        .unwrap();
    let ours = serde_json::to_value(ours).unwrap();
    assert_eq!(published["keys"], ours["keys"], "{query}");
    assert_eq!(published["algorithms"], ours["algorithms"], "{query}");
    local.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_the_puppet_still_echoes_in_the_rooms_it_had_joined() {
    let dir = tempfile::tempdir().unwrap();
    let mut local = Local::start(dir.path()).await.unwrap();
    let alice = local
        .synapse
        .register_user("alice", "correct horse battery")
        .await
        .unwrap();
    let bob = "@echo_bob:localhost";
    let room = local.create_dm(&alice, bob).await.unwrap();
    local
        .wait_for_join(&alice, &room, bob, TIMEOUT)
        .await
        .unwrap();

    // A new process: the room map starts empty and is relearnt from the
    // homeserver; the store (puppet registry, keys) is the same.
    local.restart().await.unwrap();
    local
        .send_text(&alice, &room, "after-restart", "still there?")
        .await
        .unwrap();
    local
        .wait_for_message(&alice, &room, bob, "echo: still there?", TIMEOUT)
        .await
        .unwrap();
    local.stop().await.unwrap();
}

/// A request to the bridge as the homeserver makes it (Bearer hs_token);
/// the status.
async fn as_homeserver(
    local: &Local,
    method: http::Method,
    path: &str,
    body: Option<&serde_json::Value>,
) -> u16 {
    use http_body_util::{BodyExt, Full};
    let stream = tokio::net::TcpStream::connect(local.config.listen)
        .await
        .unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let body = body.map_or_else(bytes::Bytes::new, |b| bytes::Bytes::from(b.to_string()));
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", local.config.listen.to_string())
        .header("content-type", "application/json")
        .header(
            "authorization",
            format!("Bearer {}", local.registration.hs_token),
        )
        .body(Full::new(body))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let _ = response.into_body().collect().await;
    status
}

/// `PUT` a transaction to the bridge as the homeserver would; the status.
async fn put_transaction(local: &Local, txn_id: &str, body: &serde_json::Value) -> u16 {
    let path = format!("/_matrix/app/v1/transactions/{txn_id}");
    as_homeserver(local, http::Method::PUT, &path, Some(body)).await
}

/// The device ids keys/query shows for `user`.
async fn queried_devices(local: &Local, user: &str) -> Vec<String> {
    let (status, query) = local
        .synapse
        .request(
            Method::POST,
            "/_matrix/client/v3/keys/query",
            Some(&local.registration.as_token),
            Some(&json!({ "device_keys": { user: [] } })),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{query}");
    query["device_keys"][user]
        .as_object()
        .map(|d| d.keys().cloned().collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_query_for_a_puppet_provisions_it_and_the_bot_is_not_a_puppet() {
    let dir = tempfile::tempdir().unwrap();
    let local = Local::start(dir.path()).await.unwrap();
    let dave = "@echo_dave:localhost";
    assert!(queried_devices(&local, dave).await.is_empty());
    let path = format!("/_matrix/app/v1/users/{}", dave.replace(':', "%3A"));
    assert_eq!(
        as_homeserver(&local, http::Method::GET, &path, None).await,
        200
    );
    assert_eq!(
        queried_devices(&local, dave).await,
        [DEFAULT_PUPPET_DEVICE_ID],
        "the accepted puppet's device is on the homeserver"
    );
    for user in ["@echo_bot:localhost", "@alice:localhost"] {
        let path = format!("/_matrix/app/v1/users/{}", user.replace(':', "%3A"));
        assert_eq!(
            as_homeserver(&local, http::Method::GET, &path, None).await,
            404,
            "{user}"
        );
    }
    local.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_whose_join_fails_transiently_is_retried_and_a_refused_one_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let mut local = Local::start(dir.path()).await.unwrap();
    let alice = local
        .synapse
        .register_user("alice", "correct horse battery")
        .await
        .unwrap();
    let bob = "@echo_bob:localhost";
    let room = local.create_dm(&alice, bob).await.unwrap();
    local
        .wait_for_join(&alice, &room, bob, TIMEOUT)
        .await
        .unwrap();
    let invite = |room: &str| {
        json!({ "events": [{
            "type": "m.room.member",
            "event_id": format!("$invite-{room}"),
            "room_id": room,
            "sender": "@alice:localhost",
            "state_key": bob,
            "content": { "membership": "invite" },
            "origin_server_ts": 0
        }]})
    };

    // The homeserver cannot be reached: the join fails, the transaction is
    // answered 500 and not recorded, so the retry is processed again.
    let homeserver_url = local.config.homeserver_url.clone();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    local.config.homeserver_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    local.restart().await.unwrap();
    assert_eq!(put_transaction(&local, "t-down", &invite(&room)).await, 500);
    assert_eq!(put_transaction(&local, "t-down", &invite(&room)).await, 500);

    // Reachable again: the retry goes through (the join is idempotent).
    local.config.homeserver_url = homeserver_url;
    local.restart().await.unwrap();
    assert_eq!(put_transaction(&local, "t-down", &invite(&room)).await, 200);

    // An invite to a room that does not exist: the homeserver refuses the
    // join (4xx) and will every time; the event is skipped (logged) rather
    // than blocking every later transaction.
    assert_eq!(
        put_transaction(&local, "t-nowhere", &invite("!nowhere:localhost")).await,
        200
    );
    // And the bridge goes on echoing.
    local
        .send_text(&alice, &room, "after", "still echoing?")
        .await
        .unwrap();
    local
        .wait_for_message(&alice, &room, bob, "echo: still echoing?", TIMEOUT)
        .await
        .unwrap();
    local.stop().await.unwrap();
}
