#!/usr/bin/env bash
# The PostgreSQL floor under S3, without capsync: pgbench, one connection, alternating
# PostgreSQL's single-row durable INSERT (~200 bytes, autocommit) with one 1-op
# `capsync_append` call (a new client each call, a message put of ~200 bytes, autocommit),
# then the same two inside BEGIN ... ROLLBACK (the work without the commit's WAL flush; that
# latency also holds the BEGIN and ROLLBACK round trips, the same for both).
# Prints pgbench's average latency for each.
#
#   scripts/pg-append-floor.sh postgres://USER@HOST:PORT/DB [seconds per run, default 5]
#
# The database must have capsync's schema (run `capsync serve --store URL` on it once). The
# script adds a session and a table `bench_insert` to it: use a throwaway database.
set -euo pipefail
url=$1
seconds=${2:-5}
pgbench=$(command -v pgbench || ls /usr/lib/postgresql/*/bin/pgbench | tail -1)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

sid=$(psql "$url" -qAt -c "INSERT INTO sessions (id, title, created_at) VALUES (gen_random_uuid()::text, 'floor', 0) RETURNING sid")
PGOPTIONS="-c client_min_messages=warning" psql "$url" -q -c "CREATE TABLE IF NOT EXISTS bench_insert (id BIGSERIAL PRIMARY KEY, data BYTEA NOT NULL)"
echo "INSERT INTO bench_insert (data) VALUES (repeat('x', 200)::bytea);" >"$scratch/insert.sql"
cat >"$scratch/append.sql" <<EOF
\\set n random(1, 1000000000)
SELECT * FROM capsync_append($sid, '{}', '{}', '{}', uuid_send(gen_random_uuid()), 1, '\\x'::bytea,
    ARRAY[uuid_send(gen_random_uuid())], ARRAY[sha256(('m' || :n)::bytea)], ARRAY[NULL]::text[], ARRAY[NULL]::text[],
    ARRAY[false], ARRAY[1::smallint], ARRAY['m' || :n], ARRAY[''], ARRAY[repeat('x', 200)::bytea]);
EOF
for f in insert append; do
    { grep '^\\' "$scratch/$f.sql" || true; echo 'BEGIN;'; grep -v '^\\' "$scratch/$f.sql"; echo 'ROLLBACK;'; } >"$scratch/rb-$f.sql"
done
run() {
    "$pgbench" -n -M prepared -c 1 -T "$seconds" -f "$scratch/$1.sql" "$url" 2>&1 | sed -n 's/^latency average = //p'
}
for round in 1 2 3; do
    echo "round $round: insert $(run insert), capsync_append $(run append);" \
        "without the commit: insert $(run rb-insert), capsync_append $(run rb-append)"
done
