//! The Olm-session half of the crash torture.
//!
//! The peers live in the parent: plain vodozemac accounts, each with an
//! outbound session to one puppet device, started on a one-time key the
//! parent claimed for it while it held the store. Every cycle the parent
//! encrypts a few messages from every peer and writes them to the child's
//! stdin, one line each; the child decrypts them with
//! [`AccountManager::decrypt_olm`] (in a delivery named after the cycle)
//! and prints each plaintext after the call returned. A pre-key message is
//! answered with [`AccountManager::encrypt_olm`] and the reply printed once
//! that returned; the peer reads it after the kill, so its later messages are
//! normal (type 1) messages. Sessions are thus opened, answered and advanced
//! in the child, under kills.
//!
//! Every cycle one peer, in turn, starts a new session on a newly claimed
//! key (as a client mends a wedged session) and sends on it from then on,
//! keeping the old one to read answers on, so sessions keep being opened
//! under kills and the puppet holds several sessions per peer, the oldest
//! evicted past the bound.
//!
//! After each kill, with the store reopened, the parent checks that no
//! acknowledged state was lost or rolled back:
//!
//! * every reply the child printed decrypts at its peer;
//! * every acknowledged message is refused in a new delivery (`Replay` for
//!   a pre-key message, `NoMatchingSession` for a normal one): had its
//!   ratchet step been rolled back, it would decrypt again. The same
//!   message in the child's own delivery still gets its plaintext back (the
//!   remembered result is durable with the step);
//! * the puppet answers once more every peer that read a reply, and the
//!   peer reads the answer: a rolled-back sending step would reuse a
//!   message index the peer has used, which it refuses;
//! * every peer's next message decrypts: no session, and no ratchet step a
//!   later message depends on (a reply's new ratchet key), was lost.
//!
//! Olm tolerates gaps, so the next message alone would also decrypt on a
//! rolled-back symmetric step; the replay check is the one that catches a
//! rollback, the next-message check catches lost sessions and lost replies.

use std::collections::HashMap;

use bridgekeys_olm::{AccountManager, OlmError, Recipient};
use ruma::{OneTimeKeyAlgorithm, UserId};
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedSender;
use vodozemac::{
    Curve25519PublicKey, Ed25519PublicKey,
    olm::{Account, DecryptionError, OlmMessage, Session, SessionConfig},
};

use crate::support::{
    PEER_USER, body_of, message_for, peer_device, peer_payload, public_key, puppet,
};

/// The content body of the puppet's answer to a pre-key message.
const REPLY_BODY: &str = "answer";

/// What the session checks saw over a run.
#[derive(Debug, Default, serde::Serialize)]
pub struct SessionChecks {
    /// Peers (each talking to one puppet device).
    pub peers: usize,
    /// Messages the children acknowledged (printed after `decrypt_olm`
    /// returned).
    pub acknowledged: usize,
    /// Of those, pre-key messages that opened a new session in the child.
    pub sessions_opened: usize,
    /// Of those, normal (type 1) messages.
    pub normal_acknowledged: usize,
    /// Puppet replies (`encrypt_olm`) the children printed and the peers
    /// decrypted.
    pub replies_read: usize,
    /// Peers that read a reply and then read one more answer the puppet
    /// encrypted after the kill (all of them, or the run fails).
    pub answers_read: usize,
    /// Replies and answers that came on an older session than the one the
    /// peer last started, although the puppet had already decrypted a
    /// message on the newer one (the spec asks for the session last
    /// received on; see `docs/BENCHMARKS.md`). Counted, not failed: the
    /// peers keep their older sessions, as real clients do.
    pub replies_on_older_session: usize,
    /// Acknowledged messages refused in a new delivery (all of them, or the
    /// run fails).
    pub replays_refused: usize,
    /// Acknowledged messages answered with the same plaintext in the
    /// child's delivery (all of them, or the run fails).
    pub redeliveries_answered: usize,
    /// Next messages (one per peer after each kill) that decrypted (all of
    /// them, or the run fails).
    pub next_messages_decrypted: usize,
}

