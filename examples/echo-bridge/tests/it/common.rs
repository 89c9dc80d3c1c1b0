//! Shared by the end-to-end tests that run the echo bridge as a real child
//! process (`echo-bridge run`) against the testkit's Synapse, with a real
//! client (matrix-nio, [`OlmPeer`]): the deployment, a programmable HTTP
//! proxy to put between the bridge and Synapse, and the client's helpers.
//!
//! Each test crate uses part of it.
#![allow(dead_code, clippy::unwrap_used)]

use std::{
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    process::{Child, Command, ExitStatus, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use bridgekeys::appservice::Registration;
use bridgekeys_testkit::{
    Method, OlmPeer, PeerDevice, PeerLogin, PeerRoomMessage, RoomMessageQuery, StatusCode, Synapse,
    SynapseOptions, TestkitError,
};
use bytes::Bytes;
use echo_bridge::{Config, InitOptions, demo::poll, init};
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Request, Response, header};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::{net::TcpListener, task::JoinHandle};

/// How long any one step may take.
pub const TIMEOUT: Duration = Duration::from_secs(45);
/// The puppet the tests talk to.
pub const BOB: &str = "@echo_bob:localhost";
/// Alice's password.
pub const PASSWORD: &str = "correct horse battery";

/// A free loopback address (bound and let go: the bridge binds it next).
pub fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// Synapse and the echo bridge as a child process, set up as a deployment
/// is: `echo-bridge init` writes config and registration, Synapse loads the
/// registration, `echo-bridge run --config` serves. Synapse may reach the
/// bridge through something in between (the registration's `url` is then
/// that), and the bridge may reach Synapse through something in between
/// ([`Deployment::set_homeserver_url`]).
pub struct Deployment {
    /// The homeserver (stopped on drop).
    pub synapse: Synapse,
    /// The registration Synapse loaded (its `url` is `appservice_addr`).
    pub registration: Registration,
    /// Where the bridge listens.
    pub bridge_addr: SocketAddr,
    config_path: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// More bridge processes on the same configuration and store
    /// ([`Deployment::start_another`]), killed on drop.
    others: Vec<Child>,
    /// Bridge processes started so far.
    pub starts: u32,
}

impl Deployment {
    /// `echo-bridge init` into `dir`, then Synapse with its registration.
    /// Synapse reaches the appservice at `appservice_addr` (the bridge
    /// itself if `None`); the bridge is not started yet.
    pub async fn init(dir: &Path, appservice_addr: Option<SocketAddr>) -> anyhow::Result<Self> {
        Self::init_with_database(dir, appservice_addr, None).await
    }

    /// [`Deployment::init`] with the store in the PostgreSQL `database`
    /// (`init --database`) instead of sled.
    pub async fn init_with_database(
        dir: &Path,
        appservice_addr: Option<SocketAddr>,
        database: Option<String>,
    ) -> anyhow::Result<Self> {
        let bridge_addr = free_addr();
        let done = init(&InitOptions {
            dir: dir.join("bridge"),
            // Not known before Synapse starts; set below.
            homeserver_url: "http://127.0.0.1:8008".into(),
            server_name: "localhost".into(),
            listen: appservice_addr.unwrap_or(bridge_addr),
            database,
        })?;
        let synapse = Synapse::start(SynapseOptions {
            appservice_registrations: vec![done.registration.clone()],
            ..SynapseOptions::default()
        })
        .await
        .context("starting Synapse")?;
        let registration = Registration::load(&done.registration)?;
        let deployment = Self {
            registration,
            bridge_addr,
            config_path: done.config.clone(),
            log: dir.join("bridge.log"),
            child: None,
            others: Vec::new(),
            starts: 0,
            synapse,
        };
        deployment.edit_config(|config| {
            config.listen = bridge_addr;
            config.homeserver_url = deployment.synapse.url();
        })?;
        Ok(deployment)
    }

    /// Point the bridge at `url` for the client-server API (takes effect
    /// at its next start).
    pub fn set_homeserver_url(&self, url: &str) -> anyhow::Result<()> {
        self.edit_config(|config| config.homeserver_url = url.to_owned())
    }

    fn edit_config(&self, edit: impl FnOnce(&mut Config)) -> anyhow::Result<()> {
        let mut config = Config::load(&self.config_path)?;
        edit(&mut config);
        std::fs::write(&self.config_path, toml::to_string(&config)?)?;
        Ok(())
    }

    /// Start `echo-bridge run --config ...` (the same config and store every
    /// time), its output appended to the bridge log, and wait until Synapse
    /// reaches it.
    pub async fn start_bridge(&mut self) -> anyhow::Result<()> {
        assert!(self.child.is_none(), "the bridge is running already");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        self.starts += 1;
        let child = Command::new(env!("CARGO_BIN_EXE_echo-bridge"))
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting echo-bridge run")?;
        self.child = Some(child);
        self.wait_until_reachable().await
    }

    /// Ask Synapse to ping the appservice until the ping comes back: the
    /// bridge serves, and Synapse counts it as up again (a ping also makes
    /// it retry at once what it held back while it counted the bridge as
    /// down, and stop dropping to-device messages).
    pub async fn wait_until_reachable(&mut self) -> anyhow::Result<()> {
        let path = format!(
            "/_matrix/client/v1/appservice/{}/ping",
            self.registration.id
        );
        let token = self.registration.as_token.clone();
        let starts = self.starts;
        let synapse = &self.synapse;
        let child = &mut self.child;
        poll(TIMEOUT, || {
            let exited = child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            let path = path.clone();
            let token = token.clone();
            async move {
                if let Some(status) = exited {
                    anyhow::bail!("the bridge exited with {status}");
                }
                let (status, answer) = synapse
                    .request(
                        Method::POST,
                        &path,
                        Some(&token),
                        Some(&json!({ "transaction_id": format!("test-ping-{starts}") })),
                    )
                    .await?;
                if status == StatusCode::OK {
                    return Ok(Some(()));
                }
                anyhow::bail!("ping answered {status}: {answer}")
            }
        })
        .await
        .with_context(|| format!("Synapse could not reach the bridge (start {starts})"))
    }

    /// Start one more `echo-bridge run` process with the same configuration
    /// (store, keys, registration) but listening on `listen`, as a second
    /// process of one bridge behind a load balancer is run; its output goes
    /// to the same log. Returns once it answers on `listen`.
    pub async fn start_another(&mut self, listen: SocketAddr) -> anyhow::Result<()> {
        let mut config = Config::load(&self.config_path)?;
        config.listen = listen;
        let path = self
            .config_path
            .with_file_name(format!("config-{}.toml", listen.port()));
        {
            use std::{io::Write, os::unix::fs::OpenOptionsExt};
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            file.write_all(toml::to_string(&config)?.as_bytes())?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(env!("CARGO_BIN_EXE_echo-bridge"))
            .arg("run")
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting another echo-bridge run")?;
        self.others.push(child);
        poll(TIMEOUT, || async move {
            Ok(tokio::net::TcpStream::connect(listen)
                .await
                .ok()
                .map(|_| ()))
        })
        .await
        .with_context(|| format!("the other bridge process never listened on {listen}"))
    }

    /// Kill the bridge with SIGKILL (no shutdown of any kind: the process
    /// ends wherever it was) and reap it; its exit status.
    pub fn kill_bridge(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the bridge is running");
        // `Child::kill` is SIGKILL on unix.
        child.kill().unwrap();
        child.wait().unwrap()
    }

    /// The last `lines` lines the bridge processes wrote.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for mut child in self.child.take().into_iter().chain(self.others.drain(..)) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- echo-bridge log ({}), last 80 lines ---\n{}",
                self.log.display(),
                self.log_tail(80)
            );
        }
    }
}

