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
  {"cmd":"quit"} -> {"ok":true}, then the process exits.
"""

import asyncio
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
# Only to-device messages and key counts matter here.
SYNC_FILTER = {
    "room": {"rooms": []},
    "presence": {"types": []},
    "account_data": {"types": []},
}


def answer(obj):
    PROTOCOL.write(json.dumps(obj) + "\n")
    PROTOCOL.flush()


try:
    from importlib import metadata

    from nio import (
        AsyncClient,
        AsyncClientConfig,
        KeysClaimResponse,
        KeysQueryResponse,
        KeysUploadResponse,
        LoginResponse,
        SyncResponse,
        ToDeviceMessage,
        ToDeviceResponse,
    )
    from nio.crypto import ENCRYPTION_ENABLED
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
        timeout_ms = cmd.get("timeout_ms", 30_000)
        if not isinstance(timeout_ms, int) or timeout_ms < 0:
            raise PeerError("field 'timeout_ms' must be a non-negative integer")
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
}


async def run_command(cmd):
    name = cmd.get("cmd")
    handler = COMMANDS.get(name)
    if handler is None:
        raise PeerError(f"unknown command {name!r}")
    limit = COMMAND_TIMEOUT_S
    if name == "wait_to_device" and isinstance(cmd.get("timeout_ms"), int):
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
