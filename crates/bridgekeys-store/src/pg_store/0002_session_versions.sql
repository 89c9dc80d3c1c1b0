-- bridgekeys PostgreSQL store, schema 2: Olm sessions and outbound Megolm
-- sessions carry a version, so that several processes advancing the same
-- session compare-and-swap it (UPDATE ... WHERE version = expected) like an
-- account, instead of the last writer winning. Rows written by schema 1 are
-- at version 0; a write stores one more than the version it read.

ALTER TABLE bk_olm_sessions ADD COLUMN version BIGINT NOT NULL DEFAULT 0;

ALTER TABLE bk_outbound_group_sessions ADD COLUMN version BIGINT NOT NULL DEFAULT 0;

-- A rolling upgrade runs processes of both schemas for a while: a process
-- of schema 1 keeps writing sessions without naming a version (its upsert
-- sets the record, not the version). So every update that leaves the
-- version as it was moves it on by one here: a process of this schema that
-- read the session before that write then fails its compare-and-swap
-- instead of overwriting the step the old process took. Writes of this
-- schema always set the version one past the one they read, and are not
-- moved twice.
CREATE FUNCTION bk_session_version_moves() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.version = OLD.version THEN
        NEW.version := OLD.version + 1;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER bk_olm_sessions_version_moves BEFORE UPDATE ON bk_olm_sessions
    FOR EACH ROW EXECUTE FUNCTION bk_session_version_moves();

CREATE TRIGGER bk_outbound_group_sessions_version_moves BEFORE UPDATE ON bk_outbound_group_sessions
    FOR EACH ROW EXECUTE FUNCTION bk_session_version_moves();
