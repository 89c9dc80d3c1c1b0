-- bridgekeys PostgreSQL store, schema 2: Olm sessions and outbound Megolm
-- sessions carry a version, so that several processes advancing the same
-- session compare-and-swap it (UPDATE ... WHERE version = expected) like an
-- account, instead of the last writer winning. Rows written by schema 1 are
-- at version 0; a write stores one more than the version it read.

ALTER TABLE bk_olm_sessions ADD COLUMN version BIGINT NOT NULL DEFAULT 0;

ALTER TABLE bk_outbound_group_sessions ADD COLUMN version BIGINT NOT NULL DEFAULT 0;