/// A peer device, kept by the parent.
struct Peer {
    /// The puppet device it talks to.
    device: usize,
    account: Account,
    /// The session the peer sends on (the newest).
    session: Session,
    /// Sessions it started before, kept to read answers on them, as real
    /// clients keep them.
    older: Vec<Session>,
    /// The puppet device's ed25519 key, for the payload's `recipient_keys`.
    puppet_ed25519: Ed25519PublicKey,
    /// Messages sent so far.
    sent: usize,
}

impl Peer {
    /// Decrypt a message from the puppet: on the newest session, else on an
    /// older one (`true` then). A failed attempt changes no session.
    fn read(&mut self, message: &OlmMessage) -> Result<(Vec<u8>, bool), DecryptionError> {
        let error = match self.session.decrypt(message) {
            Ok(plaintext) => return Ok((plaintext, false)),
            Err(e) => e,
        };
        for session in self.older.iter_mut().rev() {
            if let Ok(plaintext) = session.decrypt(message) {
                return Ok((plaintext, true));
            }
        }
        Err(error)
    }
}

/// A message sent in the current cycle.
struct Sent {
    peer: usize,
    message: OlmMessage,
}

/// The child acknowledged a plaintext.
#[derive(Debug)]
pub struct Ack {
    peer: usize,
    new_session: bool,
    body: String,
}

/// The child printed a puppet's reply to a peer.
#[derive(Debug)]
pub struct Reply {
    peer: usize,
    message: OlmMessage,
}

/// The session lines the child printed in one cycle.
#[derive(Debug, Default)]
pub struct ChildOutput {
    /// Plaintexts acknowledged, in order.
    pub acks: Vec<Ack>,
    /// Replies, in order.
    pub replies: Vec<Reply>,
}

fn field<'a>(parts: &mut impl Iterator<Item = &'a str>, what: &str) -> anyhow::Result<&'a str> {
    parts
        .next()
        .ok_or_else(|| anyhow::anyhow!("session line without {what}"))
}

fn encode_message(message: &OlmMessage) -> (usize, String) {
    let (kind, body) = message.clone().to_parts();
    (kind, vodozemac::base64_encode(body))
}

fn decode_message(kind: &str, body: &str) -> anyhow::Result<OlmMessage> {
    Ok(OlmMessage::from_parts(
        kind.parse()?,
        &vodozemac::base64_decode(body)?,
    )?)
}

impl ChildOutput {
    /// Take a line the child printed if it is a session line (`OLM`,
    /// `REPLY`); `ERROR` fails. `Ok(false)`: not a session line.
    pub fn take(&mut self, line: &str) -> anyhow::Result<bool> {
        let mut parts = line.split_whitespace();
        match parts.next() {
            Some("OLM") => {
                let peer = field(&mut parts, "peer")?.parse()?;
                let new_session = field(&mut parts, "new-session flag")? == "1";
                let body = field(&mut parts, "body")?.to_owned();
                self.acks.push(Ack {
                    peer,
                    new_session,
                    body,
                });
                Ok(true)
            }
            Some("REPLY") => {
                let peer = field(&mut parts, "peer")?.parse()?;
                let message =
                    decode_message(field(&mut parts, "type")?, field(&mut parts, "body")?)?;
                self.replies.push(Reply { peer, message });
                Ok(true)
            }
            Some("ERROR") => anyhow::bail!("the child failed: {}", line.trim_end()),
            _ => Ok(false),
        }
    }
}

/// The parent's peers and what they sent in the current cycle.
pub struct Peers {
    wanted: usize,
    messages_per_peer: usize,
    peers: Vec<Peer>,
    sent: HashMap<String, Sent>,
    /// The delivery the current cycle's messages go in.
    delivery: String,
}

