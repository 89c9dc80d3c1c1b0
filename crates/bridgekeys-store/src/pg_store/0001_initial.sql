-- bridgekeys PostgreSQL store, schema 1.
--
-- Public data (ids, versions, times, public keys) are plain columns so that
-- queries can use them; every secret (account and session pickles, private
-- keys, tracked devices, Megolm records, held events, delivery results,
-- cross-signing keys) is a `sealed` column: XChaCha20-Poly1305 under the
-- store key, bound to the same slot string as in the sled layout
-- (layout.rs), so a value copied to another row fails to open.
-- Text columns collate "C": ordered by bytes, like sled's keys.

CREATE TABLE bk_schema_version (
    version INTEGER PRIMARY KEY,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- 'store_id' (16 bytes, public) and 'key_check' (a sealed constant).
CREATE TABLE bk_meta (
    name TEXT COLLATE "C" PRIMARY KEY,
    value BYTEA NOT NULL
);

-- The store-wide one-time key id counter: every id handed out is below
-- next_id. One row; processes take blocks of ids from it.
CREATE TABLE bk_key_ids (
    only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
    next_id BIGINT NOT NULL
);

CREATE TABLE bk_accounts (
    device BYTEA PRIMARY KEY,
    version BIGINT NOT NULL,
    sealed BYTEA NOT NULL
);

-- key_id is stored order-preserving (u64 with its top bit flipped).
CREATE TABLE bk_one_time_keys (
    device BYTEA NOT NULL,
    key_id BIGINT NOT NULL,
    public_key BYTEA NOT NULL,
    sealed BYTEA NOT NULL,
    -- The order keys were stored in, for evicting the oldest: key ids come
    -- in blocks per process, so across processes the lowest id is not the
    -- oldest key (a long-running process's block sits below a restarted
    -- one's).
    seq BIGINT GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (device, key_id)
);
CREATE INDEX bk_one_time_keys_by_public ON bk_one_time_keys (device, public_key);
CREATE INDEX bk_one_time_keys_by_age ON bk_one_time_keys (device, seq);

CREATE TABLE bk_olm_sessions (
    device BYTEA NOT NULL,
    peer_key BYTEA NOT NULL,
    session_id TEXT COLLATE "C" NOT NULL,
    last_used BIGINT NOT NULL,
    sealed BYTEA NOT NULL,
    PRIMARY KEY (device, peer_key, session_id)
);

CREATE TABLE bk_tracked_users (
    user_id TEXT COLLATE "C" PRIMARY KEY,
    sealed BYTEA NOT NULL
);

-- A message can be long: the key holds its SHA-256, the row the message.
CREATE TABLE bk_deliveries (
    tag TEXT COLLATE "C" NOT NULL,
    device BYTEA NOT NULL,
    message_hash BYTEA NOT NULL,
    message BYTEA NOT NULL,
    sealed BYTEA NOT NULL,
    PRIMARY KEY (tag, device, message_hash)
);

CREATE TABLE bk_outbound_group_sessions (
    device BYTEA NOT NULL,
    room_id TEXT COLLATE "C" NOT NULL,
    sealed BYTEA NOT NULL,
    PRIMARY KEY (device, room_id)
);

CREATE TABLE bk_group_sessions (
    room_id TEXT COLLATE "C" NOT NULL,
    session_id TEXT COLLATE "C" NOT NULL,
    sealed BYTEA NOT NULL,
    PRIMARY KEY (room_id, session_id)
);

CREATE TABLE bk_message_indexes (
    room_id TEXT COLLATE "C" NOT NULL,
    session_id TEXT COLLATE "C" NOT NULL,
    message_index BIGINT NOT NULL,
    event_id TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (room_id, session_id, message_index)
);

CREATE TABLE bk_held_events (
    room_id TEXT COLLATE "C" NOT NULL,
    session_id TEXT COLLATE "C" NOT NULL,
    event_id TEXT COLLATE "C" NOT NULL,
    sealed BYTEA NOT NULL,
    PRIMARY KEY (room_id, session_id, event_id)
);

CREATE TABLE bk_room_states (
    room_id TEXT COLLATE "C" PRIMARY KEY,
    sealed BYTEA NOT NULL
);

CREATE TABLE bk_cross_signing (
    user_id TEXT COLLATE "C" PRIMARY KEY,
    sealed BYTEA NOT NULL
);

-- A transaction row is a lease (completed_at NULL) or a completion record.
-- Times are Unix milliseconds: completed_at on the recording process's
-- clock, lease_until on the database's.
CREATE TABLE bk_transactions (
    namespace TEXT COLLATE "C" NOT NULL,
    txn_id TEXT COLLATE "C" NOT NULL,
    completed_at BIGINT,
    lease_owner TEXT COLLATE "C",
    lease_until BIGINT,
    PRIMARY KEY (namespace, txn_id)
);
CREATE INDEX bk_transactions_by_age ON bk_transactions (COALESCE(completed_at, lease_until));

-- due_ms is stored order-preserving (u64 with its top bit flipped).
CREATE TABLE bk_puppets (
    device BYTEA PRIMARY KEY,
    cross_signed BOOLEAN NOT NULL DEFAULT FALSE,
    due_ms BIGINT
);
CREATE INDEX bk_puppets_schedule ON bk_puppets (due_ms, device) WHERE due_ms IS NOT NULL;

-- One row per open PgStore: the group commit of appended one-time keys
-- flushes the WAL by committing a write here synchronously (see
-- appender.rs); each process has its own row, so none waits on another's.
CREATE TABLE bk_flush (
    instance BIGINT PRIMARY KEY,
    flushes BIGINT NOT NULL
);
