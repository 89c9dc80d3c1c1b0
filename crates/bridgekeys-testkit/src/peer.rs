//! An Olm peer we did not write: matrix-nio, with python-olm (libolm)
//! underneath, running `py/olm_peer.py` in a Python process and driven by
//! JSON lines on its stdin and stdout.
//!
//! Every Olm step on the peer's side is nio's own code: uploading its
//! device and one-time keys, `/keys/query` (nio checks each device's
//! self-signature), `/keys/claim` (nio checks the one-time key's
//! signature), creating sessions, building and encrypting the Olm payload,
//! decrypting and checking received payloads. So a bridge whose Olm speaks
//! with an [`OlmPeer`] through a real Synapse interoperates with an
//! implementation that shares none of its code.
//!
//! The same holds for rooms and Megolm: [`OlmPeer::create_room`],
//! [`OlmPeer::invite`], [`OlmPeer::join`], [`OlmPeer::leave`],
//! [`OlmPeer::room_send`] and [`OlmPeer::wait_room_message`] are nio's own
//! room handling, group session sharing (`m.room_key` over Olm to every
//! member device, after `/keys/query` and `/keys/claim`), Megolm encryption
//! and decryption. Several peers may log in as one user: each
//! [`PeerLogin`] without a `device_id` is a new device with its own store,
//! which gets the room keys of messages sent after it appeared.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdin, ChildStdout},
};

use crate::{TestkitError, log_tail, venv};

/// The peer script, embedded so the testkit works from a fresh clone and
/// from a published crate alike; written to a temp file at start.
const SCRIPT: &str = include_str!("../py/olm_peer.py");

/// How long the peer may take to import nio and say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The peer gives up on a command after 60 s (plus the wait of a
/// `wait_to_device`, `wait_joined` or `wait_room_message`) and answers an
/// error; we wait a little longer.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(75);

/// Versions the running peer reported.
#[derive(Clone, Debug)]
pub struct PeerVersions {
    /// matrix-nio's version.
    pub matrix_nio: String,
    /// python-olm's version (libolm underneath).
    pub python_olm: String,
    /// The Python interpreter's version.
    pub python: String,
}

/// How an [`OlmPeer`] logs in.
#[derive(Clone, Debug)]
pub struct PeerLogin {
    /// The client-server API base URL, e.g. [`Synapse::url`](crate::Synapse::url).
    pub homeserver: String,
    /// The full user id (the user must exist; see
    /// [`Synapse::register_user`](crate::Synapse::register_user)).
    pub user_id: String,
    /// The user's password.
    pub password: String,
    /// The device to log in as; a new one if `None`.
    pub device_id: Option<String>,
    /// Where nio keeps its SQLite store (account, sessions, device keys).
    /// A directory inside the peer's temp directory if `None`; give one to
    /// keep the Olm state across peers (log in again with the same
    /// `device_id`).
    pub store_dir: Option<PathBuf>,
}

impl PeerLogin {
    /// A login as a new device, with the store in the peer's temp directory.
    /// Two peers logged in this way as one user are two devices of it.
    pub fn new(
        homeserver: impl Into<String>,
        user_id: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        Self {
            homeserver: homeserver.into(),
            user_id: user_id.into(),
            password: password.into(),
            device_id: None,
            store_dir: None,
        }
    }
}

/// The device a peer logged in as, with the identity keys nio uploaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerDevice {
    /// The user id.
    pub user_id: String,
    /// The device id.
    pub device_id: String,
    /// The device's Curve25519 identity key (unpadded base64).
    pub curve25519: String,
    /// The device's Ed25519 fingerprint key (unpadded base64).
    pub ed25519: String,
}

/// What [`OlmPeer::send_olm`] sent.
#[derive(Clone, Debug)]
pub struct SentOlm {
    /// The Olm message type of the ciphertext: 0 pre-key, 1 normal.
    pub message_type: u8,
    /// The Olm session it was encrypted with.
    pub session_id: String,
    /// Whether a one-time key was claimed (`/keys/claim`) to create the
    /// session for this message.
    pub claimed_one_time_key: bool,
    /// The recipient device's Curve25519 key, as nio's `/keys/query` found it.
    pub recipient_curve25519: String,
}

