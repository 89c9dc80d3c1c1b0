"""An Olm peer we did not write: a matrix-nio client doing its own Olm.

The bridgekeys testkit runs this script (embedded in the crate, written to a
temporary file) with a venv holding matrix-nio 0.25.x and python-olm 3.2.x
(libolm, C/C++: a different Olm implementation from the vodozemac our bridge
uses). Everything Olm here is nio's code: key upload, keys/query with device
signature checks, keys/claim with one-time-key signature checks, session
creation, payload building, encryption, decryption and payload checks.

Protocol: one JSON object per line on stdin, one JSON answer line per command
on stdout; logs go to stderr only. The first line written is a readiness line
({"ok":true,"ready":true,"versions":{...}}). Every answer echoes the
command's "id" (if any) and is {"ok":true,...} or {"ok":false,"error":...}.

Commands:
  {"cmd":"login","homeserver":URL,"user_id":U,"password":P,
   "device_id":D (optional),"store_dir":DIR}
      -> {"ok":true,"user_id","device_id","curve25519","ed25519"}
  {"cmd":"send_olm","user_id":U,"device_id":D,"type":T,"content":{...},
   "refresh_keys":false (optional: keys/query even if the device is known)}
      -> {"ok":true,"message_type":0|1,"session_id","claimed_one_time_key",
          "recipient_curve25519"}
  {"cmd":"wait_to_device","type":T,"timeout_ms":N}
      -> {"ok":true,"sender","sender_key","sender_device","type","content",
          "message_type","verified_payload":true,"keys","recipient",
          "recipient_keys","sender_device_keys","keys_match"}
         or {"ok":false,"error":"timeout"}
         or {"ok":false,"error":"undecryptable: ..."}
  {"cmd":"create_room","invite":[U...],"encrypted":true,"is_direct":true,
   "name":N (optional)}
      -> {"ok":true,"room_id"} once nio's own room state has the room
  {"cmd":"invite","room_id":R,"user_id":U} -> {"ok":true}
  {"cmd":"join","room_id":R} -> {"ok":true,"room_id"} once nio sees us joined
  {"cmd":"leave","room_id":R} -> {"ok":true}
  {"cmd":"wait_joined","room_id":R,"user_id":U,"timeout_ms":N}
      -> {"ok":true,"joined":[U...]} or {"ok":false,"error":"timeout"}
  {"cmd":"room_send","room_id":R,"body":B,"msgtype":"m.text" (optional)}
      -> {"ok":true,"event_id","encrypted","session_id","shared_with":[[U,D]...],
          "elapsed_ms"}
  {"cmd":"wait_room_message","room_id":R,"sender":U (optional),
   "body_prefix":P (optional),"timeout_ms":N}
      -> {"ok":true,"room_id","event_id","sender","sender_device","body",
          "msgtype","content","decrypted","verified","session_id","sender_key",
          "message_index"}
         or {"ok":false,"error":"timeout"}
         or {"ok":false,"error":"undecryptable: ...","room_id","event_id",
             "sender","sender_device","session_id","sender_key"}
  {"cmd":"quit"} -> {"ok":true}, then the process exits.

Room messages (m.room.message, decrypted by nio or sent in the clear) and
encrypted room events nio could not decrypt are queued as syncs bring them,
whichever command synced, each event once (a rejoined room's timeline
repeats its history); wait_room_message takes the first queued one that
matches, so a message that came during another command is not lost.
"""

import asyncio
import base64
import binascii
import json
import logging
import os
import sys
import traceback

# Answers own the real stdout; anything else that writes to fd 1 (a stray
# print, a C library) lands on stderr instead of corrupting the protocol.
PROTOCOL = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
os.dup2(2, 1)
sys.stdout = sys.stderr

logging.basicConfig(
    stream=sys.stderr,
    level=logging.INFO,
    format="%(asctime)s %(name)s %(levelname)s %(message)s",
)
log = logging.getLogger("olm_peer")

# Per command, unless the command says otherwise (wait_to_device).
COMMAND_TIMEOUT_S = 60
# Longest single /sync long-poll while waiting.
SYNC_POLL_MS = 10_000
# To-device messages, key counts, device lists and joined rooms' state and
# timelines (full member lists: nio shares room keys with the members it
# knows); no presence, account data, typing or receipts.
SYNC_FILTER = {
    "presence": {"types": []},
    "account_data": {"types": []},
    "room": {
        "ephemeral": {"types": []},
        "account_data": {"types": []},
        "state": {"lazy_load_members": False},
        "timeline": {"limit": 100},
    },
}
# How long create_room and join sync until nio's room state shows the room.
ROOM_STATE_TIMEOUT_MS = 30_000