/// A request as the proxy received it, body read whole.
#[derive(Clone, Debug)]
pub struct Exchange {
    /// Its method.
    pub method: Method,
    /// Path and query.
    pub path: String,
    /// Its headers (`host` is rewritten when forwarded).
    pub headers: HeaderMap,
    /// Its body.
    pub body: Bytes,
}

impl Exchange {
    /// The body as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_slice(&self.body)?)
    }
}

/// An answer as the proxy passes it back, body read whole.
#[derive(Clone, Debug)]
pub struct Answer {
    /// Its status.
    pub status: StatusCode,
    /// Its headers.
    pub headers: HeaderMap,
    /// Its body.
    pub body: Bytes,
}

/// Where a proxy forwards to.
#[derive(Clone, Copy, Debug)]
pub struct Upstream(pub SocketAddr);

/// Hop-by-hop and framing headers, set again for each hop.
const NOT_FORWARDED: [header::HeaderName; 4] = [
    header::HOST,
    header::CONNECTION,
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
];

impl Upstream {
    /// Send `exchange` on (a new connection each time) and read the answer.
    pub async fn forward(&self, exchange: &Exchange) -> anyhow::Result<Answer> {
        let stream = tokio::net::TcpStream::connect(self.0)
            .await
            .with_context(|| format!("connecting to {}", self.0))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(exchange.method.clone())
            .uri(&exchange.path)
            .header(header::HOST, self.0.to_string());
        for (name, value) in &exchange.headers {
            if !NOT_FORWARDED.contains(name) {
                request = request.header(name, value);
            }
        }
        let request = request.body(Full::new(exchange.body.clone()))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await?.to_bytes();
        Ok(Answer {
            status,
            headers,
            body,
        })
    }
}

/// What a proxy does with each request: usually `upstream.forward(...)`,
/// with whatever the test needs around it.
pub type Hook = Arc<
    dyn Fn(Exchange, Upstream) -> Pin<Box<dyn Future<Output = anyhow::Result<Answer>> + Send>>
        + Send
        + Sync,
>;

