-- Schema version 4: a batch's append as one function, so that a node applies a batch in one
-- round trip (one `SELECT capsync_append(...)` in autocommit: its COMMIT happens at the
-- protocol's Sync, before ReadyForQuery, so the answer still comes only after the WAL flush).
--
-- The rules are those of the SQLite store's `persistence/src/server/append.rs` and of
-- `append.rs` beside this file, which prepares the arguments:
--   * the session row is locked FOR UPDATE first (appends of one session are serialised on
--     every node and seqs are commit-ordered with no gap), then the guard's rows FOR SHARE,
--     shares in id order (no write commits after a revocation's commit);
--   * batchSeq: a stored one is a replay (its stored results, or 'diverged' if its opIds
--     differ), one past the last is new, anything further is a gap;
--   * per op, in order: an op the protocol layer refused (p_pre) is rejected; an opId applied
--     before answers duplicate (same payload hash, its first seq) or conflict; then the
--     refusals that need no database (p_post: U+0000 in an id, a session entity of another
--     id); then a part whose parent message does not exist as of this op; else it applies.
-- Codes: entity kinds as `capsync_model::EntityKind` (1 message, 2 part); guard kinds 0 admin,
-- 1 session, 2 share, 3 space; op statuses as `OpStatus` (0 applied, 1 duplicate, 2 conflict,
-- 3 rejected). Results are stored in `capsync_model::replay::encode_results`'s encoding, so
-- replays answer the same whichever node or version wrote the batch.

-- outcome: 'applied' (cursor, results), 'replay' (cursor, the stored results), 'revoked',
-- 'zero' (batchSeq 0), 'gap' (expected), 'diverged', 'no-session', 'no-batch' (a stored
-- batchSeq below the last with no row: corrupt).
CREATE FUNCTION capsync_append(
    p_sid BIGINT,
    p_guard_kinds SMALLINT[], p_guard_ids TEXT[], p_guard_epochs BIGINT[],
    p_client_id BYTEA, p_batch_seq BIGINT, p_batch_op_ids BYTEA,
    p_op_ids BYTEA[], p_hashes BYTEA[], p_pre TEXT[], p_post TEXT[],
    p_is_delete BOOLEAN[], p_kinds SMALLINT[], p_entity_ids TEXT[], p_parent_ids TEXT[], p_datas BYTEA[],
    OUT outcome TEXT, OUT head BIGINT, OUT expected BIGINT, OUT results BYTEA)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_session_id TEXT;
    v_epoch BIGINT;
    v_cursor BIGINT;
    v_current BIGINT;
    v_last BIGINT;
    v_stored_ids BYTEA;
    v_seen_hash BYTEA;
    v_seen_seq BIGINT;
    v_status INT;
    v_seq BIGINT;
    v_reason TEXT;
    v_reason_bytes BYTEA;
    v_len INT;
    v_results BYTEA := '\x'::bytea;
    v_applied BOOLEAN := false;
    v_new BOOLEAN;
    v_notified TEXT;
BEGIN
    SELECT s.id, s.epoch, s.cursor INTO v_session_id, v_epoch, v_cursor
        FROM sessions s WHERE s.sid = p_sid FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'no-session';
        RETURN;
    END IF;
    head := v_cursor;

    -- The guard. Shares are locked in one statement in id order, as every guarded write does.
    IF 2 = ANY (p_guard_kinds) THEN
        PERFORM 1 FROM shares sh
            WHERE sh.id = ANY (ARRAY(SELECT p_guard_ids[g] FROM generate_subscripts(p_guard_kinds, 1) g
                                     WHERE p_guard_kinds[g] = 2))
            ORDER BY sh.id FOR SHARE;
    END IF;
    FOR g IN 1 .. coalesce(array_length(p_guard_kinds, 1), 0) LOOP
        v_current := NULL;
        CASE p_guard_kinds[g]
            WHEN 0 THEN
                SELECT a.epoch INTO v_current FROM admin a WHERE a.id = 1 FOR SHARE;
            WHEN 1 THEN
                IF p_guard_ids[g] = v_session_id THEN
                    v_current := v_epoch;
                ELSE
                    SELECT s.epoch INTO v_current FROM sessions s WHERE s.id = p_guard_ids[g] FOR SHARE;
                END IF;
            WHEN 2 THEN
                SELECT sh.epoch INTO v_current FROM shares sh WHERE sh.id = p_guard_ids[g];
            ELSE
                SELECT sp.epoch INTO v_current FROM spaces sp WHERE sp.id = p_guard_ids[g] FOR SHARE;
        END CASE;
        IF v_current IS DISTINCT FROM p_guard_epochs[g] THEN
            outcome := 'revoked';
            RETURN;
        END IF;
    END LOOP;

    IF p_batch_seq = 0 THEN
        outcome := 'zero';
        RETURN;
    END IF;
    SELECT cb.batch_seq INTO v_last FROM client_batches cb
        WHERE cb.sid = p_sid AND cb.client_id = p_client_id ORDER BY cb.batch_seq DESC LIMIT 1;
    v_last := coalesce(v_last, 0);
    IF p_batch_seq <= v_last THEN
        SELECT cb.op_ids, cb.results INTO v_stored_ids, results FROM client_batches cb
            WHERE cb.sid = p_sid AND cb.client_id = p_client_id AND cb.batch_seq = p_batch_seq;
        IF NOT FOUND THEN
            outcome := 'no-batch';
        ELSIF v_stored_ids <> p_batch_op_ids THEN
            outcome := 'diverged';
            results := NULL;
        ELSE
            outcome := 'replay';
        END IF;
        RETURN;
    END IF;
    IF p_batch_seq > v_last + 1 THEN
        outcome := 'gap';
        expected := v_last + 1;
        RETURN;
    END IF;

    FOR i IN 1 .. coalesce(array_length(p_op_ids, 1), 0) LOOP
        v_seq := 0;
        v_reason := '';
        IF p_pre[i] IS NOT NULL THEN
            v_status := 3;
            v_reason := p_pre[i];
        ELSE
            -- An op that may apply goes into the log unless its opId is there already (the
            -- unique (sid, op_id) decides, which saves a read on the common path). Ops this
            -- batch applied are in the log too, so a repeated opId inside one batch answers as
            -- it would in a later one.
            v_new := false;
            -- Each statement costs tens of microseconds whatever it does, so a put writes the
            -- log and the entity in one (the entity only if the log took the op).
            IF p_post[i] IS NULL AND NOT p_is_delete[i] AND (p_kinds[i] <> 2 OR EXISTS (
                SELECT 1 FROM entities e WHERE e.sid = p_sid AND e.kind = 1 AND e.id = p_parent_ids[i]
            )) THEN
                WITH logged AS (
                    INSERT INTO ops (sid, seq, op_id, payload_hash, is_delete, kind, entity_id, parent_id, data)
                        VALUES (p_sid, v_cursor + 1, p_op_ids[i], p_hashes[i], false, p_kinds[i],
                                p_entity_ids[i], p_parent_ids[i], p_datas[i])
                        ON CONFLICT (sid, op_id) DO NOTHING
                        RETURNING seq
                )
                INSERT INTO entities AS e (sid, kind, id, parent_id, data, seq)
                    SELECT p_sid, p_kinds[i], p_entity_ids[i], p_parent_ids[i], p_datas[i], logged.seq FROM logged
                    ON CONFLICT (sid, kind, id) DO UPDATE
                    SET parent_id = excluded.parent_id, data = excluded.data, seq = excluded.seq;
                v_new := FOUND;
            ELSIF p_post[i] IS NULL AND p_is_delete[i] THEN
                INSERT INTO ops (sid, seq, op_id, payload_hash, is_delete, kind, entity_id, parent_id, data)
                    VALUES (p_sid, v_cursor + 1, p_op_ids[i], p_hashes[i], true, p_kinds[i],
                            p_entity_ids[i], '', '\x'::bytea)
                    ON CONFLICT (sid, op_id) DO NOTHING;
                v_new := FOUND;
            END IF;
            IF v_new THEN
                v_cursor := v_cursor + 1;
                v_seq := v_cursor;
                v_status := 0;
                v_applied := true;
                IF NOT p_is_delete[i] THEN
                    NULL; -- written with its log row above
                ELSIF p_kinds[i] = 1 THEN
                    -- A message's delete takes its parts with it (replicas apply the same rule).
                    DELETE FROM entities e WHERE e.sid = p_sid
                        AND ((e.kind = 1 AND e.id = p_entity_ids[i]) OR (e.kind = 2 AND e.parent_id = p_entity_ids[i]));
                ELSE
                    DELETE FROM entities e WHERE e.sid = p_sid AND e.kind = p_kinds[i] AND e.id = p_entity_ids[i];
                END IF;
            ELSE
                SELECT o.payload_hash, o.seq INTO v_seen_hash, v_seen_seq FROM ops o
                    WHERE o.sid = p_sid AND o.op_id = p_op_ids[i];
                IF FOUND THEN
                    IF v_seen_hash = p_hashes[i] THEN
                        v_status := 1;
                        v_seq := v_seen_seq;
                    ELSE
                        v_status := 2;
                        v_reason := 'this opId was applied before with a different payload';
                    END IF;
                ELSE
                    v_status := 3;
                    v_reason := coalesce(p_post[i], 'a part''s parent must be an existing message');
                END IF;
            END IF;
        END IF;
        -- Its result: status (1 byte), seq (u64 LE), reason length (u32 LE), reason (UTF-8).
        -- Written out rather than through SQL helper functions, which PL/pgSQL would plan
        -- again at every call (that alone doubled a 1-op append's time in the database).
        v_results := v_results || set_byte(set_byte(set_byte(set_byte(set_byte(set_byte(set_byte(set_byte(set_byte(
            '\x000000000000000000'::bytea, 0, v_status),
            1, (v_seq & 255)::int), 2, ((v_seq >> 8) & 255)::int), 3, ((v_seq >> 16) & 255)::int),
            4, ((v_seq >> 24) & 255)::int), 5, ((v_seq >> 32) & 255)::int), 6, ((v_seq >> 40) & 255)::int),
            7, ((v_seq >> 48) & 255)::int), 8, ((v_seq >> 56) & 255)::int);
        IF v_reason = '' THEN
            v_results := v_results || '\x00000000'::bytea;
        ELSE
            v_reason_bytes := convert_to(v_reason, 'UTF8');
            v_len := octet_length(v_reason_bytes);
            v_results := v_results || set_byte(set_byte(set_byte(set_byte('\x00000000'::bytea,
                0, v_len & 255), 1, (v_len >> 8) & 255), 2, (v_len >> 16) & 255), 3, (v_len >> 24) & 255)
                || v_reason_bytes;
        END IF;
    END LOOP;

    -- The batch record, the cursor and, if ops applied, the notice by which other nodes'
    -- followers learn of them at this commit (see `notify.rs`; the payload is `sid:cursor`),
    -- in one statement: a data-modifying WITH runs whether or not the query reads it.
    WITH recorded AS (
        INSERT INTO client_batches (sid, client_id, batch_seq, op_ids, results)
            VALUES (p_sid, p_client_id, p_batch_seq, p_batch_op_ids, v_results)
    ), advanced AS (
        UPDATE sessions SET cursor = v_cursor WHERE sid = p_sid AND v_applied
    )
    SELECT pg_notify('capsync_advance', p_sid::text || ':' || v_cursor::text) INTO v_notified WHERE v_applied;
    outcome := 'applied';
    head := v_cursor;
    results := v_results;
END;
$fn$;
