//! Listing every record of a sled store for a migration
//! ([`crate::migrate::Export`]): one prefix scan per kind of record (see
//! [`crate::layout`]), each record opened with the store key. The rotation
//! schedule index (`n/`) and metadata are not listed: the target builds its
//! own from the records. A puppet device's registry entry is listed right
//! after its account when the account's header holds it, else from its
//! `r/` record.

use zeroize::Zeroizing;

use crate::{
    Delivery, DeviceKey, FIRST_KEY_ID, HeldEvent, OneTimeKeyRecord, SessionRecord, SledStore,
    StoreError, layout,
    migrate::{Export, Record},
};

/// The kinds of records, in the order they are listed: the key-id floor
/// first (nothing may be issued below it), accounts before their keys.
const PREFIXES: &[&[u8]] = &[
    b"a/", b"k/", b"o/", b"s/", b"d/", b"u/", b"q/", b"g/", b"x/", b"h/", b"w/", b"c/", b"t/",
    b"r/",
];

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt {
        what: format!("{what} (while exporting)"),
    }
}

/// A length-prefixed string off the front of `bytes`, and the rest.
fn take_str<'a>(bytes: &'a [u8], what: &str) -> Result<(String, &'a [u8]), StoreError> {
    let len = bytes
        .get(..4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| corrupt(what))? as usize;
    let s = bytes.get(4..4 + len).ok_or_else(|| corrupt(what))?;
    let s = std::str::from_utf8(s).map_err(|_| corrupt(what))?;
    Ok((s.to_owned(), &bytes[4 + len..]))
}

fn utf8(bytes: &[u8], what: &str) -> Result<String, StoreError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| corrupt(what))
}

fn u64_at(bytes: &[u8], what: &str) -> Result<u64, StoreError> {
    bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| corrupt(what))
}

