# capsync wire contract (DESIGN.md §3).
#
# Every capability a client can hold is reachable only through `Gateway.redeem` with a secret
# token. Errors are Cap'n Proto `failed` exceptions whose description starts with a stable
# marker: capsync/revoked, capsync/expired, capsync/unknown-token, capsync/denied,
# capsync/invalid, capsync/gap, capsync/diverged, capsync/too-large, capsync/internal; load
# shedding uses the `overloaded` exception type with capsync/overloaded.
#
# Ids: session, share and space ids are UUID text; opIds and clientIds are 16-byte Data.
# Times are Unix milliseconds; 0 means "none" (no expiry).

@0x8b635a167ac0298b;

# The bootstrap capability: the only thing a fresh connection can call.
interface Gateway {
  # Exchanges a sturdy-ref token for a live capability. Redeeming the same token twice on one
  # connection returns the same live object. Fails with capsync/unknown-token,
  # capsync/expired or capsync/revoked.
  #
  # Pipelining rule (DESIGN §3): the C++ Cap'n Proto library, and every binding built on it
  # (pycapnp, node-capnp), cannot pipeline on a union member, so the capability a client calls
  # right away is also returned outside any union: `session` for a session or share token
  # (a Share is a Session), `admin` for the admin token, `space` for a space token. A client of
  # any implementation sends `redeem(token).session.append(...)` (or
  # `redeem(token).space.openSession(...)`) without waiting for the redeem: one round trip.
  # `grant.cap` carries the same object under its precise type, for clients that wait.
  redeem @0 (token :Text) -> (grant :Grant, session :Session, admin :Admin, space :Space);
  #   grant: what the token grants (kind, ids, rights, epoch, expiry) and the capability.
  #   session: the session or share capability; null for an admin or space token.
  #   admin: the admin capability; null for any other token.
  #   space: the space capability; null for any other token.
}

# What a token grants. To pipeline, use the redeem result's `session`/`admin`/`space` fields:
# C++-based implementations cannot pipeline on `cap`'s members.
struct Grant {
  cap :union {
    session @0 :Session;   # owner capability of a session (all rights)
    share @1 :Share;       # an attenuated share of a session
    admin @2 :Admin;       # the server's admin object
    space @10 :Space;      # a space: opens sessions for ingestion (see `Space`)
  }
  kind @3 :Text;           # "session", "share", "admin" or "space"
  id @4 :Text;             # session id, share id, space id, or "admin"
  sessionId @5 :Text;      # the session a session or share grant refers to; empty for admin
                           # and space grants
  rights @6 :Rights;       # what calls the capability allows
  epoch @7 :UInt64;        # epoch of the object the token was minted under
  expiresAt @8 :UInt64;    # Unix ms; 0 = never
  history @9 :Text;        # which copy of the server's history answers: it changes when the
                           # server is restored from a backup, and a client that sees it change
                           # re-delivers the ops it still holds (DESIGN §5; same opIds, so
                           # nothing applies twice) and re-pulls its replicas
}

# Rights of a session capability. An owner has all three.
struct Rights {
  read @0 :Bool;           # snapshot, changes, subscribe, info
  append @1 :Bool;         # append
  mint @2 :Bool;           # mint narrower shares
}

# Kinds of entity a session holds.
enum EntityKind {
  session @0;              # session metadata; its id is the session id
  message @1;
  part @2;                 # parent must be an existing message
  diff @3;
  model @4;
}

# Identifies an entity within a session.
struct EntityKey {
  kind @0 :EntityKind;
  id @1 :Text;             # 1..=256 bytes of UTF-8
}

# A whole entity. `data` is UTF-8 JSON the server stores but does not interpret.
struct Entity {
  kind @0 :EntityKind;
  id @1 :Text;
  parentId @2 :Text;       # message id for a part; free-form (may be empty) otherwise
  data @3 :Data;           # UTF-8 JSON, size-limited
}

# One change, identified forever by its opId.
struct Op {
  opId @0 :Data;           # 16 bytes: a UUIDv7 minted by the client when the change was made
  union {
    put @1 :Entity;        # insert or replace the whole entity
    delete @2 :EntityKey;  # remove it (a message takes its parts with it)
  }
}

# Ops a client sends in one `append`; applied atomically, in order.
struct Batch {
  clientId @0 :Data;       # 16 bytes, one per client outbox
  batchSeq @1 :UInt64;     # per client per session: 1, 2, 3, ...
  ops @2 :List(Op);
}