impl Peers {
    /// `wanted` peers (none created yet), each sending
    /// `messages_per_peer` messages per cycle.
    pub fn new(wanted: usize, messages_per_peer: usize) -> Self {
        Self {
            wanted,
            messages_per_peer,
            peers: Vec::new(),
            sent: HashMap::new(),
            delivery: String::new(),
        }
    }

    /// Create the peers not created yet: claim a one-time key of each one's
    /// puppet device (one of `devices`, in turn) and start the peer's
    /// outbound session on it. Returns the claimed keys (device index, key
    /// id), for the check that no key id is issued twice.
    pub async fn add_missing(
        &mut self,
        manager: &AccountManager,
        devices: usize,
    ) -> anyhow::Result<Vec<(usize, String)>> {
        let mut claimed = Vec::new();
        while self.peers.len() < self.wanted {
            let device = self.peers.len() % devices.max(1);
            let (user, device_id) = puppet(device)?;
            let identity = manager.identity_keys(&user, &device_id)?;
            let account = Account::new();
            let (session, key_id) = start_session(manager, device, &account).await?;
            claimed.push((device, key_id));
            self.peers.push(Peer {
                device,
                account,
                session,
                older: Vec::new(),
                puppet_ed25519: identity.ed25519,
                sent: 0,
            });
        }
        Ok(claimed)
    }

    /// Peer `cycle % peers` drops its session and starts a new one on a new
    /// claimed key, as a client does to mend a wedged session: the puppet
    /// then holds several sessions with that peer (the oldest evicted past
    /// the bound). Returns the claimed key (device index, key id).
    pub async fn renew(
        &mut self,
        manager: &AccountManager,
        cycle: usize,
    ) -> anyhow::Result<Option<(usize, String)>> {
        if self.peers.is_empty() {
            return Ok(None);
        }
        let index = cycle % self.peers.len();
        let peer = &mut self.peers[index];
        let (session, key_id) = start_session(manager, peer.device, &peer.account).await?;
        peer.older
            .push(std::mem::replace(&mut peer.session, session));
        Ok(Some((peer.device, key_id)))
    }

    /// The next message of peer `index` (`p<index>m<n>`), encrypted.
    fn next_message(&mut self, index: usize) -> anyhow::Result<(String, OlmMessage)> {
        let peer = &mut self.peers[index];
        let body = format!("p{index}m{}", peer.sent);
        peer.sent += 1;
        let (user, _) = puppet(peer.device)?;
        let payload = peer_payload(
            &user,
            peer.puppet_ed25519,
            peer.account.ed25519_key(),
            &body,
        );
        Ok((body, peer.session.encrypt(payload)?))
    }

    /// This cycle's messages for the child, one line each: every peer's
    /// next `messages_per_peer` messages, round by round.
    pub fn script(&mut self, cycle: usize) -> anyhow::Result<Vec<String>> {
        self.sent.clear();
        self.delivery = format!("crash-{cycle}");
        let mut lines = Vec::new();
        for _ in 0..self.messages_per_peer {
            for index in 0..self.peers.len() {
                let (body, message) = self.next_message(index)?;
                let peer = &self.peers[index];
                let (kind, ciphertext) = encode_message(&message);
                lines.push(format!(
                    "MSG {index} {} {} {} {} {kind} {ciphertext}\n",
                    peer.device,
                    peer.account.curve25519_key().to_base64(),
                    peer.account.ed25519_key().to_base64(),
                    self.delivery,
                ));
                self.sent.insert(
                    body,
                    Sent {
                        peer: index,
                        message,
                    },
                );
            }
        }
        Ok(lines)
    }