def answer(obj):
    PROTOCOL.write(json.dumps(obj) + "\n")
    PROTOCOL.flush()


try:
    from importlib import metadata

    from nio import (
        AsyncClient,
        AsyncClientConfig,
        BadEvent,
        JoinResponse,
        KeysClaimResponse,
        KeysQueryResponse,
        KeysUploadResponse,
        LoginResponse,
        MegolmEvent,
        RoomCreateResponse,
        RoomInviteResponse,
        RoomLeaveResponse,
        RoomMessage,
        RoomSendResponse,
        SyncResponse,
        ToDeviceMessage,
        ToDeviceResponse,
        UnknownBadEvent,
    )
    from nio.crypto import ENCRYPTION_ENABLED
    from nio.exceptions import EncryptionError
    from nio.events.to_device import OlmEvent
    from nio.responses import SyncResponse as _SyncResponse

    VERSIONS = {
        "matrix-nio": metadata.version("matrix-nio"),
        "python-olm": metadata.version("python-olm"),
        "python": sys.version.split()[0],
    }
    if not ENCRYPTION_ENABLED:
        raise ImportError("nio's encryption support is off (python-olm missing?)")
except Exception as e:  # noqa: BLE001 - reported, then exit
    answer({"ok": False, "ready": False, "error": f"cannot load matrix-nio with Olm: {e!r}"})
    sys.exit(1)


