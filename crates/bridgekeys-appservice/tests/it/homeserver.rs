//! The homeserver client's transport against in-process servers: `https://`
//! with a certificate trusted through `with_root_certificate` (and refused
//! without it), an IPv6 literal URL, and the retries of a rate-limited call
//! (honouring `retry_after_ms` and `Retry-After`, bounded).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use bridgekeys_appservice::{AsToken, HomeserverClient, HomeserverError, RetryPolicy};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    },
    server::TlsStream,
};

const AS_TOKEN: &str = "as-token-for-transport-tests";
const PING: &str = "/_matrix/client/v1/appservice/{id}/ping";

/// What the fake homeserver does with each ping.
#[derive(Clone)]
enum Behaviour {
    /// Answer 200.
    Ok,
    /// Answer 429 to the first `n` calls (with `retry_after_ms` in the body,
    /// or else a `Retry-After` header in seconds), then 200.
    RateLimitFirst {
        n: usize,
        retry_after_ms: Option<u64>,
        header_secs: Option<u64>,
    },
}

#[derive(Clone)]
struct Hs {
    calls: Arc<AtomicUsize>,
    behaviour: Behaviour,
}

async fn ping(State(hs): State<Hs>, headers: HeaderMap) -> Response {
    assert_eq!(
        headers["authorization"].to_str().unwrap(),
        format!("Bearer {AS_TOKEN}"),
        "the as_token rides in the Authorization header"
    );
    let call = hs.calls.fetch_add(1, Ordering::SeqCst);
    match hs.behaviour {
        Behaviour::RateLimitFirst {
            n,
            retry_after_ms,
            header_secs,
        } if call < n => {
            let mut body = json!({"errcode": "M_LIMIT_EXCEEDED", "error": "Too Many Requests"});
            if let Some(ms) = retry_after_ms {
                body["retry_after_ms"] = json!(ms);
            }
            let mut response = (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
            if let Some(secs) = header_secs {
                response
                    .headers_mut()
                    .insert("retry-after", secs.to_string().parse().unwrap());
            }
            response
        }
        _ => Json(json!({"duration_ms": 7})).into_response(),
    }
}

fn router(behaviour: Behaviour) -> (Router, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let hs = Hs {
        calls: Arc::clone(&calls),
        behaviour,
    };
    (Router::new().route(PING, post(ping)).with_state(hs), calls)
}

/// Serve `behaviour` over plain HTTP on `listener`.
fn serve_http(listener: TcpListener, behaviour: Behaviour) -> Arc<AtomicUsize> {
    let (app, calls) = router(behaviour);
    tokio::spawn(async move { axum::serve(listener, app).await });
    calls
}

/// TLS on top of a TCP listener, for `axum::serve`. A failed handshake
/// (a client refusing our certificate) is skipped.
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    handshakes_failed: Arc<AtomicUsize>,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, addr)) = self.tcp.accept().await else {
                continue;
            };
            match self.acceptor.accept(stream).await {
                Ok(tls) => return (tls, addr),
                Err(_) => {
                    self.handshakes_failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

struct HttpsServer {
    url: String,
    /// The self-signed certificate, PEM.
    cert_pem: String,
    calls: Arc<AtomicUsize>,
    handshakes_failed: Arc<AtomicUsize>,
}

/// An HTTPS server on 127.0.0.1 with a self-signed certificate made now for
/// `127.0.0.1` and `localhost`.
async fn start_https() -> HttpsServer {
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    let cert_der: CertificateDer<'static> = certified.cert.der().clone();
    let key_der =
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert_der], key_der)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let handshakes_failed = Arc::new(AtomicUsize::new(0));
    let listener = TlsListener {
        tcp,
        acceptor: TlsAcceptor::from(Arc::new(config)),
        handshakes_failed: Arc::clone(&handshakes_failed),
    };
    let (app, calls) = router(Behaviour::Ok);
    tokio::spawn(async move { axum::serve(listener, app).await });
    HttpsServer {
        url: format!("https://127.0.0.1:{port}"),
        cert_pem: certified.cert.pem(),
        calls,
        handshakes_failed,
    }
}

fn client(url: &str) -> HomeserverClient {
    HomeserverClient::new(url, AsToken::new(AS_TOKEN)).unwrap()
}

