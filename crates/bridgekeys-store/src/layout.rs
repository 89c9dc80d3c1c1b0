//! Where each record lives in the tree. One place, so the layout can be read
//! (and migrated) at a glance.
//!
//! | key | value |
//! |---|---|
//! | `m/schema` | schema version, u32 big-endian |
//! | `m/keycheck` | a sealed constant, to detect a wrong store key |
//! | `m/storeid` | the [`crate::StoreId`], 16 bytes (not secret) |
//! | `m/keyids` | u64 BE: every one-time key id handed out so far is below it |
//! | `m/upgrading` | u32 BE, the schema being upgraded from: present only while an upgrade (written with the new `m/schema`, so an older build refuses the store) is under way; removed once it is durable |
//! | `a/<device>` | the header: a flag byte ([`PUPPET`], [`CROSS_SIGNED`], [`SCHEDULED`]) and the version in 7 bytes BE (together the 8 bytes that held the version u64 BE before schema 4, whose top byte was always 0), then the due time of the next rotation step u64 BE if [`SCHEDULED`], then the sealed account (sealed to `a/<device><version u64 BE>`) |
//! | `k/<device><public key>` | key id u64 BE, then the private key sealed to `k/<device><public key><key id u64 BE>` (schema 4: one record per one-time key, found by public key in one read) |
//! | `s/<device><session id>` | schema 1's sealed session pickle (migrated to `o/` on first use) |
//! | `o/<device><peer curve25519 key><session id>` | last used (u64 BE), version (u64 BE), then the session pickle sealed to the slot and that version ([`versioned`]); records written before sessions carried versions have no version field and are sealed to the slot alone (read as version 0) |
//! | `u/<user id>` | the sealed record of a tracked user's devices |
//! | `q/<device><room id>` | version (u64 BE), then the outbound Megolm session of a puppet device in a room sealed to the slot and that version; older records are the sealed record alone (version 0) |
//! | `h/<room len u32 BE><room id><session len u32 BE><session id><event id>` | a sealed room event held until its room key arrives |
//! | `g/<room len u32 BE><room id><session id>` | a sealed Megolm inbound group session record |
//! | `x/<room len u32 BE><room id><session len u32 BE><session id><index u32 BE>` | the event id that first decrypted at that message index (replay protection) |
//! | `d/<tag length u32 BE><tag><device><message>` | a sealed delivery record, until the delivery is acknowledged |
//! | `t/<namespace len u32 BE><namespace><txn id>` | empty: a completed homeserver transaction (see `transactions.rs`) |
//! | `r/<device>` | a puppet device provisioned on the homeserver that has no account record (a device with one keeps the flags in its account header instead): empty, or a flag byte (cross-signed), then the due time of its next rotation step u64 BE once scheduled (see `puppets.rs`) |
//! | `n/<due u64 BE><device>` | empty: the rotation schedule, so a pass reads only the devices due (see `puppets.rs`) |
//!
//! Before schema 4 a one-time key was two entries, `k/<device><key id u64
//! BE>` (public key, then the private key sealed to that slot) and an index
//! `p/<device><public key>` (key id), and every provisioned device had an
//! `r/` entry. Opening such a store rewrites them ([`crate::sled_store`]'s
//! upgrade): the constants and functions named `legacy_*` below (and [`otk_by_id`], which PostgreSQL still uses) exist for
//! that only.
//!
//! `<device>` is [`DeviceKey`]'s length-prefixed encoding, so prefixes of
//! different devices never overlap. A device's one-time keys are in public
//! key order, so the oldest (lowest id) are found by reading all of them
//! (at most the manager's outstanding-key bound) and sorting by id in
//! memory.

use crate::DeviceKey;

pub(crate) const SCHEMA: &[u8] = b"m/schema";
pub(crate) const KEY_CHECK: &[u8] = b"m/keycheck";
pub(crate) const KEY_IDS: &[u8] = b"m/keyids";
pub(crate) const STORE_ID: &[u8] = b"m/storeid";
/// Present while an upgrade to the current schema is under way.
pub(crate) const UPGRADING: &[u8] = b"m/upgrading";
pub(crate) const KEY_CHECK_PLAINTEXT: &[u8] = b"bridgekeys store key check v1";

fn join(tag: &[u8], device: &DeviceKey, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(tag.len() + device.as_bytes().len() + rest.len());
    k.extend_from_slice(tag);
    k.extend_from_slice(device.as_bytes());
    k.extend_from_slice(rest);
    k
}

pub(crate) const ACCOUNT_PREFIX: &[u8] = b"a/";

pub(crate) fn account(device: &DeviceKey) -> Vec<u8> {
    join(ACCOUNT_PREFIX, device, &[])
}

