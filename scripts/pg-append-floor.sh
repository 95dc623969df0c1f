#!/usr/bin/env bash
# The PostgreSQL floor under S3, without capsync: pgbench, one connection, each statement in
# autocommit (so each is one round trip and one durable commit), alternating:
#   insert     PostgreSQL's single-row durable INSERT (~200 bytes): S3's baseline;
#   roundtrip  `SELECT 1`: one round trip to an idle process, which capsync's extra hop
#              (client → server, before server → PostgreSQL) costs at least;
#   append     one 1-op `capsync_append` (a new client each call, a message put of ~200 bytes);
#   writes     the same writes as `append` as one plain statement, with none of its checks
#              and no PL/pgSQL: the session row locked, the client's last batch read, the op
#              log row (two unique keys), the entity, the batch record, the cursor;
#   minimal    what a store that kept neither the entity rows nor a record per batch would
#              still write: the op log row, the client's batch position, the cursor;
# then `insert` and `append` inside BEGIN ... ROLLBACK (the work without the commit's WAL
# flush; that latency also holds the BEGIN and ROLLBACK round trips, the same for both).
# Prints pgbench's average latency for each.
#
#   scripts/pg-append-floor.sh postgres://USER@HOST:PORT/DB [seconds per run, default 5]
#
# The database must have capsync's schema (run `capsync serve --store URL` on it once). The
# script adds sessions and the tables `bench_insert` and `bench_clients` to it: use a
# throwaway database.
set -euo pipefail
url=$1
seconds=${2:-5}
pgbench=$(command -v pgbench || ls /usr/lib/postgresql/*/bin/pgbench | tail -1)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

new_session() {
    psql "$url" -qAt -c "INSERT INTO sessions (id, title, created_at) VALUES (gen_random_uuid()::text, 'floor', 0) RETURNING sid"
}
sid=$(new_session)
plain=$(new_session)
minimal=$(new_session)
PGOPTIONS="-c client_min_messages=warning" psql "$url" -q \
    -c "CREATE TABLE IF NOT EXISTS bench_insert (id BIGSERIAL PRIMARY KEY, data BYTEA NOT NULL)" \
    -c "CREATE TABLE IF NOT EXISTS bench_clients (sid BIGINT, client_id BYTEA, last BIGINT NOT NULL, PRIMARY KEY (sid, client_id))" \
    -c "INSERT INTO bench_clients VALUES ($minimal, '\\x01', 0) ON CONFLICT DO NOTHING"
echo "INSERT INTO bench_insert (data) VALUES (repeat('x', 200)::bytea);" >"$scratch/insert.sql"
echo "SELECT 1;" >"$scratch/roundtrip.sql"
cat >"$scratch/append.sql" <<EOF
\\set n random(1, 1000000000)
SELECT * FROM capsync_append($sid, '{}', '{}', '{}', uuid_send(gen_random_uuid()), 1, '\\x'::bytea,
    ARRAY[uuid_send(gen_random_uuid())], ARRAY[sha256(('m' || :n)::bytea)], ARRAY[NULL]::text[], ARRAY[NULL]::text[],
    ARRAY[false], ARRAY[1::smallint], ARRAY['m' || :n], ARRAY[''], ARRAY[repeat('x', 200)::bytea]);
EOF
cat >"$scratch/writes.sql" <<EOF
\\set n random(1, 1000000000)
WITH s AS (SELECT sid, cursor FROM sessions WHERE sid = $plain FOR UPDATE),
last AS (SELECT coalesce(max(cb.batch_seq), 0) AS b FROM client_batches cb, s
         WHERE cb.sid = s.sid AND cb.client_id = decode(md5(:n::text), 'hex')),
o AS (INSERT INTO ops (sid, seq, op_id, payload_hash, is_delete, kind, entity_id, parent_id, data)
      SELECT s.sid, s.cursor + 1, uuid_send(gen_random_uuid()), sha256(('m' || :n)::bytea), false, 1,
             'm' || :n, '', repeat('x', 200)::bytea FROM s, last WHERE last.b = 0
      ON CONFLICT (sid, op_id) DO NOTHING RETURNING sid, seq),
e AS (INSERT INTO entities (sid, kind, id, parent_id, data, seq)
      SELECT o.sid, 1, 'm' || :n, '', repeat('x', 200)::bytea, o.seq FROM o
      ON CONFLICT (sid, kind, id) DO UPDATE SET parent_id = excluded.parent_id, data = excluded.data, seq = excluded.seq),
b AS (INSERT INTO client_batches (sid, client_id, batch_seq, op_ids, results)
      SELECT s.sid, decode(md5(:n::text), 'hex'), 1, '\\x00'::bytea, '\\x0000'::bytea FROM s)
UPDATE sessions SET cursor = o.seq FROM o WHERE sessions.sid = o.sid;
EOF
cat >"$scratch/minimal.sql" <<EOF
\\set n random(1, 1000000000)
WITH s AS (UPDATE sessions SET cursor = cursor + 1 WHERE sid = $minimal RETURNING sid, cursor),
c AS (UPDATE bench_clients SET last = last + 1 WHERE sid = $minimal AND client_id = '\\x01'::bytea RETURNING last),
o AS (INSERT INTO ops (sid, seq, op_id, payload_hash, is_delete, kind, entity_id, parent_id, data)
      SELECT s.sid, s.cursor, uuid_send(gen_random_uuid()), sha256(('m' || :n)::bytea), false, 1,
             'm' || :n, '', repeat('x', 200)::bytea FROM s
      ON CONFLICT (sid, op_id) DO NOTHING RETURNING seq)
SELECT o.seq, c.last FROM o, c;
EOF
for f in insert append; do
    { grep '^\\' "$scratch/$f.sql" || true; echo 'BEGIN;'; grep -v '^\\' "$scratch/$f.sql"; echo 'ROLLBACK;'; } >"$scratch/rb-$f.sql"
done
run() {
    "$pgbench" -n -M prepared -c 1 -T "$seconds" -f "$scratch/$1.sql" "$url" 2>&1 | sed -n 's/^latency average = //p'
}
for round in 1 2 3; do
    echo "round $round: insert $(run insert), roundtrip $(run roundtrip), capsync_append $(run append)," \
        "writes $(run writes), minimal $(run minimal);" \
        "without the commit: insert $(run rb-insert), capsync_append $(run rb-append)"
done