# The answer to an `append`, sent only after the batch is durable.
struct Ack {
  cursor @0 :UInt64;       # the session's cursor after this batch
  batchSeq @1 :UInt64;     # echoes Batch.batchSeq
  results @2 :List(OpResult);  # one per op, in batch order
}

struct OpResult {
  opId @0 :Data;
  status @1 :Status;
  seq @2 :UInt64;          # applied/duplicate: the seq the op got when first applied; else 0
  reason @3 :Text;         # conflict/rejected: why

  enum Status {
    applied @0;            # applied now
    duplicate @1;          # applied before with the same payload; nothing changed
    conflict @2;           # opId applied before with a different payload; nothing changed
    rejected @3;           # cannot apply (bad JSON, too large, unknown parent...)
  }
}

# An op as the server applied it, with its place in the session's log.
struct AppliedOp {
  seq @0 :UInt64;
  op @1 :Op;
}

# Descriptive state of a session capability.
struct SessionInfo {
  sessionId @0 :Text;
  title @1 :Text;
  kind @2 :Text;           # "session" or "share"
  shareId @3 :Text;        # empty for the owner capability
  rights @4 :Rights;
  cursor @5 :UInt64;       # the session's current cursor
  expiresAt @6 :UInt64;    # Unix ms; 0 = never
}

# A session. Every call fails with capsync/revoked once the session (or, for a share, the
# share or any share above it) is revoked, and capsync/expired past the capability's expiry.
interface Session {
  # Applies a batch atomically and durably; see DESIGN §5 for replay, gap and divergence.
  # Needs the append right.
  append @0 (batch :Batch) -> (ack :Ack);

  # One page of the current entities, ordered by (kind, id), starting after `startAfter`
  # (null for the first page); `limit` 0 means the server's default page size. Pages may
  # reflect different cursors: a client applies `changes(after = first page's cursor)` after
  # the last page to reach a consistent state. Needs read.
  snapshot @1 (startAfter :EntityKey, limit :UInt32)
      -> (cursor :UInt64, entities :List(Entity), more :Bool);

  # Applied ops with seq > after, in seq order, at most `limit` (0 = server default).
  # `cursor` is the session's cursor when read. Needs read.
  changes @2 (after :UInt64, limit :UInt32) -> (ops :List(AppliedOp), cursor :UInt64);

  # Delivers every op after `after`, then live ops, to `listener`. Dropping the returned
  # Subscription ends it. Needs read.
  subscribe @3 (after :UInt64, listener :Listener) -> (subscription :Subscription);

  # Mints a share of this session (or, on a Share, below this share). Rights must be a subset
  # of this capability's; the share never outlives its parent (ttlSeconds 0 = as long as the
  # parent). Returns the new token once; the server keeps only its hash. Needs mint.
  mint @4 (rights :Rights, label :Text, ttlSeconds :UInt64) -> (token :Text, shareId :Text);

  # What this capability is. Needs no right beyond being valid.
  info @5 () -> (info :SessionInfo);
}

# An attenuated session: the same methods, limited by its rights (capsync/denied otherwise).
interface Share extends(Session) {}

# Receives ops of a subscription.
interface Listener {
  # A run of applied ops in seq order; `cursor` is the seq of the last one. Streaming: the
  # server waits for flow control instead of buffering without bound.
  onOps @0 (ops :List(AppliedOp), cursor :UInt64) -> stream;

  # The subscription is over: "revoked", "shutdown", "expired" or "cancelled".
  onEnd @1 (reason :Text) -> ();
}

# A live subscription; drop it (or call cancel) to end it.
interface Subscription {
  cancel @0 () -> ();
}

struct SessionSummary {
  sessionId @0 :Text;
  title @1 :Text;
  cursor @2 :UInt64;
  epoch @3 :UInt64;
  createdAt @4 :UInt64;
  shareCount @5 :UInt32;
}

struct ShareSummary {
  shareId @0 :Text;
  sessionId @1 :Text;
  parentShareId @2 :Text;  # empty when minted directly from the session
  label @3 :Text;
  rights @4 :Rights;
  epoch @5 :UInt64;
  revoked @6 :Bool;        # this share or one above it was revoked
  createdAt @7 :UInt64;
  expiresAt @8 :UInt64;
  lastUsedAt @9 :UInt64;   # last redeem of any of its tokens; 0 = never
}

struct AuditEntry {
  id @0 :UInt64;           # increasing; pass the last one seen as `since`
  at @1 :UInt64;           # Unix ms
  action @2 :Text;         # mint, redeem, redeem-failed, revoke, denied, create-session,
                           # create-space, open-session
  targetKind @3 :Text;     # session, share, admin, space or empty
  targetId @4 :Text;
  sessionId @5 :Text;
  peer @6 :Text;           # peer address of the connection
  detail @7 :Text;         # never a token
}