/// Account header flag: the device is a provisioned puppet device (what an
/// `r/` record says for a device without an account record).
pub(crate) const PUPPET: u8 = 0x01;
/// Account header flag: the puppet device is cross-signed.
pub(crate) const CROSS_SIGNED: u8 = 0x02;
/// Account header flag: the due time of the device's next rotation step
/// follows the version.
pub(crate) const SCHEDULED: u8 = 0x04;
const KNOWN_FLAGS: u8 = PUPPET | CROSS_SIGNED | SCHEDULED;

/// The highest account version the header can hold (7 bytes).
pub(crate) const MAX_ACCOUNT_VERSION: u64 = (1 << 56) - 1;

/// The puppet-registry part of an account record's header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PuppetHeader {
    /// [`PUPPET`] and [`CROSS_SIGNED`] (never [`SCHEDULED`]: `due` says it).
    pub(crate) flags: u8,
    /// The due time of the next rotation step, once scheduled.
    pub(crate) due: Option<u64>,
}

impl PuppetHeader {
    /// The header an `r/` record's value stands for (empty, or a flag byte
    /// (1: cross-signed) and the due time).
    pub(crate) fn from_registry_value(value: &[u8]) -> Self {
        let cross_signed = value.first() == Some(&1);
        Self {
            flags: PUPPET | if cross_signed { CROSS_SIGNED } else { 0 },
            due: value
                .get(1..9)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes),
        }
    }
}

/// A stored account value: `(header, version, sealed account)`; `None` if
/// it is too short or names flags this build does not know.
pub(crate) fn parse_account(raw: &[u8]) -> Option<(PuppetHeader, u64, &[u8])> {
    let flags = *raw.first()?;
    if flags & !KNOWN_FLAGS != 0 {
        return None;
    }
    let mut version = [0u8; 8];
    version[1..].copy_from_slice(raw.get(1..8)?);
    let (due, sealed) = if flags & SCHEDULED != 0 {
        let due = <[u8; 8]>::try_from(raw.get(8..16)?).ok()?;
        (Some(u64::from_be_bytes(due)), raw.get(16..)?)
    } else {
        (None, raw.get(8..)?)
    };
    let header = PuppetHeader {
        flags: flags & (PUPPET | CROSS_SIGNED),
        due,
    };
    Some((header, u64::from_be_bytes(version), sealed))
}

/// Append an account value's header to `out`; the sealed account follows.
/// `version` must be at most [`MAX_ACCOUNT_VERSION`] (checked by callers).
pub(crate) fn account_header_into(out: &mut Vec<u8>, header: PuppetHeader, version: u64) {
    let scheduled = if header.due.is_some() { SCHEDULED } else { 0 };
    let mut first = version.to_be_bytes();
    first[0] = (header.flags & (PUPPET | CROSS_SIGNED)) | scheduled;
    out.extend_from_slice(&first);
    if let Some(due) = header.due {
        out.extend_from_slice(&due.to_be_bytes());
    }
}

/// An account value with `header` in place of the one `raw` has (same
/// version and sealed account); `None` if `raw` does not parse.
pub(crate) fn with_header(raw: &[u8], header: PuppetHeader) -> Option<Vec<u8>> {
    let (_, version, sealed) = parse_account(raw)?;
    let mut out = Vec::with_capacity(16 + sealed.len());
    account_header_into(&mut out, header, version);
    out.extend_from_slice(sealed);
    Some(out)
}

/// The slot an account value is sealed to: its key plus its version, so an
/// old ciphertext cannot be presented as a newer version.
pub(crate) fn account_slot(device: &DeviceKey, version: u64) -> Vec<u8> {
    join(b"a/", device, &version.to_be_bytes())
}

pub(crate) fn otk_prefix(device: &DeviceKey) -> Vec<u8> {
    join(b"k/", device, &[])
}

/// The record key of a one-time key, and right after it the key id: the
/// whole buffer is what the private key is sealed to (device, public key and
/// key id, so a record cannot be moved to another device or public key, nor
/// its id field changed), and all but its last 8 bytes are the record's key
/// in the tree ([`otk_key`]). One allocation for both.
pub(crate) fn otk_seal_slot(device: &DeviceKey, public_key: &[u8; 32], key_id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + device.as_bytes().len() + 32 + 8);
    k.extend_from_slice(b"k/");
    k.extend_from_slice(device.as_bytes());
    k.extend_from_slice(public_key);
    k.extend_from_slice(&key_id.to_be_bytes());
    k
}