    /// After the kill, with the store reopened: check every reply and
    /// acknowledgement of `output`, then every peer's next message (see the
    /// module documentation).
    pub async fn verify(
        &mut self,
        manager: &AccountManager,
        cycle: usize,
        output: ChildOutput,
        checks: &mut SessionChecks,
    ) -> anyhow::Result<()> {
        let peer_user = UserId::parse(PEER_USER)?;
        for reply in &output.replies {
            let peer = self
                .peers
                .get_mut(reply.peer)
                .ok_or_else(|| anyhow::anyhow!("a reply to unknown peer {}", reply.peer))?;
            let (plaintext, older) = peer.read(&reply.message).map_err(|e| {
                anyhow::anyhow!(
                    "cycle {cycle}: peer {} cannot read the puppet's reply: {e}",
                    reply.peer
                )
            })?;
            checks.replies_on_older_session += usize::from(older);
            let payload: Value = serde_json::from_slice(&plaintext)?;
            anyhow::ensure!(
                payload["content"]["body"] == REPLY_BODY && payload["recipient"] == PEER_USER,
                "cycle {cycle}: peer {} read a reply with another payload",
                reply.peer
            );
            checks.replies_read += 1;
        }

        let new_delivery = format!("check-{cycle}");
        for ack in output.acks {
            let sent = self.sent.get(&ack.body).ok_or_else(|| {
                anyhow::anyhow!(
                    "cycle {cycle}: the child acknowledged {:?}, which was never sent",
                    ack.body
                )
            })?;
            anyhow::ensure!(
                sent.peer == ack.peer,
                "cycle {cycle}: {} acknowledged for the wrong peer",
                ack.body
            );
            let peer = &self.peers[sent.peer];
            let (user, device) = puppet(peer.device)?;
            let sender = peer.account.curve25519_key();
            let to = (user.as_ref(), device.as_ref());
            let prekey = matches!(sent.message, OlmMessage::PreKey(_));
            match manager
                .decrypt_olm(to, &peer_user, sender, &sent.message, Some(&new_delivery))
                .await
            {
                Err(OlmError::Replay) if prekey => {}
                Err(OlmError::NoMatchingSession) if !prekey => {}
                Ok(_) => anyhow::bail!(
                    "cycle {cycle}: acknowledged message {} decrypted a second time in a new \
                     delivery: its ratchet step was rolled back",
                    ack.body
                ),
                Err(e) => anyhow::bail!(
                    "cycle {cycle}: replaying acknowledged message {} failed wrongly: {e}",
                    ack.body
                ),
            }
            checks.replays_refused += 1;
            let again = manager
                .decrypt_olm(to, &peer_user, sender, &sent.message, Some(&self.delivery))
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "cycle {cycle}: acknowledged message {} not remembered in its delivery: {e}",
                        ack.body
                    )
                })?;
            anyhow::ensure!(
                body_of(&again)? == ack.body,
                "cycle {cycle}: the delivery of {} remembered another plaintext",
                ack.body
            );
            checks.redeliveries_answered += 1;
            checks.acknowledged += 1;
            checks.sessions_opened += usize::from(ack.new_session);
            checks.normal_acknowledged += usize::from(!prekey);
        }

        // The puppet answers once more every peer that read a reply: had the
        // child's last acknowledged `encrypt_olm` step been rolled back, this
        // answer would reuse a message index the peer has used, and the
        // peer would refuse it.
        let answered: std::collections::BTreeSet<usize> =
            output.replies.iter().map(|r| r.peer).collect();
        for &index in &answered {
            let peer = &mut self.peers[index];
            let (user, device) = puppet(peer.device)?;
            let peer_device_id = peer_device(index);
            let curve25519 = peer.account.curve25519_key();
            let recipient = Recipient {
                user_id: &peer_user,
                device_id: &peer_device_id,
                curve25519,
                ed25519: peer.account.ed25519_key(),
            };
            let answer = manager
                .encrypt_olm(
                    (&user, &device),
                    &recipient,
                    "m.bench",
                    &json!({ "body": REPLY_BODY }),
                )
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "cycle {cycle}: the puppet cannot answer peer {index} ({e}): the session \
                         of an acknowledged reply was lost"
                    )
                })?;
            let (_, older) = peer
                .read(&message_for(&answer.content, curve25519)?)
                .map_err(|e| {
                    anyhow::anyhow!(
                        "cycle {cycle}: peer {index} cannot read the puppet's next answer ({e}): \
                         an acknowledged sending step was rolled back (message index reused)"
                    )
                })?;
            checks.answers_read += 1;
            checks.replies_on_older_session += usize::from(older);
        }

        for index in 0..self.peers.len() {
            let (body, message) = self.next_message(index)?;
            let peer = &self.peers[index];
            let (user, device) = puppet(peer.device)?;
            let decrypted = manager
                .decrypt_olm(
                    (&user, &device),
                    &peer_user,
                    peer.account.curve25519_key(),
                    &message,
                    None,
                )
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "cycle {cycle}: peer {index}'s next message did not decrypt ({e}): \
                         a session or a ratchet step was lost"
                    )
                })?;
            anyhow::ensure!(
                body_of(&decrypted)? == body,
                "cycle {cycle}: peer {index}'s next message decrypted to another body"
            );
            checks.next_messages_decrypted += 1;
        }
        if !self.delivery.is_empty() {
            manager.forget_deliveries(&self.delivery).await?;
        }
        self.sent.clear();
        checks.peers = self.peers.len();
        Ok(())
    }
}