/// A recipient device's keys as nio's `/keys/query` (signature checked)
/// stored them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerDeviceKeys {
    /// The device id.
    pub device_id: String,
    /// Its Ed25519 key.
    pub ed25519: String,
    /// Its Curve25519 key.
    pub curve25519: String,
}

/// An Olm-encrypted to-device event the peer received, nio decrypted and
/// nio's payload checks accepted.
#[derive(Clone, Debug)]
pub struct ReceivedOlm {
    /// The to-device event's sender.
    pub sender: String,
    /// The event's `sender_key`: the sending device's Curve25519 key.
    pub sender_key: String,
    /// The payload's `sender_device`, if it had one.
    pub sender_device: Option<String>,
    /// The payload's (decrypted) event type.
    pub event_type: String,
    /// The payload's content.
    pub content: Value,
    /// The Olm message type the ciphertext had: 0 pre-key, 1 normal.
    pub message_type: u8,
    /// nio's checks passed: payload schema (`type`, `sender`, `keys`,
    /// `recipient`, `recipient_keys`, `content` present), `sender` equals
    /// the event's sender, `recipient` is the peer's user, and
    /// `recipient_keys.ed25519` is the peer's Ed25519 key. Always true:
    /// a payload failing them is an error, not a `ReceivedOlm`.
    pub verified_payload: bool,
    /// The payload's `keys` object (the sender's claimed Ed25519 key).
    pub keys: Value,
    /// The payload's `recipient`.
    pub recipient: Option<String>,
    /// The payload's `recipient_keys` object.
    pub recipient_keys: Value,
    /// The keys nio has for the device owning `sender_key` (after a
    /// `/keys/query` of the sender if it had none), `None` if the sender
    /// publishes no device with that key.
    pub sender_device_keys: Option<PeerDeviceKeys>,
    /// Whether `keys.ed25519` is that device's Ed25519 key; `None` if the
    /// device is unknown. nio itself never makes this check (it accepts
    /// any `keys`); the peer script makes it for the tests.
    pub keys_match: Option<bool>,
}

/// A room for [`OlmPeer::create_room`] to create.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewRoom {
    /// Users to invite.
    pub invite: Vec<String>,
    /// Whether the room starts encrypted: an `m.room.encryption` state
    /// event with `m.megolm.v1.aes-sha2` in the `initial_state`.
    pub encrypted: bool,
    /// `is_direct` on the invites (a DM).
    pub is_direct: bool,
    /// The room's name, if any.
    pub name: Option<String>,
}

impl NewRoom {
    /// An encrypted direct chat with `user_id`.
    pub fn encrypted_dm(user_id: impl Into<String>) -> Self {
        Self {
            invite: vec![user_id.into()],
            encrypted: true,
            is_direct: true,
            name: None,
        }
    }
}

/// A user's device, e.g. one that nio shared a room key with.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UserDevice {
    /// The user id.
    pub user_id: String,
    /// The device id.
    pub device_id: String,
}

/// What [`OlmPeer::room_send`] sent.
#[derive(Clone, Debug)]
pub struct SentRoomMessage {
    /// The event id the homeserver gave it.
    pub event_id: String,
    /// Whether nio encrypted it (it does exactly when it knows the room is
    /// encrypted).
    pub encrypted: bool,
    /// The Megolm session nio encrypted it with; `None` if not encrypted.
    pub session_id: Option<String>,
    /// The devices nio has shared that session with so far (over Olm,
    /// `m.room_key`), sorted; the sending device itself is never in it.
    pub shared_with: Vec<UserDevice>,
    /// How long nio's `room_send` took, group session sharing included
    /// (the catch-up sync before it not included).
    pub elapsed: Duration,
}

/// Which room message [`OlmPeer::wait_room_message`] waits for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomMessageQuery {
    /// The room.
    pub room_id: String,
    /// Only messages from this user; if `None`, from anyone, except the
    /// messages this peer sent itself.
    pub sender: Option<String>,
    /// Only messages whose body starts with this. Undecryptable events have
    /// no body and match whatever the prefix.
    pub body_prefix: Option<String>,
}

impl RoomMessageQuery {
    /// The next message in `room_id` that this peer did not send.
    pub fn in_room(room_id: impl Into<String>) -> Self {
        Self {
            room_id: room_id.into(),
            sender: None,
            body_prefix: None,
        }
    }