/// The tree key within an [`otk_seal_slot`] buffer.
pub(crate) fn otk_key(seal_slot: &[u8]) -> &[u8] {
    &seal_slot[..seal_slot.len().saturating_sub(8)]
}

pub(crate) fn otk(device: &DeviceKey, public_key: &[u8; 32]) -> Vec<u8> {
    join(b"k/", device, public_key)
}

/// Prefix of every one-time key record, all devices.
pub(crate) const OTK_PREFIX: &[u8] = b"k/";

/// Before schema 4: the public-key index of one-time keys, `p/<device><public key>`.
pub(crate) const LEGACY_OTK_INDEX_PREFIX: &[u8] = b"p/";

/// `k/<device><key id>`: the slot PostgreSQL seals a one-time key's private
/// key to, and on sled before schema 4 the key's record, which was also the
/// slot its private key was sealed to.
pub(crate) fn otk_by_id(device: &DeviceKey, key_id: u64) -> Vec<u8> {
    join(b"k/", device, &key_id.to_be_bytes())
}

/// Before schema 4: the public-key index entry of a one-time key.
pub(crate) fn legacy_otk_by_public(device: &DeviceKey, public_key: &[u8; 32]) -> Vec<u8> {
    join(LEGACY_OTK_INDEX_PREFIX, device, public_key)
}

pub(crate) fn session(device: &DeviceKey, session_id: &str) -> Vec<u8> {
    join(b"s/", device, session_id.as_bytes())
}

/// Every session of a device with one peer shares this prefix.
pub(crate) fn peer_sessions(device: &DeviceKey, peer_key: &[u8; 32]) -> Vec<u8> {
    join(b"o/", device, peer_key)
}

pub(crate) fn olm_session(device: &DeviceKey, peer_key: &[u8; 32], session_id: &str) -> Vec<u8> {
    let mut k = peer_sessions(device, peer_key);
    k.extend_from_slice(session_id.as_bytes());
    k
}

pub(crate) fn device_sessions(device: &DeviceKey) -> Vec<u8> {
    join(b"o/", device, &[])
}

pub(crate) fn legacy_session_prefix(device: &DeviceKey) -> Vec<u8> {
    join(b"s/", device, &[])
}

pub(crate) const ROOM_STATE_PREFIX: &[u8] = b"w/";

pub(crate) fn room_state(room_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + room_id.len());
    k.extend_from_slice(ROOM_STATE_PREFIX);
    k.extend_from_slice(room_id.as_bytes());
    k
}

pub(crate) fn cross_signing(user_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + user_id.len());
    k.extend_from_slice(b"c/");
    k.extend_from_slice(user_id.as_bytes());
    k
}

pub(crate) fn tracked_user(user_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + user_id.len());
    k.extend_from_slice(b"u/");
    k.extend_from_slice(user_id.as_bytes());
    k
}

fn room_prefixed(tag: &[u8], room_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(tag.len() + 4 + room_id.len() + 48);
    k.extend_from_slice(tag);
    k.extend_from_slice(&(room_id.len() as u32).to_be_bytes());
    k.extend_from_slice(room_id.as_bytes());
    k
}

pub(crate) fn outbound_group_session(device: &DeviceKey, room_id: &str) -> Vec<u8> {
    join(b"q/", device, room_id.as_bytes())
}

