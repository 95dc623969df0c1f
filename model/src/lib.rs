//! capsync's data model: plain data types shared by the server's stores, the client's outbox
//! and replica, and the wire conversions in `capsync-schema`.
//!
//! They mirror the wire structs of `schema/capsync.capnp` without depending on capnp or on any
//! storage engine, so each store and each side of the wire uses one definition.

pub mod replay;
pub mod stored;

use sha2::{Digest, Sha256};

/// An opId or clientId: 16 bytes (opIds are UUIDv7).
pub type Id16 = [u8; 16];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EntityKind {
    Session = 0,
    Message = 1,
    Part = 2,
    Diff = 3,
    Model = 4,
}

impl EntityKind {
    pub const ALL: [EntityKind; 5] =
        [EntityKind::Session, EntityKind::Message, EntityKind::Part, EntityKind::Diff, EntityKind::Model];

    pub fn code(self) -> i64 {
        self as i64
    }

    pub fn from_code(code: i64) -> Option<EntityKind> {
        EntityKind::ALL.into_iter().find(|k| k.code() == code)
    }

    pub fn name(self) -> &'static str {
        match self {
            EntityKind::Session => "session",
            EntityKind::Message => "message",
            EntityKind::Part => "part",
            EntityKind::Diff => "diff",
            EntityKind::Model => "model",
        }
    }

    pub fn from_name(name: &str) -> Option<EntityKind> {
        EntityKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// A whole entity; `data` is UTF-8 JSON that storage keeps as bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entity {
    pub kind: EntityKind,
    pub id: String,
    pub parent_id: String,
    pub data: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpBody {
    Put(Entity),
    Delete { kind: EntityKind, id: String },
}

impl OpBody {
    pub fn kind(&self) -> EntityKind {
        match self {
            OpBody::Put(e) => e.kind,
            OpBody::Delete { kind, .. } => *kind,
        }
    }

    pub fn entity_id(&self) -> &str {
        match self {
            OpBody::Put(e) => &e.id,
            OpBody::Delete { id, .. } => id,
        }
    }

    /// SHA-256 over an unambiguous encoding of the payload: what "same op" means for dedupe.
    pub fn payload_hash(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        match self {
            OpBody::Put(e) => {
                field(b"put");
                field(&[e.kind as u8]);
                field(e.id.as_bytes());
                field(e.parent_id.as_bytes());
                field(&e.data);
            }
            OpBody::Delete { kind, id } => {
                field(b"delete");
                field(&[*kind as u8]);
                field(id.as_bytes());
            }
        }
        h.finalize().into()
    }
}

/// A validated op with its permanent identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    pub op_id: Id16,
    pub body: OpBody,
}

/// An op as a client sent it: the protocol layer has already validated what it can without
/// the database, and an op it refused carries the reason to record as `rejected`.
#[derive(Clone, Debug)]
pub struct IncomingOp {
    /// As sent; not necessarily 16 bytes when `body` is an error.
    pub op_id: Vec<u8>,
    pub body: Result<OpBody, String>,
}

#[derive(Clone, Debug)]
pub struct IncomingBatch {
    pub client_id: Id16,
    pub batch_seq: u64,
    pub ops: Vec<IncomingOp>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpStatus {
    Applied = 0,
    Duplicate = 1,
    Conflict = 2,
    Rejected = 3,
}

impl OpStatus {
    pub fn from_code(code: u8) -> Option<OpStatus> {
        [OpStatus::Applied, OpStatus::Duplicate, OpStatus::Conflict, OpStatus::Rejected]
            .into_iter()
            .find(|s| *s as u8 == code)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpOutcome {
    pub op_id: Vec<u8>,
    pub status: OpStatus,
    /// For applied and duplicate: the seq the op got when first applied; 0 otherwise.
    pub seq: u64,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchAck {
    pub cursor: u64,
    pub batch_seq: u64,
    pub results: Vec<OpOutcome>,
}

/// An op as it stands in a session's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedOp {
    pub seq: u64,
    pub op: Op,
}

/// Rights of a session capability, as a bit set (read = 1, append = 2, mint = 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Rights {
    pub read: bool,
    pub append: bool,
    pub mint: bool,
}

impl Rights {
    pub const ALL: Rights = Rights { read: true, append: true, mint: true };

    pub fn bits(self) -> i64 {
        self.read as i64 | (self.append as i64) << 1 | (self.mint as i64) << 2
    }

    pub fn from_bits(bits: i64) -> Rights {
        Rights { read: bits & 1 != 0, append: bits & 2 != 0, mint: bits & 4 != 0 }
    }

    pub fn is_subset_of(self, other: Rights) -> bool {
        self.bits() & !other.bits() == 0
    }

    /// Comma-separated names, e.g. `read,append`.
    pub fn names(self) -> String {
        let mut names = Vec::new();
        if self.read {
            names.push("read");
        }
        if self.append {
            names.push("append");
        }
        if self.mint {
            names.push("mint");
        }
        names.join(",")
    }
}