impl SledStore {
    fn open_slot(
        &self,
        slot: &[u8],
        sealed: &[u8],
        what: &str,
    ) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        self.sealer.open(slot, sealed).ok_or_else(|| corrupt(what))
    }

    /// Decode the record at `key` (its tag `tag` included) with `value`:
    /// one record, and for an account whose header says it is a puppet
    /// device, its registry entry after it.
    fn decode_all(
        &self,
        tag: &[u8],
        key: &[u8],
        value: &[u8],
    ) -> Result<(Record, Option<Record>), StoreError> {
        if tag != layout::ACCOUNT_PREFIX {
            return Ok((self.decode(tag, key, value)?, None));
        }
        let (device, _) =
            DeviceKey::split_front(&key[tag.len()..]).ok_or_else(|| corrupt("account key"))?;
        let (header, version, sealed) =
            layout::parse_account(value).ok_or_else(|| corrupt("account header"))?;
        let data = self.open_slot(&layout::account_slot(&device, version), sealed, "account")?;
        let puppet = (header.flags & layout::PUPPET != 0).then(|| Record::Puppet {
            device: device.clone(),
            cross_signed: header.flags & layout::CROSS_SIGNED != 0,
            due_ms: header.due,
        });
        Ok((Record::Account { device, data }, puppet))
    }

    /// Decode the record at `key` (its tag `tag` included) with `value`.
    fn decode(&self, tag: &[u8], key: &[u8], value: &[u8]) -> Result<Record, StoreError> {
        let rest = &key[tag.len()..];
        let device = |what: &str| DeviceKey::split_front(rest).ok_or_else(|| corrupt(what));
        Ok(match tag {
            b"k/" => {
                let (device, public) = device("one-time key")?;
                let public_key =
                    <[u8; 32]>::try_from(public).map_err(|_| corrupt("one-time key public key"))?;
                let key_id = u64_at(value, "one-time key id")?;
                let secret = self.open_slot(
                    &layout::otk_seal_slot(&device, &public_key, key_id),
                    &value[8..],
                    "one-time key secret",
                )?;
                let secret_key = Zeroizing::new(
                    <[u8; 32]>::try_from(secret.as_slice())
                        .map_err(|_| corrupt("one-time key length"))?,
                );
                Record::OneTimeKey {
                    device,
                    key: OneTimeKeyRecord {
                        key_id,
                        public_key,
                        secret_key,
                    },
                }
            }
            b"o/" => {
                let (device, rest) = device("session")?;
                let peer_key = rest
                    .get(..32)
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .ok_or_else(|| corrupt("session peer"))?;
                let session_id = utf8(&rest[32..], "session id")?;
                let last_used = u64_at(value, "session record")?;
                let (_, pickle) = self
                    .open_versioned(key, &value[8..])
                    .ok_or_else(|| corrupt("session"))?;
                Record::Session {
                    device,
                    session: SessionRecord {
                        peer_key,
                        session_id,
                        last_used,
                        pickle,
                        // A copy is a new record in the target.
                        version: None,
                    },
                }
            }
            b"s/" => {
                let (device, id) = device("schema 1 session")?;
                Record::LegacySession {
                    device,
                    session_id: utf8(id, "schema 1 session id")?,
                }
            }
            b"d/" => {
                let (tag, rest) = take_str(rest, "delivery tag")?;
                let (device, message) =
                    DeviceKey::split_front(rest).ok_or_else(|| corrupt("delivery key"))?;
                let record = self.open_slot(key, value, "delivery record")?;
                Record::Delivery {
                    device,
                    delivery: Delivery {
                        tag,
                        message: message.to_vec(),
                        record,
                    },
                }
            }
            b"u/" => Record::TrackedUser {
                user_id: utf8(rest, "tracked user")?,
                data: self.open_slot(key, value, "tracked devices record")?,
            },
            b"q/" => {
                let (device, room) = device("outbound group session")?;
                Record::OutboundGroupSession {
                    device,
                    room_id: utf8(room, "outbound group session room")?,
                    data: self
                        .open_versioned(key, value)
                        .map(|(_, data)| data)
                        .ok_or_else(|| corrupt("outbound group session record"))?,
                }
            }
            b"g/" => {
                let (room_id, session) = take_str(rest, "group session room")?;
                Record::GroupSession {
                    room_id,
                    session_id: utf8(session, "group session id")?,
                    data: self.open_slot(key, value, "group session record")?,
                }
            }
            b"x/" => {
                let (room_id, rest) = take_str(rest, "message index room")?;
                let (session_id, rest) = take_str(rest, "message index session")?;
                let index = rest
                    .get(..4)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map(u32::from_be_bytes)
                    .ok_or_else(|| corrupt("message index"))?;
                Record::MessageIndex {
                    room_id,
                    session_id,
                    index,
                    event_id: utf8(value, "message index event")?,
                }
            }
            b"h/" => {
                let (room_id, session_id, event_id) =
                    layout::parse_held_event(key).ok_or_else(|| corrupt("held event key"))?;
                Record::HeldEvent(HeldEvent {
                    room_id,
                    session_id,
                    event_id,
                    record: self.open_slot(key, value, "held event")?,
                })
            }
            b"w/" => Record::RoomState {
                room_id: utf8(rest, "room state key")?,
                data: self.open_slot(key, value, "room state record")?,
            },
            b"c/" => Record::CrossSigning {
                user_id: utf8(rest, "cross-signing key")?,
                data: self.open_slot(key, value, "cross-signing record")?,
            },
            b"t/" => {
                let (namespace, id) = take_str(rest, "transaction namespace")?;
                Record::Transaction {
                    namespace,
                    txn_id: utf8(id, "transaction id")?,
                }
            }
            b"r/" => {
                let (device, _) = device("puppet")?;
                Record::Puppet {
                    device,
                    cross_signed: value.first() == Some(&1),
                    due_ms: value
                        .get(1..9)
                        .and_then(|b| <[u8; 8]>::try_from(b).ok())
                        .map(u64::from_be_bytes),
                }
            }
            _ => return Err(corrupt("record kind")),
        })
    }
}

impl Export for SledStore {
    fn records(&self) -> Box<dyn Iterator<Item = Result<Record, StoreError>> + '_> {
        let floor = std::iter::once_with(move || {
            Ok(Record::KeyIdFloor(match self.db.get(layout::KEY_IDS)? {
                None => FIRST_KEY_ID,
                Some(raw) => u64_at(&raw, "key id mark")?,
            }))
        });
        let records = PREFIXES.iter().flat_map(move |tag| {
            self.db.scan_prefix(tag).flat_map(move |item| {
                let decoded = item
                    .map_err(StoreError::from)
                    .and_then(|(key, value)| self.decode_all(tag, &key, &value));
                let (first, second) = match decoded {
                    Ok((first, second)) => (Ok(first), second.map(Ok)),
                    Err(e) => (Err(e), None),
                };
                std::iter::once(first).chain(second)
            })
        });
        Box::new(floor.chain(records))
    }
}