/// What a versioned record (an Olm session, an outbound Megolm session) is
/// sealed to: its slot, a `0xFF` byte, then its version, so an old
/// ciphertext cannot be presented as a newer version. Both kinds of slot
/// end in a UTF-8 id (a session id, a room id) after parts whose length is
/// fixed or prefixed, and UTF-8 never holds the byte `0xFF`: so a versioned
/// slot is never another record's plain slot. (Without the separator, the
/// slot of session `S` plus 8 version bytes could be the plain slot of a
/// session whose id is `S` followed by those bytes.) So a record from
/// before versions, sealed to the slot alone, does not open as a versioned
/// one, and the other way round.
pub(crate) fn versioned(slot: &[u8], version: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(slot.len() + 9);
    k.extend_from_slice(slot);
    k.push(0xFF);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

pub(crate) const HELD_PREFIX: &[u8] = b"h/";

pub(crate) fn held_session_prefix(room_id: &str, session_id: &str) -> Vec<u8> {
    let mut k = room_prefixed(HELD_PREFIX, room_id);
    k.extend_from_slice(&(session_id.len() as u32).to_be_bytes());
    k.extend_from_slice(session_id.as_bytes());
    k
}

pub(crate) fn held_event(room_id: &str, session_id: &str, event_id: &str) -> Vec<u8> {
    let mut k = held_session_prefix(room_id, session_id);
    k.extend_from_slice(event_id.as_bytes());
    k
}

/// The (room id, session id, event id) of a held event's key.
pub(crate) fn parse_held_event(key: &[u8]) -> Option<(String, String, String)> {
    let rest = key.strip_prefix(HELD_PREFIX)?;
    let take = |rest: &[u8]| -> Option<(String, usize)> {
        let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let s = std::str::from_utf8(rest.get(4..4 + len)?).ok()?.to_owned();
        Some((s, 4 + len))
    };
    let (room, used) = take(rest)?;
    let rest = &rest[used..];
    let (session, used) = take(rest)?;
    let event = std::str::from_utf8(&rest[used..]).ok()?.to_owned();
    Some((room, session, event))
}

pub(crate) fn group_session(room_id: &str, session_id: &str) -> Vec<u8> {
    let mut k = room_prefixed(b"g/", room_id);
    k.extend_from_slice(session_id.as_bytes());
    k
}

pub(crate) fn message_index(room_id: &str, session_id: &str, index: u32) -> Vec<u8> {
    let mut k = room_prefixed(b"x/", room_id);
    k.extend_from_slice(&(session_id.len() as u32).to_be_bytes());
    k.extend_from_slice(session_id.as_bytes());
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// `r/`: puppet devices without an account record.
pub(crate) const PUPPET_PREFIX: &[u8] = b"r/";

pub(crate) fn puppet(device: &DeviceKey) -> Vec<u8> {
    join(PUPPET_PREFIX, device, &[])
}

pub(crate) const ROTATION_PREFIX: &[u8] = b"n/";

/// The schedule entry of `device` due at `due_ms`: big-endian first, so a
/// range scan up to now yields exactly the devices due, earliest first.
pub(crate) fn rotation(due_ms: u64, device: &DeviceKey) -> Vec<u8> {
    let mut k = Vec::with_capacity(ROTATION_PREFIX.len() + 8 + device.as_bytes().len());
    k.extend_from_slice(ROTATION_PREFIX);
    k.extend_from_slice(&due_ms.to_be_bytes());
    k.extend_from_slice(device.as_bytes());
    k
}

/// All delivery records of one tag share this prefix.
pub(crate) fn delivery_prefix(tag: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(6 + tag.len());
    k.extend_from_slice(b"d/");
    k.extend_from_slice(&(tag.len() as u32).to_be_bytes());
    k.extend_from_slice(tag.as_bytes());
    k
}

pub(crate) fn delivery(tag: &str, device: &DeviceKey, message: &[u8]) -> Vec<u8> {
    let mut k = delivery_prefix(tag);
    k.extend_from_slice(device.as_bytes());
    k.extend_from_slice(message);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An account value from before schema 4 (8-byte version, top byte 0)
    /// reads as not a puppet with its version; a header round-trips with
    /// its flags and due time; a flag this build does not know, or a
    /// value cut short, is refused.
    #[test]
    fn an_account_header_reads_old_values_round_trips_and_refuses_unknown_flags() {
        let mut old = 7u64.to_be_bytes().to_vec();
        old.extend_from_slice(b"sealed");
        assert_eq!(
            parse_account(&old),
            Some((PuppetHeader::default(), 7, &b"sealed"[..]))
        );
        for header in [
            PuppetHeader {
                flags: PUPPET,
                due: None,
            },
            PuppetHeader {
                flags: PUPPET | CROSS_SIGNED,
                due: Some(u64::MAX - 1),
            },
        ] {
            let value = with_header(&old, header).expect("parses");
            assert_eq!(
                parse_account(&value),
                Some((header, 7, &b"sealed"[..])),
                "{header:?}"
            );
        }
        let mut unknown = old.clone();
        unknown[0] = 0x08;
        assert_eq!(parse_account(&unknown), None);
        let scheduled_but_short = [SCHEDULED, 0, 0, 0, 0, 0, 0, 1, 0, 0];
        assert_eq!(parse_account(&scheduled_but_short), None);
        assert_eq!(parse_account(&old[..5]), None);
    }

    #[test]
    fn a_versioned_slot_is_never_the_plain_slot_of_a_session_with_a_longer_id() {
        let device = DeviceKey::new("@a:x", "D");
        let peer = [7; 32];
        // Version bytes that are valid UTF-8, so they could end a session id.
        let version = u64::from_be_bytes(*b"12345678");
        let versioned_slot = versioned(&olm_session(&device, &peer, "abc"), version);
        assert_ne!(versioned_slot, olm_session(&device, &peer, "abc12345678"));
        let room = outbound_group_session(&device, "!r:x");
        assert_ne!(
            versioned(&room, version),
            outbound_group_session(&device, "!r:x12345678")
        );
    }
}