/// A new outbound session of `account` to puppet `device`, on a one-time
/// key claimed for it; and the key's id.
async fn start_session(
    manager: &AccountManager,
    device: usize,
    account: &Account,
) -> anyhow::Result<(Session, String)> {
    let (user, device_id) = puppet(device)?;
    let key = manager
        .claim(&user, &device_id, &OneTimeKeyAlgorithm::SignedCurve25519, 1)
        .await?
        .pop()
        .ok_or_else(|| anyhow::anyhow!("a claim for a peer returned no key"))?;
    let identity = manager.identity_keys(&user, &device_id)?;
    let session = account.create_outbound_session(
        SessionConfig::version_1(),
        identity.curve25519,
        public_key(&key)?,
    )?;
    Ok((session, key.key_id.to_string()))
}

/// The child's side: decrypt one `MSG` line with `decrypt_olm` and print
/// (send to `out`) the plaintext once it returned; answer a pre-key message
/// with `encrypt_olm` and print the reply once that returned.
pub async fn handle(
    manager: &AccountManager,
    line: &str,
    out: &UnboundedSender<String>,
) -> anyhow::Result<()> {
    let mut parts = line.split_whitespace();
    anyhow::ensure!(parts.next() == Some("MSG"), "not a message line: {line:?}");
    let peer: usize = field(&mut parts, "peer")?.parse()?;
    let device: usize = field(&mut parts, "device")?.parse()?;
    let curve25519 = Curve25519PublicKey::from_base64(field(&mut parts, "curve25519 key")?)?;
    let ed25519 = Ed25519PublicKey::from_base64(field(&mut parts, "ed25519 key")?)?;
    let delivery = field(&mut parts, "delivery")?;
    let message = decode_message(field(&mut parts, "type")?, field(&mut parts, "body")?)?;

    let (user, device_id) = puppet(device)?;
    let peer_user = UserId::parse(PEER_USER)?;
    let decrypted = manager
        .decrypt_olm(
            (&user, &device_id),
            &peer_user,
            curve25519,
            &message,
            Some(delivery),
        )
        .await?;
    let ack = format!(
        "OLM {peer} {} {}\n",
        u8::from(decrypted.new_session),
        body_of(&decrypted)?
    );
    if out.send(ack).is_err() {
        return Ok(());
    }
    if let OlmMessage::PreKey(_) = message {
        let peer_device_id = peer_device(peer);
        let recipient = Recipient {
            user_id: &peer_user,
            device_id: &peer_device_id,
            curve25519,
            ed25519,
        };
        let reply = manager
            .encrypt_olm(
                (&user, &device_id),
                &recipient,
                "m.bench",
                &json!({ "body": REPLY_BODY }),
            )
            .await?;
        let (kind, body) = encode_message(&message_for(&reply.content, curve25519)?);
        let _ = out.send(format!("REPLY {peer} {kind} {body}\n"));
    }
    Ok(())
}