/// A [`Hook`] from an async function.
pub fn hook<F, Fut>(f: F) -> Hook
where
    F: Fn(Exchange, Upstream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<Answer>> + Send + 'static,
{
    Arc::new(move |exchange, upstream| Box::pin(f(exchange, upstream)))
}

/// An HTTP/1.1 proxy on loopback that hands each request, read whole, to
/// its [`Hook`]; stopped on drop.
pub struct Proxy {
    /// Where it listens.
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listen on a free loopback port; forward to `upstream` through `hook`.
    pub async fn start(upstream: Upstream, hook: Hook) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(listener, upstream, hook)
    }

    /// [`Proxy::start`] on a bound listener.
    pub fn start_on(listener: TcpListener, upstream: Upstream, hook: Hook) -> Self {
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let hook = hook.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let hook = hook.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(handle(request, upstream, hook).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, task }
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    request: Request<hyper::body::Incoming>,
    upstream: Upstream,
    hook: Hook,
) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let answer = match body.collect().await {
        Ok(body) => {
            let exchange = Exchange {
                method: parts.method,
                path: parts
                    .uri
                    .path_and_query()
                    .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned()),
                headers: parts.headers,
                body: body.to_bytes(),
            };
            hook(exchange, upstream).await
        }
        Err(e) => Err(e.into()),
    };
    match answer {
        Ok(answer) => {
            let mut response = Response::new(Full::new(answer.body));
            *response.status_mut() = answer.status;
            for (name, value) in &answer.headers {
                if !NOT_FORWARDED.contains(name) {
                    response.headers_mut().append(name, value.clone());
                }
            }
            response
        }
        Err(e) => {
            let mut response = Response::new(Full::new(Bytes::from(format!(
                "{{\"errcode\":\"M_UNKNOWN\",\"error\":\"proxy: {e:#}\"}}"
            ))));
            *response.status_mut() = StatusCode::BAD_GATEWAY;
            response
        }
    }
}

/// The message index of a Megolm message (an `m.room.encrypted` content's
/// `ciphertext`), read from the message: base64 of version byte 0x03, then
/// protobuf field 1 (tag 0x08), a varint.
pub fn megolm_message_index(ciphertext: &str) -> Option<u32> {
    let raw = ruma::serde::Base64::<ruma::serde::base64::Standard>::parse(ciphertext).ok()?;
    let raw = raw.as_bytes();
    if raw.len() < 3 || raw[0] != 0x03 || raw[1] != 0x08 {
        return None;
    }
    let mut index = 0u32;
    for (i, byte) in raw[2..].iter().take(5).enumerate() {
        index |= u32::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(index);
        }
    }
    None
}

/// A matrix-nio client logged in as a new device of `user_id`, and that
/// device.
pub async fn client(synapse: &Synapse, user_id: &str) -> (OlmPeer, PeerDevice) {
    let mut peer = OlmPeer::start()
        .await
        .unwrap_or_else(|e| panic!("could not start the Olm peer: {e}"));
    let device = peer
        .login(&PeerLogin::new(synapse.url(), user_id, PASSWORD))
        .await
        .unwrap();
    (peer, device)
}

/// Alice registered on the deployment's Synapse, her client (matrix-nio)
/// logged in, and an encrypted DM she opened with [`BOB`], once he joined.
pub async fn encrypted_dm_with_bob(deployment: &Deployment) -> (OlmPeer, String) {
    deployment
        .synapse
        .register_user("alice", PASSWORD)
        .await
        .unwrap();
    let (mut phone, _) = client(&deployment.synapse, "@alice:localhost").await;
    let room = phone
        .create_room(&bridgekeys_testkit::NewRoom::encrypted_dm(BOB))
        .await
        .unwrap();
    assert!(phone.wait_joined(&room, BOB, TIMEOUT).await.unwrap());
    (phone, room)
}

/// The echo of `body` from [`BOB`], as the client decrypted it. Encrypted
/// events the client cannot decrypt on the way are tolerated only if
/// `tolerate_undecryptable` (they are printed); then the echo itself must
/// still decrypt.
pub async fn echo_of(
    peer: &mut OlmPeer,
    room: &str,
    body: &str,
    tolerate_undecryptable: bool,
) -> PeerRoomMessage {
    let query = RoomMessageQuery::in_room(room)
        .sent_by(BOB)
        .body_prefix(format!("echo: {body}"));
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match peer.wait_room_message(&query, left).await {
            Ok(Some(message)) => {
                assert!(message.decrypted, "the echo came in the clear: {message:?}");
                assert_eq!(message.body, format!("echo: {body}"));
                return message;
            }
            Ok(None) => panic!("no echo of {body:?} within {TIMEOUT:?}"),
            Err(TestkitError::Undecryptable(event)) if tolerate_undecryptable => {
                eprintln!("an earlier message the client cannot read: {event:?}");
            }
            Err(e) => panic!("the echo of {body:?} could not be read: {e}"),
        }
    }
}