    /// Only messages from `user_id`.
    #[must_use]
    pub fn sent_by(mut self, user_id: impl Into<String>) -> Self {
        self.sender = Some(user_id.into());
        self
    }

    /// Only messages whose body starts with `prefix`.
    #[must_use]
    pub fn body_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.body_prefix = Some(prefix.into());
        self
    }
}

/// An `m.room.message` event the peer received: decrypted by nio from
/// Megolm, or sent unencrypted.
#[derive(Clone, Debug)]
pub struct PeerRoomMessage {
    /// The room.
    pub room_id: String,
    /// The event id.
    pub event_id: String,
    /// The sender.
    pub sender: String,
    /// The sending device, from the Megolm event's `device_id`; `None` if
    /// not encrypted.
    pub sender_device: Option<String>,
    /// The body.
    pub body: String,
    /// The msgtype (`m.text`, `m.notice`, ...).
    pub msgtype: Option<String>,
    /// The (decrypted) content.
    pub content: Value,
    /// Whether it came encrypted and nio decrypted it with a room key it
    /// holds (received over Olm, or its own).
    pub decrypted: bool,
    /// nio's `verified`: the sending device is one nio verified (never, for
    /// the peer's: it verifies no one), or the peer itself.
    pub verified: bool,
    /// The Megolm session it was decrypted with; `None` if not encrypted.
    pub session_id: Option<String>,
    /// The Megolm event's `sender_key`; `None` if not encrypted.
    pub sender_key: Option<String>,
    /// The Megolm message index it was encrypted at (read from the
    /// ciphertext nio decrypted: the index libolm decrypted it with); `None`
    /// if not encrypted. A sender that never reuses an index gives every
    /// message of a session a new one.
    pub message_index: Option<u32>,
}

/// An encrypted room event nio could not decrypt (or could, but rejected),
/// as [`TestkitError::Undecryptable`] reports it.
#[derive(Clone, Debug)]
pub struct UndecryptableEvent {
    /// The room.
    pub room_id: String,
    /// The event id.
    pub event_id: String,
    /// The sender.
    pub sender: String,
    /// The event's `device_id`, if it had one.
    pub sender_device: Option<String>,
    /// The event's `session_id`, if it had one.
    pub session_id: Option<String>,
    /// The event's `sender_key`, if it had one.
    pub sender_key: Option<String>,
    /// nio's reason, e.g. `Error decrypting megolm event, no session found
    /// with session id ... for room ...`.
    pub reason: String,
}