#[tokio::test]
async fn https_works_with_the_self_signed_certificate_trusted_through_with_root_certificate() {
    let server = start_https().await;
    let trusting = client(&server.url)
        .with_root_certificate(server.cert_pem.as_bytes())
        .unwrap();

    let round_trip = trusting.ping_appservice("bridge").await.unwrap();
    assert_eq!(round_trip, Duration::from_millis(7));
    // A second call (over the pooled connection or a new one) works too.
    trusting.ping_appservice("bridge").await.unwrap();
    assert_eq!(server.calls.load(Ordering::SeqCst), 2);
    assert_eq!(server.handshakes_failed.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn https_with_an_untrusted_certificate_is_a_network_error_naming_the_certificate() {
    let server = start_https().await;
    // The built-in roots only; no retries, so the one refusal is all we see.
    let untrusting = client(&server.url).with_retry_policy(RetryPolicy::none());

    let err = untrusting.ping_appservice("bridge").await.unwrap_err();
    let HomeserverError::Network(message) = &err else {
        panic!("expected a network error, got {err:?}");
    };
    println!("refused: {err}");
    assert!(
        message.to_lowercase().contains("certificate"),
        "the error says what is wrong: {message}"
    );
    assert!(!format!("{err} {err:?}").contains(AS_TOKEN));
    assert_eq!(
        server.calls.load(Ordering::SeqCst),
        0,
        "no request went over the untrusted connection"
    );
}

#[tokio::test]
async fn an_ipv6_literal_url_reaches_a_server_on_the_ipv6_loopback() {
    let listener = match TcpListener::bind("[::1]:0").await {
        Ok(listener) => listener,
        Err(e) => {
            println!("SKIPPED: this machine has no IPv6 loopback ([::1]: {e})");
            return;
        }
    };
    let port = listener.local_addr().unwrap().port();
    let calls = serve_http(listener, Behaviour::Ok);

    let hs = client(&format!("http://[::1]:{port}"));
    assert_eq!(
        hs.ping_appservice("bridge").await.unwrap(),
        Duration::from_millis(7)
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A policy whose own backoff is negligible, so that the waits measured
/// are the homeserver's.
fn quick(max_retries: u32) -> RetryPolicy {
    {
        let mut c = RetryPolicy::default();
        c.max_retries = max_retries;
        c.base_delay = Duration::from_millis(1);
        c.max_delay = Duration::from_secs(5);
        c
    }
}

async fn plain_server(behaviour: Behaviour) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    (url, serve_http(listener, behaviour))
}

#[tokio::test]
async fn a_429_is_retried_after_its_retry_after_ms_and_then_succeeds() {
    let (url, calls) = plain_server(Behaviour::RateLimitFirst {
        n: 2,
        retry_after_ms: Some(300),
        header_secs: None,
    })
    .await;
    let hs = client(&url).with_retry_policy(quick(3));

    let started = Instant::now();
    hs.ping_appservice("bridge").await.unwrap();
    let took = started.elapsed();
    assert_eq!(calls.load(Ordering::SeqCst), 3, "two 429s, then success");
    assert!(
        took >= Duration::from_millis(600),
        "waited retry_after_ms before each retry: {took:?}"
    );
}

#[tokio::test]
async fn a_429_with_a_retry_after_header_waits_that_many_seconds() {
    let (url, calls) = plain_server(Behaviour::RateLimitFirst {
        n: 1,
        retry_after_ms: None,
        header_secs: Some(1),
    })
    .await;
    let hs = client(&url).with_retry_policy(quick(3));

    let started = Instant::now();
    hs.ping_appservice("bridge").await.unwrap();
    let took = started.elapsed();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(
        took >= Duration::from_secs(1),
        "waited Retry-After: {took:?}"
    );
}

#[tokio::test]
async fn retries_stop_at_the_bound_and_the_429_reaches_the_caller() {
    let (url, calls) = plain_server(Behaviour::RateLimitFirst {
        n: usize::MAX,
        retry_after_ms: Some(10),
        header_secs: None,
    })
    .await;
    let hs = client(&url).with_retry_policy(quick(2));

    let err = hs.ping_appservice("bridge").await.unwrap_err();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "one attempt and two retries"
    );
    assert!(err.is_transient());
    assert_eq!(err.errcode(), Some("M_LIMIT_EXCEEDED"));
    assert_eq!(err.retry_after(), Some(Duration::from_millis(10)));
    assert!(matches!(err, HomeserverError::Matrix { status: 429, .. }));

    // Without retries: exactly one more call.
    let once = client(&url).with_retry_policy(RetryPolicy::none());
    once.ping_appservice("bridge").await.unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_429_asking_for_longer_than_max_delay_is_not_waited_for() {
    let (url, calls) = plain_server(Behaviour::RateLimitFirst {
        n: usize::MAX,
        retry_after_ms: Some(60_000),
        header_secs: None,
    })
    .await;
    let hs = client(&url).with_retry_policy(quick(3));

    let started = Instant::now();
    let err = hs.ping_appservice("bridge").await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(60)));
}

#[tokio::test]
async fn an_unreachable_homeserver_is_retried_then_a_network_error() {
    // A port nobody listens on: connection refused, every time.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let hs = client(&url).with_retry_policy(quick(2));
    let err = hs.ping_appservice("bridge").await.unwrap_err();
    assert!(matches!(err, HomeserverError::Network(_)), "{err:?}");
    assert!(!format!("{err} {err:?}").contains(AS_TOKEN));
}

#[tokio::test]
async fn a_call_past_its_timeout_is_a_network_error() {
    // Accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let hs = client(&url)
        .with_timeout(Duration::from_millis(200))
        .with_retry_policy(RetryPolicy::none());
    let started = Instant::now();
    let err = hs.ping_appservice("bridge").await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    let HomeserverError::Network(message) = &err else {
        panic!("expected a network error, got {err:?}");
    };
    assert!(message.contains("timed out"), "{message}");
}