def megolm_message_index(ciphertext):
    """The message index of a Megolm message (the m.room.encrypted
    content's "ciphertext"), read from the message itself: unpadded base64
    of a version byte 0x03, then protobuf field 1 (tag 0x08), a varint: the
    index. The same index libolm's InboundGroupSession.decrypt returns (nio
    drops it). None if the message is not laid out that way."""
    if not isinstance(ciphertext, str):
        return None
    try:
        raw = base64.b64decode(ciphertext + "=" * (-len(ciphertext) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) < 3 or raw[0] != 0x03 or raw[1] != 0x08:
        return None
    index, shift = 0, 0
    for byte in raw[2:7]:
        index |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return index
        shift += 7
    return None


class PeerError(Exception):
    """A command failed; the message is the answer's "error"."""


class NioLog(logging.Handler):
    """Collects what nio logs while a block runs: nio reports most Olm
    failures only through its logger, and we want them in our answers."""

    def __init__(self):
        super().__init__(level=logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(f"{record.levelname}: {record.getMessage()}")

    def __enter__(self):
        logging.getLogger("nio").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("nio").removeHandler(self)
        return False

    def text(self):
        return "; ".join(self.lines) if self.lines else "(nio logged nothing)"


def field(cmd, name, kind):
    if name not in cmd:
        raise PeerError(f"missing field {name!r}")
    value = cmd[name]
    if not isinstance(value, kind):
        raise PeerError(f"field {name!r} has the wrong type")
    return value


def timeout_of(cmd):
    timeout_ms = cmd.get("timeout_ms", 30_000)
    if not isinstance(timeout_ms, int) or isinstance(timeout_ms, bool) or timeout_ms < 0:
        raise PeerError("field 'timeout_ms' must be a non-negative integer")
    return timeout_ms


def error_of(response):
    """nio answers errors as ErrorResponse objects, not exceptions."""
    return f"{type(response).__name__}: {response}"


class Peer:
    def __init__(self):
        self.client = None
        # Olm payloads nio decrypted and accepted, oldest first.
        self.inbox = []
        # Olm to-device events nio did not decrypt or accept, oldest first.
        self.failures = []
        self._current_event = None
        self._accepted = False
        # Room messages and undecryptable encrypted room events, oldest
        # first (see collect_room_event).
        self.room_inbox = []
        # Per Megolm event id: what nio's decryption of it said (a failure
        # reason, or the sending device of a decrypted one).
        self.megolm_failures = {}
        self.megolm_devices = {}
        # Per decrypted Megolm event id: the message index it had.
        self.megolm_indices = {}
        # Room events queued so far, by id: a sync can bring an event again
        # (a rejoined room's timeline repeats the history), it is queued once.
        self.seen_room_events = set()
        # Events this peer sent (wait_room_message without a sender skips
        # them) and what nio's encrypt() produced during the last room_send.
        self.sent_event_ids = set()
        self._last_encrypted = None

    # --- hooks into nio -------------------------------------------------

    def install_hooks(self, olm):
        """Observe nio's own to-device decryption without replacing it.

        nio decrypts Olm to-device events in Olm.handle_to_device_event ->
        Olm.decrypt_event -> Olm.decrypt, which (nio 0.25.2) creates or picks
        the session, decrypts, parses the JSON, validates it against
        Schemas.olm_event (requires type, sender, keys, recipient,
        recipient_keys, content) and runs Olm._verify_olm_payload (sender ==
        the event's sender, recipient == our user id, recipient_keys.ed25519
        == our ed25519 key). Only when all of that passed does it call
        Olm._handle_olm_event(sender, sender_key, payload). That is where we
        record the payload, so a recorded payload is one nio verified. nio
        itself drops payloads of types other than m.room_key,
        m.forwarded_room_key and m.dummy (logs "unsupported Olm event"), which
        is why we record before calling it. nio does NOT compare
        keys.ed25519 with the sender's device keys; wait_to_device reports
        that comparison separately as "keys_match".

        Failures inside decrypt() only go to nio's log and make it return
        None; the wrapper around handle_to_device_event turns "an Olm event
        went in and no verified payload came out" into a recorded failure
        with nio's log lines as the reason.
        """
        original_handle = olm.handle_to_device_event
        original_olm_event = olm._handle_olm_event

        def handle_to_device_event(event):
            if not isinstance(event, OlmEvent):
                return original_handle(event)
            self._current_event = event
            self._accepted = False
            result = None
            with NioLog() as logs:
                try:
                    result = original_handle(event)
                except Exception as e:  # noqa: BLE001 - nio raised; report it
                    log.exception("nio raised while handling an Olm event")
                    logs.lines.append(f"nio raised {e!r}")
                finally:
                    self._current_event = None
            if not self._accepted:
                own = event.ciphertext.get(olm.account.identity_keys["curve25519"])
                kind = "no ciphertext for our key" if own is None else f"message type {own.get('type')}"
                sessions = len(olm.session_store[event.sender_key])
                self.failures.append(
                    f"Olm event from {event.sender} (sender_key {event.sender_key}, {kind}, "
                    f"{sessions} known session(s) with that key) was not decrypted/accepted "
                    f"by nio: {logs.text()}"
                )
            return result

        def handle_olm_event(sender, sender_key, payload):
            self._accepted = True
            message_type = None
            event = self._current_event
            if event is not None:
                own = event.ciphertext.get(olm.account.identity_keys["curve25519"], {})
                message_type = own.get("type")
            self.inbox.append(
                {
                    "sender": sender,
                    "sender_key": sender_key,
                    "payload": payload,
                    "message_type": message_type,
                }
            )
            return original_olm_event(sender, sender_key, payload)

        olm.handle_to_device_event = handle_to_device_event
        olm._handle_olm_event = handle_olm_event

        # Megolm: nio decrypts every m.room.encrypted timeline event in
        # BaseClient._handle_timeline_event through
        # Olm._decrypt_megolm_no_error, which (nio 0.25.2) is
        # decrypt_megolm_event with EncryptionError turned into None: the
        # reason (no session with that id for this room, a libolm error,
        # a replayed message index) only reaches nio's log. This wrapper does
        # exactly the same and keeps the reason, by event id, for
        # collect_room_event; a payload nio decrypted but rejected (schema)
        # comes back as a BadEvent, and is recorded as a failure too.
        def decrypt_megolm_no_error(event, room_id=None):
            try:
                result = olm.decrypt_megolm_event(event, room_id)
            except EncryptionError as e:
                self.megolm_failures[event.event_id] = str(e)
                return None
            if isinstance(result, (BadEvent, UnknownBadEvent)):
                self.megolm_failures[event.event_id] = (
                    f"nio decrypted it but rejected the payload: {result}"
                )
            else:
                self.megolm_devices[event.event_id] = event.device_id
                self.megolm_indices[event.event_id] = megolm_message_index(event.ciphertext)
            return result

        olm._decrypt_megolm_no_error = decrypt_megolm_no_error

    def install_client_hooks(self, client):
        """Observe what nio's room_send encrypts: AsyncClient.room_send calls
        self.encrypt(room_id, type, content) (Olm.group_encrypt with the
        room's outbound group session) exactly when the room is encrypted;
        the result names the Megolm session actually used."""
        original_encrypt = client.encrypt

        def encrypt(room_id, message_type, content):
            result = original_encrypt(room_id, message_type, content)
            self._last_encrypted = (room_id, result[1])
            return result

        client.encrypt = encrypt

    def collect_room_event(self, room_id, event):
        """Queue a joined room's timeline event, after nio handled the sync
        (nio has then replaced each Megolm event it could decrypt by the
        decrypted event, in place)."""
        source = getattr(event, "source", None)
        source = source if isinstance(source, dict) else {}
        event_id = getattr(event, "event_id", None) or source.get("event_id")
        if (room_id, event_id) in self.seen_room_events:
            self.megolm_failures.pop(event_id, None)
            self.megolm_devices.pop(event_id, None)
            self.megolm_indices.pop(event_id, None)
            return
        if isinstance(event, (MegolmEvent, BadEvent, UnknownBadEvent, RoomMessage)):
            self.seen_room_events.add((room_id, event_id))
        if isinstance(event, MegolmEvent):
            self.megolm_devices.pop(event_id, None)
            self.megolm_indices.pop(event_id, None)
            self.room_inbox.append(
                {
                    "kind": "undecryptable",
                    "room_id": room_id,
                    "event_id": event_id,
                    "sender": event.sender,
                    "sender_device": event.device_id,
                    "session_id": event.session_id,
                    "sender_key": event.sender_key,
                    "reason": self.megolm_failures.pop(
                        event_id, "nio did not decrypt it (no reason recorded)"
                    ),
                }
            )
        elif isinstance(event, (BadEvent, UnknownBadEvent)):
            if event_id in self.megolm_failures:
                reason = self.megolm_failures.pop(event_id)
            elif source.get("type") == "m.room.encrypted":
                # e.g. content without sender_key or device_id: nio 0.25.2's
                # schema requires both, so the event never reaches Megolm.
                reason = f"nio's parser rejected the encrypted event: {event}"
            else:
                log.warning("room %s: nio could not parse event %s: %s", room_id, event_id, event)
                return
            content = source.get("content") if isinstance(source.get("content"), dict) else {}
            self.room_inbox.append(
                {
                    "kind": "undecryptable",
                    "room_id": room_id,
                    "event_id": event_id,
                    "sender": source.get("sender") or getattr(event, "sender", None),
                    "sender_device": content.get("device_id"),
                    "session_id": content.get("session_id"),
                    "sender_key": content.get("sender_key"),
                    "reason": reason,
                }
            )
        elif isinstance(event, RoomMessage):
            content = source.get("content") if isinstance(source.get("content"), dict) else {}
            body = getattr(event, "body", None)
            self.room_inbox.append(
                {
                    "kind": "message",
                    "room_id": room_id,
                    "event_id": event_id,
                    "sender": event.sender,
                    "sender_device": self.megolm_devices.pop(event_id, None),
                    "body": body if isinstance(body, str) else content.get("body"),
                    "msgtype": content.get("msgtype"),
                    "content": content,
                    "decrypted": bool(event.decrypted),
                    "verified": bool(event.verified),
                    "session_id": event.session_id,
                    "sender_key": event.sender_key,
                    "message_index": self.megolm_indices.pop(event_id, None),
                }
            )

    def record_unparsed(self, raw_events, parsed, nio_log):
        """m.room.encrypted to-device events nio's parser turned into
        BadEvent/None never reach the Olm machine; report them too."""
        for raw, event in zip(raw_events, parsed):
            if not isinstance(raw, dict) or raw.get("type") != "m.room.encrypted":
                continue
            if isinstance(event, OlmEvent):
                continue
            algorithm = (raw.get("content") or {}).get("algorithm")
            why = (
                "dropped it (unknown algorithm or empty content)"
                if event is None
                else f"rejected it as {type(event).__name__} ({nio_log})"
            )
            self.failures.append(
                f"m.room.encrypted to-device event from {raw.get('sender')} "
                f"(algorithm {algorithm}) never reached nio's Olm machine: nio's parser {why}"
            )

    # --- commands --------------------------------------------------------

    def need_login(self):
        if self.client is None or self.client.olm is None:
            raise PeerError("not logged in")
        return self.client, self.client.olm

    async def login(self, cmd):
        if self.client is not None:
            raise PeerError("already logged in (one account per peer process)")
        homeserver = field(cmd, "homeserver", str)
        user_id = field(cmd, "user_id", str)
        password = field(cmd, "password", str)
        store_dir = field(cmd, "store_dir", str)
        device_id = cmd.get("device_id") or ""
        os.makedirs(store_dir, exist_ok=True)
        config = AsyncClientConfig(
            encryption_enabled=True,
            store_sync_tokens=True,
            max_timeouts=2,
            max_limit_exceeded=3,
            request_timeout=30,
        )
        client = AsyncClient(
            homeserver, user_id, device_id=device_id, store_path=store_dir, config=config
        )
        response = await client.login(password=password, device_name="bridgekeys olm peer (matrix-nio)")
        if not isinstance(response, LoginResponse):
            await client.close()
            raise PeerError(f"login failed: {error_of(response)}")
        if client.olm is None:
            await client.close()
            raise PeerError("nio did not load its Olm machine after login")
        self.client = client
        self.install_hooks(client.olm)
        self.install_client_hooks(client)
        # nio's own decision: a fresh account uploads device keys and
        # one-time keys (Olm.share_keys signs them).
        if client.should_upload_keys:
            uploaded = await client.keys_upload()
            if not isinstance(uploaded, KeysUploadResponse):
                raise PeerError(f"keys/upload failed: {error_of(uploaded)}")
        keys = client.olm.account.identity_keys
        return {
            "ok": True,
            "user_id": client.user_id,
            "device_id": client.device_id,
            "curve25519": keys["curve25519"],
            "ed25519": keys["ed25519"],
        }

    async def query_keys(self, user_id):
        client, olm = self.need_login()
        olm.users_for_key_query.add(user_id)
        with NioLog() as logs:
            response = await client.keys_query()
        if not isinstance(response, KeysQueryResponse):
            raise PeerError(f"keys/query failed: {error_of(response)}")
        return response, logs

    async def send_olm(self, cmd):
        client, olm = self.need_login()
        user_id = field(cmd, "user_id", str)
        device_id = field(cmd, "device_id", str)
        event_type = field(cmd, "type", str)
        content = field(cmd, "content", dict)

        device = olm.device_store[user_id].get(device_id)
        if device is None or device.deleted or cmd.get("refresh_keys"):
            # nio's keys/query handling checks user/device ids and the
            # device's self-signature before storing its keys.
            response, logs = await self.query_keys(user_id)
            device = olm.device_store[user_id].get(device_id)
            if device is None or device.deleted:
                raise PeerError(
                    f"no usable device keys for {user_id} {device_id} after keys/query "
                    f"(failures: {response.failures}; nio: {logs.text()})"
                )

        claimed = False
        session = olm.session_store.get(device.curve25519)
        if session is None:
            # nio's keys/claim handling (Olm._handle_key_claiming) checks the
            # one-time key's signature with the device's ed25519 key and only
            # then creates an outbound session.
            with NioLog() as logs:
                response = await client.keys_claim({user_id: [device_id]})
            if not isinstance(response, KeysClaimResponse):
                raise PeerError(f"keys/claim failed: {error_of(response)}")
            session = olm.session_store.get(device.curve25519)
            if session is None:
                got = {u: {d: list(k) for d, k in ds.items()} for u, ds in response.one_time_keys.items()}
                raise PeerError(
                    f"no Olm session after keys/claim (one_time_keys: {got}, "
                    f"failures: {response.failures}; nio: {logs.text()})"
                )
            claimed = True

        # nio builds the payload (sender, sender_device, keys, recipient,
        # recipient_keys, type, content), encrypts and saves the session.
        encrypted = olm._olm_encrypt(session, device, event_type, content)
        message_type = encrypted["ciphertext"][device.curve25519]["type"]
        sent = await client.to_device(
            ToDeviceMessage("m.room.encrypted", user_id, device_id, encrypted)
        )
        if not isinstance(sent, ToDeviceResponse):
            raise PeerError(f"sendToDevice failed: {error_of(sent)}")
        return {
            "ok": True,
            "message_type": message_type,
            "session_id": session.id,
            "claimed_one_time_key": claimed,
            "recipient_curve25519": device.curve25519,
        }

    async def sync_once(self, poll_ms):
        client, _ = self.need_login()
        response = await client.sync(timeout=poll_ms, sync_filter=SYNC_FILTER)
        if not isinstance(response, SyncResponse):
            raise PeerError(f"sync failed: {error_of(response)}")
        for room_id, info in response.rooms.join.items():
            if info.timeline.limited:
                log.warning("room %s: the sync's timeline was limited, older events missed", room_id)
            for event in info.timeline.events:
                self.collect_room_event(room_id, event)
        # What nio's sync_forever does between syncs: replenish one-time
        # keys, send queued to-device messages (e.g. m.dummy to unwedge a
        # session), query changed devices, claim keys for wedged sessions.
        if client.should_upload_keys:
            await client.keys_upload()
        if client.outgoing_to_device_messages:
            await client.send_to_device_messages()
        if client.should_query_keys:
            await client.keys_query()
        if client.should_claim_keys:
            await client.keys_claim(client.get_users_for_key_claiming())

    async def wait_to_device(self, cmd):
        _, olm = self.need_login()
        event_type = field(cmd, "type", str)
        timeout_ms = timeout_of(cmd)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_ms / 1000
        while True:
            if self.failures:
                raise PeerError("undecryptable: " + self.failures.pop(0))
            for index, item in enumerate(self.inbox):
                if item["payload"]["type"] == event_type:
                    del self.inbox[index]
                    return await self.deliver(olm, item)
            remaining_ms = int((deadline - loop.time()) * 1000)
            if remaining_ms <= 0:
                return {"ok": False, "error": "timeout"}
            await self.sync_once(min(remaining_ms, SYNC_POLL_MS))

    async def deliver(self, olm, item):
        sender, sender_key, payload = item["sender"], item["sender_key"], item["payload"]
        # Not a nio check (nio never makes it): does the payload's
        # keys.ed25519 belong to the device that owns sender_key, per a
        # keys/query answer whose signatures nio verified?
        device = olm.device_store.device_from_sender_key(sender, sender_key)
        if device is None:
            try:
                await self.query_keys(sender)
            except PeerError as e:
                log.warning("keys/query for %s failed: %s", sender, e)
            device = olm.device_store.device_from_sender_key(sender, sender_key)
        keys = payload.get("keys") or {}
        return {
            "ok": True,
            "sender": sender,
            "sender_key": sender_key,
            "sender_device": payload.get("sender_device"),
            "type": payload["type"],
            "content": payload["content"],
            "message_type": item["message_type"],
            "verified_payload": True,
            "keys": keys,
            "recipient": payload.get("recipient"),
            "recipient_keys": payload.get("recipient_keys"),
            "sender_device_keys": (
                None
                if device is None
                else {"device_id": device.id, "ed25519": device.ed25519, "curve25519": device.curve25519}
            ),
            "keys_match": None if device is None else keys.get("ed25519") == device.ed25519,
        }

    # --- rooms (nio's own Megolm) -------------------------------------------

    async def sync_until(self, done, timeout_ms):
        """Sync until done() holds; False if the time ran out first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_ms / 1000
        while True:
            if done():
                return True
            remaining_ms = int((deadline - loop.time()) * 1000)
            if remaining_ms <= 0:
                return False
            await self.sync_once(min(remaining_ms, SYNC_POLL_MS))

    def joined(self, room_id, user_id):
        room = self.client.rooms.get(room_id)
        if room is None:
            return False
        user = room.users.get(user_id)
        return user is not None and not user.invited

    async def create_room(self, cmd):
        client, _ = self.need_login()
        invite = cmd.get("invite", [])
        if not isinstance(invite, list) or not all(isinstance(u, str) for u in invite):
            raise PeerError("field 'invite' must be a list of user ids")
        encrypted = cmd.get("encrypted", True)
        is_direct = cmd.get("is_direct", False)
        name = cmd.get("name")
        if not isinstance(encrypted, bool) or not isinstance(is_direct, bool):
            raise PeerError("fields 'encrypted' and 'is_direct' must be booleans")
        if name is not None and not isinstance(name, str):
            raise PeerError("field 'name' must be a string")
        initial_state = []
        if encrypted:
            initial_state.append(
                {
                    "type": "m.room.encryption",
                    "state_key": "",
                    "content": {"algorithm": "m.megolm.v1.aes-sha2"},
                }
            )
        response = await client.room_create(
            name=name, is_direct=is_direct, invite=invite, initial_state=initial_state
        )
        if not isinstance(response, RoomCreateResponse):
            raise PeerError(f"createRoom failed: {error_of(response)}")
        room_id = response.room_id
        # nio learns of the room (and that it is encrypted) only from a sync.
        if not await self.sync_until(lambda: self.joined(room_id, client.user_id), ROOM_STATE_TIMEOUT_MS):
            raise PeerError(f"created {room_id}, but nio's syncs did not show it joined")
        room = client.rooms[room_id]
        if room.encrypted != encrypted:
            raise PeerError(f"created {room_id}, but nio sees encrypted={room.encrypted}")
        return {"ok": True, "room_id": room_id}

    async def invite(self, cmd):
        client, _ = self.need_login()
        room_id = field(cmd, "room_id", str)
        user_id = field(cmd, "user_id", str)
        response = await client.room_invite(room_id, user_id)
        if not isinstance(response, RoomInviteResponse):
            raise PeerError(f"invite failed: {error_of(response)}")
        return {"ok": True}

    async def join(self, cmd):
        client, _ = self.need_login()
        room_id = field(cmd, "room_id", str)
        response = await client.join(room_id)
        if not isinstance(response, JoinResponse):
            raise PeerError(f"join failed: {error_of(response)}")
        room_id = response.room_id
        if not await self.sync_until(lambda: self.joined(room_id, client.user_id), ROOM_STATE_TIMEOUT_MS):
            raise PeerError(f"joined {room_id}, but nio's syncs did not show it")
        return {"ok": True, "room_id": room_id}

    async def leave(self, cmd):
        client, _ = self.need_login()
        room_id = field(cmd, "room_id", str)
        response = await client.room_leave(room_id)
        if not isinstance(response, RoomLeaveResponse):
            raise PeerError(f"leave failed: {error_of(response)}")
        # nio 0.25.2 ignores the "leave" section of /sync: it would keep the
        # room, with us as a joined member, for ever. Forget it here (a
        # rejoin's sync brings its full state again; nio remembers that it is
        # encrypted), and drop nio's outbound group session for it, so that
        # after a rejoin nio shares a fresh one with the members then.
        client.rooms.pop(room_id, None)
        client.invalidate_outbound_session(room_id)
        return {"ok": True}

    async def wait_joined(self, cmd):
        client, _ = self.need_login()
        room_id = field(cmd, "room_id", str)
        user_id = field(cmd, "user_id", str)
        timeout_ms = timeout_of(cmd)
        if not await self.sync_until(lambda: self.joined(room_id, user_id), timeout_ms):
            return {"ok": False, "error": "timeout"}
        room = client.rooms[room_id]
        return {"ok": True, "joined": sorted(u for u, m in room.users.items() if not m.invited)}

    async def room_send(self, cmd):
        client, olm = self.need_login()
        room_id = field(cmd, "room_id", str)
        body = field(cmd, "body", str)
        msgtype = cmd.get("msgtype", "m.text")
        if not isinstance(msgtype, str):
            raise PeerError("field 'msgtype' must be a string")
        if room_id not in client.rooms:
            raise PeerError(f"nio does not know room {room_id} (create_room or join it first)")
        # What a client's sync loop would have done just before: take in
        # device-list changes (a member's new device) and membership changes,
        # and keys/query the changed users (sync_once); nio invalidates the
        # room's outbound group session when a member's devices changed.
        await self.sync_once(0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._last_encrypted = None
        # nio's room_send, for an encrypted room: /joined_members and
        # keys/query unless the members are synced already, then (when no
        # outbound group session is shared yet, or it expired or was
        # invalidated) share_group_session: keys/claim for devices without
        # an Olm session, m.room_key over Olm to every device of every
        # member (joined or invited), then group_encrypt. Devices nobody
        # verified get the key too, marked "ignored", because we pass
        # ignore_unverified_devices=True (otherwise nio raises
        # OlmUnverifiedDeviceError).
        with NioLog() as logs:
            response = await client.room_send(
                room_id,
                "m.room.message",
                {"msgtype": msgtype, "body": body},
                ignore_unverified_devices=True,
            )
        elapsed_ms = int((loop.time() - started) * 1000)
        if not isinstance(response, RoomSendResponse):
            raise PeerError(f"room send failed: {error_of(response)} (nio: {logs.text()})")
        self.sent_event_ids.add(response.event_id)
        encrypted = self._last_encrypted is not None and self._last_encrypted[0] == room_id
        session_id = self._last_encrypted[1]["session_id"] if encrypted else None
        shared_with = []
        session = olm.outbound_group_sessions.get(room_id)
        if encrypted and session is not None and session.id == session_id:
            shared_with = sorted([u, d] for u, d in session.users_shared_with)
        return {
            "ok": True,
            "event_id": response.event_id,
            "encrypted": encrypted,
            "session_id": session_id,
            "shared_with": shared_with,
            "elapsed_ms": elapsed_ms,
        }

    async def wait_room_message(self, cmd):
        self.need_login()
        room_id = field(cmd, "room_id", str)
        sender = cmd.get("sender")
        prefix = cmd.get("body_prefix")
        if sender is not None and not isinstance(sender, str):
            raise PeerError("field 'sender' must be a string")
        if prefix is not None and not isinstance(prefix, str):
            raise PeerError("field 'body_prefix' must be a string")
        timeout_ms = timeout_of(cmd)

        def take():
            for index, entry in enumerate(self.room_inbox):
                if entry["room_id"] != room_id:
                    continue
                if sender is not None and entry["sender"] != sender:
                    continue
                if sender is None and entry["event_id"] in self.sent_event_ids:
                    continue
                if entry["kind"] == "message" and prefix is not None:
                    if not (entry["body"] or "").startswith(prefix):
                        continue
                del self.room_inbox[index]
                return entry
            return None

        entry = None

        def found():
            nonlocal entry
            entry = take()
            return entry is not None

        if not await self.sync_until(found, timeout_ms):
            return {"ok": False, "error": "timeout"}
        entry = dict(entry)
        kind = entry.pop("kind")
        if kind == "message":
            return {"ok": True, **entry}
        reason = entry.pop("reason")
        if self.failures:
            # A room key that failed to arrive over Olm is the usual cause.
            reason += f" (Olm to-device failures not yet reported: {'; '.join(self.failures)})"
        return {"ok": False, "error": f"undecryptable: {reason}", **entry}

    async def close(self):
        if self.client is not None:
            await self.client.close()


PEER = Peer()

# nio parses sync to-device events in SyncResponse._get_to_device; wrap it
# to see encrypted events the parser rejected (they never reach Olm).
_original_get_to_device = _SyncResponse._get_to_device


def _get_to_device(parsed_dict):
    with NioLog() as logs:
        events = _original_get_to_device(parsed_dict)
    PEER.record_unparsed(parsed_dict.get("events", []), events, logs.text())
    return events


_SyncResponse._get_to_device = staticmethod(_get_to_device)

COMMANDS = {
    "login": Peer.login,
    "send_olm": Peer.send_olm,
    "wait_to_device": Peer.wait_to_device,
    "create_room": Peer.create_room,
    "invite": Peer.invite,
    "join": Peer.join,
    "leave": Peer.leave,
    "wait_joined": Peer.wait_joined,
    "room_send": Peer.room_send,
    "wait_room_message": Peer.wait_room_message,
}
# Commands whose "timeout_ms" adds to the command's time limit.
WAITING_COMMANDS = {"wait_to_device", "wait_joined", "wait_room_message"}


async def run_command(cmd):
    name = cmd.get("cmd")
    handler = COMMANDS.get(name)
    if handler is None:
        raise PeerError(f"unknown command {name!r}")
    limit = COMMAND_TIMEOUT_S
    if name in WAITING_COMMANDS and isinstance(cmd.get("timeout_ms"), int):
        limit += cmd["timeout_ms"] / 1000
    try:
        return await asyncio.wait_for(handler(PEER, cmd), timeout=limit)
    except asyncio.TimeoutError:
        raise PeerError(f"{name} did not finish within {limit:.0f}s") from None


async def main():
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    answer({"ok": True, "ready": True, "versions": VERSIONS})
    while True:
        line = await reader.readline()
        if not line:
            log.info("stdin closed, exiting")
            break
        line = line.strip()
        if not line:
            continue
        try:
            cmd = json.loads(line)
            if not isinstance(cmd, dict):
                raise ValueError("not an object")
        except ValueError as e:
            answer({"ok": False, "id": None, "error": f"bad command line: {e}"})
            continue
        command_id = cmd.get("id")
        if cmd.get("cmd") == "quit":
            answer({"ok": True, "id": command_id})
            break
        try:
            result = await run_command(cmd)
        except PeerError as e:
            result = {"ok": False, "error": str(e)}
        except Exception as e:  # noqa: BLE001 - any failure is an answer
            log.error("command %s failed:\n%s", cmd.get("cmd"), traceback.format_exc())
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        result["id"] = command_id
        answer(result)
    try:
        await asyncio.wait_for(PEER.close(), timeout=10)
    except Exception:  # noqa: BLE001 - exiting anyway
        log.exception("closing the client")


if __name__ == "__main__":
    asyncio.run(main())