/// A matrix-nio client in a child process, doing its own Olm. Killed when
/// dropped; if the test is panicking then, the end of its log is printed.
#[derive(Debug)]
pub struct OlmPeer {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    next_id: u64,
    versions: PeerVersions,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl OlmPeer {
    /// Install (once, into [`default_olm_peer_venv_dir`](crate::default_olm_peer_venv_dir)) and start
    /// a peer; returns when it has loaded nio and is ready for commands.
    pub async fn start() -> Result<Self, TestkitError> {
        Self::start_in(venv::default_olm_peer_venv_dir()).await
    }

    /// [`OlmPeer::start`] with the venv in `venv` (created if needed).
    pub async fn start_in(venv: impl Into<PathBuf>) -> Result<Self, TestkitError> {
        let venv = venv.into();
        let python = tokio::task::spawn_blocking(move || venv::ensure_olm_peer(&venv))
            .await
            .map_err(|e| TestkitError::PythonMissing {
                detail: e.to_string(),
            })??;

        let dir = tempfile::Builder::new()
            .prefix("bridgekeys-olm-peer-")
            .tempdir()
            .map_err(TestkitError::io("creating the olm peer's directory"))?;
        let script = dir.path().join("olm_peer.py");
        std::fs::write(&script, SCRIPT)
            .map_err(TestkitError::io(format!("writing {}", script.display())))?;
        let log = dir.path().join("olm_peer.log");
        let log_file = std::fs::File::create(&log)
            .map_err(TestkitError::io(format!("creating {}", log.display())))?;

        let mut child = tokio::process::Command::new(&python)
            .arg("-u")
            .arg(&script)
            .current_dir(dir.path())
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true)
            .spawn()
            .map_err(TestkitError::io(format!("starting {}", python.display())))?;
        let start_error = |error: String| TestkitError::Peer {
            command: "start".into(),
            error,
            tail: log_tail(&log, 40),
            log: log.clone(),
        };
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(start_error("no pipes to the peer process".into()));
        };
        let mut stdout = BufReader::new(stdout).lines();
        let ready = match tokio::time::timeout(READY_TIMEOUT, stdout.next_line()).await {
            Err(_) => return Err(start_error(format!("not ready within {READY_TIMEOUT:?}"))),
            Ok(Err(e)) => return Err(start_error(format!("reading its stdout: {e}"))),
            Ok(Ok(None)) => return Err(start_error("exited before it was ready".into())),
            Ok(Ok(Some(line))) => serde_json::from_str::<Value>(&line)
                .map_err(|_| start_error(format!("unreadable ready line: {line}")))?,
        };
        if ready["ready"] != true {
            return Err(start_error(text(&ready["error"])));
        }
        let v = &ready["versions"];
        let versions = PeerVersions {
            matrix_nio: text(&v["matrix-nio"]),
            python_olm: text(&v["python-olm"]),
            python: text(&v["python"]),
        };
        tracing::info!(?versions, "olm peer is up");
        Ok(Self {
            child,
            stdin,
            stdout,
            next_id: 1,
            versions,
            log,
            dir,
        })
    }

    /// The versions of matrix-nio, python-olm and Python the peer runs.
    pub fn versions(&self) -> &PeerVersions {
        &self.versions
    }

    /// The peer's log: its stderr, with nio's own logging.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of the peer's log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// Log in (one account per peer), and let nio upload the device's
    /// identity keys and one-time keys.
    pub async fn login(&mut self, login: &PeerLogin) -> Result<PeerDevice, TestkitError> {
        let store_dir = login
            .store_dir
            .clone()
            .unwrap_or_else(|| self.dir.path().join("store"));
        let mut body = json!({
            "homeserver": login.homeserver,
            "user_id": login.user_id,
            "password": login.password,
            "store_dir": store_dir,
        });
        if let Some(device_id) = &login.device_id {
            body["device_id"] = json!(device_id);
        }
        let answer = self.command("login", body, COMMAND_TIMEOUT).await?;
        Ok(PeerDevice {
            user_id: self.field("login", &answer, "user_id")?,
            device_id: self.field("login", &answer, "device_id")?,
            curve25519: self.field("login", &answer, "curve25519")?,
            ed25519: self.field("login", &answer, "ed25519")?,
        })
    }

    /// Send `content` as an Olm-encrypted to-device event of type
    /// `event_type` to one device, the way nio does: `/keys/query` for the
    /// device if nio does not know it yet, `/keys/claim` if there is no Olm
    /// session with it yet, then encrypt and `sendToDevice` as
    /// `m.room.encrypted`.
    pub async fn send_olm(
        &mut self,
        user_id: &str,
        device_id: &str,
        event_type: &str,
        content: &Value,
    ) -> Result<SentOlm, TestkitError> {
        let body = json!({
            "user_id": user_id,
            "device_id": device_id,
            "type": event_type,
            "content": content,
        });
        let answer = self.command("send_olm", body, COMMAND_TIMEOUT).await?;
        Ok(SentOlm {
            message_type: self.message_type("send_olm", &answer)?,
            session_id: self.field("send_olm", &answer, "session_id")?,
            claimed_one_time_key: answer["claimed_one_time_key"] == true,
            recipient_curve25519: self.field("send_olm", &answer, "recipient_curve25519")?,
        })
    }

    /// Sync until an Olm to-device event whose decrypted type is
    /// `event_type` arrives and nio accepts it; `Ok(None)` if none came
    /// within `timeout`.
    ///
    /// Payloads of other types that arrive meanwhile are kept for later
    /// calls. An Olm event nio could not decrypt or rejected is an error
    /// (`undecryptable: ...`, with nio's log lines as the reason), reported
    /// by the next call whatever type it waits for.
    pub async fn wait_to_device(
        &mut self,
        event_type: &str,
        timeout: Duration,
    ) -> Result<Option<ReceivedOlm>, TestkitError> {
        let body = json!({ "type": event_type, "timeout_ms": millis(timeout) });
        let answer = match self
            .command(
                "wait_to_device",
                body,
                COMMAND_TIMEOUT.saturating_add(timeout),
            )
            .await
        {
            Ok(answer) => answer,
            Err(TestkitError::Peer { error, .. }) if error == "timeout" => return Ok(None),
            Err(e) => return Err(e),
        };
        let c = "wait_to_device";
        let sender_device_keys = match &answer["sender_device_keys"] {
            Value::Null => None,
            keys => Some(PeerDeviceKeys {
                device_id: self.field(c, keys, "device_id")?,
                ed25519: self.field(c, keys, "ed25519")?,
                curve25519: self.field(c, keys, "curve25519")?,
            }),
        };
        Ok(Some(ReceivedOlm {
            sender: self.field(c, &answer, "sender")?,
            sender_key: self.field(c, &answer, "sender_key")?,
            sender_device: answer["sender_device"].as_str().map(str::to_owned),
            event_type: self.field(c, &answer, "type")?,
            content: answer["content"].clone(),
            message_type: self.message_type(c, &answer)?,
            verified_payload: answer["verified_payload"] == true,
            keys: answer["keys"].clone(),
            recipient: answer["recipient"].as_str().map(str::to_owned),
            recipient_keys: answer["recipient_keys"].clone(),
            sender_device_keys,
            keys_match: answer["keys_match"].as_bool(),
        }))
    }

    /// Create a room as this peer's user; returns its id once nio's own
    /// room state has it (nio learns rooms, and that they are encrypted,
    /// only from its syncs).
    pub async fn create_room(&mut self, room: &NewRoom) -> Result<String, TestkitError> {
        let mut body = json!({
            "invite": room.invite,
            "encrypted": room.encrypted,
            "is_direct": room.is_direct,
        });
        if let Some(name) = &room.name {
            body["name"] = json!(name);
        }
        let answer = self.command("create_room", body, COMMAND_TIMEOUT).await?;
        self.field("create_room", &answer, "room_id")
    }

    /// Invite `user_id` to a room (e.g. again, after it left: the rooms
    /// [`OlmPeer::create_room`] makes are invite-only).
    pub async fn invite(&mut self, room_id: &str, user_id: &str) -> Result<(), TestkitError> {
        let body = json!({ "room_id": room_id, "user_id": user_id });
        self.command("invite", body, COMMAND_TIMEOUT).await?;
        Ok(())
    }

    /// Join a room (accept an invite, or rejoin after [`OlmPeer::leave`]);
    /// returns when nio's room state shows the peer joined.
    pub async fn join(&mut self, room_id: &str) -> Result<(), TestkitError> {
        self.command("join", json!({ "room_id": room_id }), COMMAND_TIMEOUT)
            .await?;
        Ok(())
    }

    /// Leave a room. nio 0.25.2 ignores the `leave` part of `/sync`, so the
    /// peer forgets the room in nio's state itself, and drops nio's
    /// outbound Megolm session for it.
    pub async fn leave(&mut self, room_id: &str) -> Result<(), TestkitError> {
        self.command("leave", json!({ "room_id": room_id }), COMMAND_TIMEOUT)
            .await?;
        Ok(())
    }

    /// Sync until nio's room state shows `user_id` joined to `room_id`
    /// (not merely invited); `Ok(false)` if it did not within `timeout`.
    pub async fn wait_joined(
        &mut self,
        room_id: &str,
        user_id: &str,
        timeout: Duration,
    ) -> Result<bool, TestkitError> {
        let body = json!({
            "room_id": room_id,
            "user_id": user_id,
            "timeout_ms": millis(timeout),
        });
        match self
            .command("wait_joined", body, COMMAND_TIMEOUT.saturating_add(timeout))
            .await
        {
            Ok(_) => Ok(true),
            Err(TestkitError::Peer { error, .. }) if error == "timeout" => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Send an `m.text` message with nio's `room_send`: in an encrypted
    /// room nio encrypts it with its outbound Megolm session, first sharing
    /// that session (when there is none yet, or it was rotated or
    /// invalidated, e.g. because a member's devices changed) over Olm with
    /// every device of every joined or invited member, after
    /// `/joined_members`, `/keys/query` and `/keys/claim` as it needs them.
    /// Devices nobody verified get the key too (`ignore_unverified_devices`).
    /// A sync just before takes in device-list and membership changes, as a
    /// client's sync loop would have.
    pub async fn room_send(
        &mut self,
        room_id: &str,
        body: &str,
    ) -> Result<SentRoomMessage, TestkitError> {
        self.room_send_msgtype(room_id, body, "m.text").await
    }

    /// [`OlmPeer::room_send`] with another msgtype (`m.notice`, `m.emote`).
    pub async fn room_send_msgtype(
        &mut self,
        room_id: &str,
        body: &str,
        msgtype: &str,
    ) -> Result<SentRoomMessage, TestkitError> {
        let c = "room_send";
        let request = json!({ "room_id": room_id, "body": body, "msgtype": msgtype });
        let answer = self.command(c, request, COMMAND_TIMEOUT).await?;
        let mut shared_with = Vec::new();
        for pair in answer["shared_with"].as_array().into_iter().flatten() {
            match (pair[0].as_str(), pair[1].as_str()) {
                (Some(user_id), Some(device_id)) => shared_with.push(UserDevice {
                    user_id: user_id.to_owned(),
                    device_id: device_id.to_owned(),
                }),
                _ => return Err(self.error(c, format!("unreadable shared_with: {answer}"))),
            }
        }
        Ok(SentRoomMessage {
            event_id: self.field(c, &answer, "event_id")?,
            encrypted: answer["encrypted"] == true,
            session_id: answer["session_id"].as_str().map(str::to_owned),
            shared_with,
            elapsed: Duration::from_millis(answer["elapsed_ms"].as_u64().unwrap_or(0)),
        })
    }

    /// Sync until an `m.room.message` matching `query` is there; `Ok(None)`
    /// if none came within `timeout`.
    ///
    /// Every room message a sync brings is queued, whichever command
    /// synced, so earlier ones are found too; the first match in arrival
    /// order is taken. An encrypted event in the room (from the queried
    /// sender, if any) that nio could not decrypt is taken the same way and
    /// is a [`TestkitError::Undecryptable`], with nio's reason: e.g. a
    /// device that logged in after a message was sent sees that message
    /// (in its first sync's timeline) as undecryptable. nio decrypts an
    /// event once, when the sync bringing it is handled (room keys from the
    /// same sync's to-device events first): it does not retry when the key
    /// comes later, so neither does the peer.
    pub async fn wait_room_message(
        &mut self,
        query: &RoomMessageQuery,
        timeout: Duration,
    ) -> Result<Option<PeerRoomMessage>, TestkitError> {
        let c = "wait_room_message";
        let mut body = json!({ "room_id": query.room_id, "timeout_ms": millis(timeout) });
        if let Some(sender) = &query.sender {
            body["sender"] = json!(sender);
        }
        if let Some(prefix) = &query.body_prefix {
            body["body_prefix"] = json!(prefix);
        }
        let answer = self
            .exchange(c, body, COMMAND_TIMEOUT.saturating_add(timeout))
            .await?;
        let optional = |name: &str| answer[name].as_str().map(str::to_owned);
        if answer["ok"] != true {
            let error = text(&answer["error"]);
            if error == "timeout" {
                return Ok(None);
            }
            return match error.strip_prefix("undecryptable: ") {
                Some(reason) if answer["event_id"].is_string() => {
                    Err(TestkitError::Undecryptable(Box::new(UndecryptableEvent {
                        room_id: self.field(c, &answer, "room_id")?,
                        event_id: self.field(c, &answer, "event_id")?,
                        sender: self.field(c, &answer, "sender")?,
                        sender_device: optional("sender_device"),
                        session_id: optional("session_id"),
                        sender_key: optional("sender_key"),
                        reason: reason.to_owned(),
                    })))
                }
                _ => Err(self.error(c, error)),
            };
        }
        Ok(Some(PeerRoomMessage {
            room_id: self.field(c, &answer, "room_id")?,
            event_id: self.field(c, &answer, "event_id")?,
            sender: self.field(c, &answer, "sender")?,
            sender_device: optional("sender_device"),
            body: self.field(c, &answer, "body")?,
            msgtype: optional("msgtype"),
            content: answer["content"].clone(),
            decrypted: answer["decrypted"] == true,
            verified: answer["verified"] == true,
            session_id: optional("session_id"),
            sender_key: optional("sender_key"),
            message_index: answer["message_index"]
                .as_u64()
                .and_then(|i| u32::try_from(i).ok()),
        }))
    }

    /// Ask the peer to close its client and exit, and wait until it has.
    pub async fn quit(mut self) -> Result<(), TestkitError> {
        let wait = Duration::from_secs(15);
        self.command("quit", json!({}), wait).await?;
        match tokio::time::timeout(wait, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(self.error("quit", format!("the peer exited with {status}"))),
            Ok(Err(e)) => Err(self.error("quit", format!("waiting for the peer: {e}"))),
            Err(_) => Err(self.error("quit", format!("the peer did not exit within {wait:?}"))),
        }
    }

    /// Send one command and read its answer; an `"ok": false` answer is an
    /// error carrying the peer's message.
    async fn command(
        &mut self,
        command: &str,
        body: Value,
        wait: Duration,
    ) -> Result<Value, TestkitError> {
        let answer = self.exchange(command, body, wait).await?;
        if answer["ok"] == true {
            return Ok(answer);
        }
        Err(self.error(command, text(&answer["error"])))
    }

    /// Send one command and read its answer, `"ok": false` or not.
    async fn exchange(
        &mut self,
        command: &str,
        mut body: Value,
        wait: Duration,
    ) -> Result<Value, TestkitError> {
        let id = self.next_id;
        self.next_id += 1;
        body["cmd"] = json!(command);
        body["id"] = json!(id);
        let mut line = body.to_string();
        line.push('\n');
        if let Err(e) = self.stdin.write_all(line.as_bytes()).await {
            return Err(self
                .exited_or(command, format!("writing to the peer: {e}"))
                .await);
        }
        if let Err(e) = self.stdin.flush().await {
            return Err(self
                .exited_or(command, format!("writing to the peer: {e}"))
                .await);
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let line = match tokio::time::timeout_at(deadline, self.stdout.next_line()).await {
                Err(_) => return Err(self.error(command, format!("no answer within {wait:?}"))),
                Ok(Err(e)) => {
                    return Err(self
                        .exited_or(command, format!("reading its answer: {e}"))
                        .await);
                }
                Ok(Ok(None)) => {
                    return Err(self.exited_or(command, "no answer".into()).await);
                }
                Ok(Ok(Some(line))) => line,
            };
            let answer: Value = serde_json::from_str(&line)
                .map_err(|_| self.error(command, format!("unreadable answer: {line}")))?;
            if answer["id"] != id {
                // The late answer of a command we stopped waiting for.
                tracing::warn!(%line, "olm peer: skipping an answer to an earlier command");
                continue;
            }
            return Ok(answer);
        }
    }

    /// The error for a broken pipe: says so if the peer has exited.
    async fn exited_or(&mut self, command: &str, error: String) -> TestkitError {
        let status = tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await;
        match status {
            Ok(Ok(status)) => self.error(command, format!("the peer exited with {status}")),
            _ => self.error(command, error),
        }
    }

    fn error(&self, command: &str, error: String) -> TestkitError {
        TestkitError::Peer {
            command: command.into(),
            error,
            log: self.log.clone(),
            tail: self.log_tail(40),
        }
    }

    fn field(&self, command: &str, answer: &Value, name: &str) -> Result<String, TestkitError> {
        answer[name]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| self.error(command, format!("answer has no {name}: {answer}")))
    }

    fn message_type(&self, command: &str, answer: &Value) -> Result<u8, TestkitError> {
        answer["message_type"]
            .as_u64()
            .and_then(|t| u8::try_from(t).ok())
            .ok_or_else(|| self.error(command, format!("answer has no message_type: {answer}")))
    }
}

/// A timeout in whole milliseconds, for the peer.
fn millis(timeout: Duration) -> u64 {
    u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)
}

/// A JSON string's text, or the JSON itself for anything else.
fn text(value: &Value) -> String {
    value
        .as_str()
        .map_or_else(|| value.to_string(), str::to_owned)
}

impl Drop for OlmPeer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!(
                "--- olm peer log ({}), last 60 lines ---\n{}",
                self.log.display(),
                self.log_tail(60)
            );
        }
    }
}