struct Stats {
  sessions @0 :UInt64;     # sessions stored
  shares @1 :UInt64;       # shares stored (revoked ones included)
  ops @2 :UInt64;          # ops applied, over all sessions
  connections @3 :UInt64;  # open connections now
  liveCapabilities @4 :UInt64;
  subscriptions @5 :UInt64;
  store @6 :Text;          # which store keeps the server's state: "sqlite" or "postgres"
}

# The server's admin object. Its token is in <data-dir>/admin.uri.
interface Admin {
  # A new empty session and its owner token.
  createSession @0 (title :Text) -> (sessionId :Text, token :Text);
  listSessions @1 () -> (sessions :List(SessionSummary));
  # Shares of one session, or of every session when sessionId is empty.
  listShares @2 (sessionId :Text) -> (shares :List(ShareSummary));
  # Bumps the share's epoch; durable before it returns. Breaks the share and every share below.
  revokeShare @3 (shareId :Text) -> (epoch :UInt64);
  # Bumps the session's epoch: the owner token and every share of the session stop working.
  revokeSession @4 (sessionId :Text) -> (epoch :UInt64);
  # Audit entries with id > since, oldest first, at most `limit` (0 = 100).
  audit @5 (since :UInt64, limit :UInt32) -> (entries :List(AuditEntry));
  stats @6 () -> (stats :Stats);

  # A new space and its token (returned once; the server keeps only its hash). Hand the
  # space's sturdy URI to an importer: it can open sessions without the admin URI.
  createSpace @7 (label :Text) -> (spaceId :Text, token :Text);
  #   label: shown by `listSpaces` (at most 256 bytes).
  # Every space, oldest first.
  listSpaces @8 () -> (spaces :List(SpaceSummary));
  # Bumps the space's epoch; durable before it returns. The space's token, every session token
  # minted through it by `openSession`, and every share minted below those stop working (their
  # live capabilities fail their next call with capsync/revoked). The sessions and their data
  # stay; shares minted by the admin (`mintShare`) keep working.
  revokeSpace @9 (spaceId :Text) -> (epoch :UInt64);
  # Mints a share of any session straight from the admin object (its parent is the session):
  # how an operator reaches a session it holds no token of, e.g. one opened through a space.
  # Rights as in `Session.mint`; ttlSeconds 0 = never expires. Revocable with `revokeShare`.
  mintShare @10 (sessionId :Text, rights :Rights, label :Text, ttlSeconds :UInt64)
      -> (token :Text, shareId :Text);
}

# A space as the admin sees it.
struct SpaceSummary {
  spaceId @0 :Text;        # UUID text
  label @1 :Text;
  epoch @2 :UInt64;        # bumped by each `revokeSpace`
  revoked @3 :Bool;        # the space was revoked (its token is minted at epoch 0)
  createdAt @4 :UInt64;    # Unix ms
  sessionCount @5 :UInt32; # sessions opened through this space
}

# A session opened through a space.
struct SpaceSession {
  key @0 :Text;            # the key it was opened with (e.g. the agent's own session id)
  sessionId @1 :Text;
  title @2 :Text;          # the title given when the key was first opened
  cursor @3 :UInt64;       # the session's current cursor
  createdAt @4 :UInt64;    # Unix ms
}

# A space: a capability for ingestion. Whoever holds a space token can open sessions in it, each
# under a key of its choosing, and get their owner tokens, without the admin URI; and nothing
# else (it cannot reach sessions opened elsewhere). Every call fails with capsync/revoked once
# the space is revoked (`Admin.revokeSpace`), and so does every token minted through it.
interface Space {
  # The session of `key` in this space, created on the first call with that key and returned
  # again on every later one, concurrent calls included: re-running an import never creates a
  # second session. `token` is a fresh owner token of that session (all rights) minted through
  # this space, at the session's current epoch: revoking the space cuts it.
  #   key: 1..=256 bytes of UTF-8, e.g. "codex:<agent session id>".
  #   title: the new session's title; ignored when the key exists already.
  #   created: whether this call created the session.
  openSession @0 (key :Text, title :Text) -> (sessionId :Text, token :Text, created :Bool);
  # The sessions opened through this space, oldest first.
  listSessions @1 () -> (sessions :List(SpaceSession));
  # What this space is.
  info @2 () -> (info :SpaceSummary);
}
