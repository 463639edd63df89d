//! The wire: MQTT topics, the CBOR envelope, size limits, and decoding errors that say what
//! was wrong.
//!
//! This module is pure: bytes in, typed messages out (and back), no sockets and no tables, so
//! it is tested with byte literals. Decoding happens in a fixed order so that each failure
//! has one precise answer: the size is checked before a single byte is parsed
//! ([`WireError::TooLarge`]); then a minimal header (version, kind, id) is read, because a
//! future protocol version may change everything else and deserves
//! [`WireError::UnsupportedVersion`] rather than "malformed"; then the full envelope; then
//! the body for its kind. The header's message id is kept as long as it could be read, so
//! even an ERROR about a broken body names the request it answers.
//!
//! Topic scheme (the broker is the domain's Catalog; see `docs/protocol.md`):
//! - `fluidos/v1/{domain}/catalog/{node}`: one retained advert per provider;
//! - `fluidos/v1/{domain}/to/{recipient}/from/{sender}`: addressed messages;
//! - `fluidos/v1/{domain}/discovery/from/{sender}`: LIST_FLAVOURS broadcasts.
//!
//! The sender is always a whole topic level, so mosquitto's `%u` ACL patterns can bind it to
//! the client certificate and the topic itself proves who sent a message.

use crate::model::{Contract, FlavourList, FlavourSelector, Id, ReserveRequest, Text};
use minicbor::bytes::ByteVec;
use minicbor::{Decode, Encode};

/// The only protocol version this agent speaks.
pub const VERSION: u8 = 1;
/// Largest payload accepted or sent, checked before decoding. A full advert of 16 flavours
/// with every optional field is under 4 KiB; the largest message is a PEER_ACCEPT carrying a
/// peering kubeconfig (at most [`MAX_IDENTITY`]).
pub const MAX_PAYLOAD: usize = 16 * 1024;
/// Largest peering identity (a kubeconfig with embedded certificates) in PEER_ACCEPT.
pub const MAX_IDENTITY: usize = 12 * 1024;
/// Largest MQTT packet the client accepts at all. Larger than [`MAX_PAYLOAD`] on purpose:
/// an oversized but otherwise normal publish then reaches the agent, which answers it with
/// ERROR `TooLarge`, instead of making the MQTT client drop the whole connection.
pub const MAX_PACKET: usize = 64 * 1024;
/// Longest error text.
pub const MAX_ERROR_TEXT: usize = 256;

/// Message kinds (envelope key 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    ListFlavours = 1,
    Flavours = 2,
    ReserveFlavour = 3,
    Reserved = 4,
    Error = 5,
    Advert = 6,
    PeerRequest = 7,
    PeerAccept = 8,
    Release = 9,
    Released = 10,
    Renew = 11,
    Renewed = 12,
}

impl Kind {
    pub fn from_u16(v: u16) -> Option<Kind> {
        Some(match v {
            1 => Kind::ListFlavours,
            2 => Kind::Flavours,
            3 => Kind::ReserveFlavour,
            4 => Kind::Reserved,
            5 => Kind::Error,
            6 => Kind::Advert,
            7 => Kind::PeerRequest,
            8 => Kind::PeerAccept,
            9 => Kind::Release,
            10 => Kind::Released,
            11 => Kind::Renew,
            12 => Kind::Renewed,
            _ => return None,
        })
    }
}

/// Error codes carried by ERROR messages (body key 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// Not CBOR, or not the layout its kind requires.
    Malformed = 1,
    /// Payload over [`MAX_PAYLOAD`].
    TooLarge = 2,
    /// Envelope version other than [`VERSION`].
    UnsupportedVersion = 3,
    /// A kind this agent does not know.
    UnknownKind = 4,
    /// The flavour is not (or no longer) on offer.
    FlavourGone = 5,
    /// The partition asked for does not fit in what is left.
    NoFit = 6,
    /// The partition breaks the flavour's minimum or step rules, or asks to split a flavour
    /// sold only whole.
    BadPartition = 7,
    /// A known kind on a topic where it has no meaning, or a sender field that contradicts
    /// the topic.
    Unexpected = 8,
    /// The provider could not make the reservation durable; nothing was reserved. Retry later.
    Storage = 9,
    /// Too many requests; retry later.
    Busy = 10,
    /// No signed, live contract matches the request (PEER_REQUEST, RELEASE).
    NoContract = 11,
    /// The provider's fabric could not set the peering up; the text says why.
    PeeringFailed = 12,
    /// The buyer holds as many unpeered reservations as the provider allows per buyer.
    TooManyPending = 13,
    /// A PEER_REQUEST on a TLS domain without a certificate of the sender's from the domain
    /// CA with a P-256 key, so the identity cannot be sealed to it.
    BadCertificate = 14,
    /// The reservation would give the buyer more of an offer than the provider sells to one
    /// buyer (`[offer] max_per_buyer`).
    ShareExceeded = 15,
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> Option<ErrorCode> {
        use ErrorCode::*;
        Some(match v {
            1 => Malformed,
            2 => TooLarge,
            3 => UnsupportedVersion,
            4 => UnknownKind,
            5 => FlavourGone,
            6 => NoFit,
            7 => BadPartition,
            8 => Unexpected,
            9 => Storage,
            10 => Busy,
            11 => NoContract,
            12 => PeeringFailed,
            13 => TooManyPending,
            14 => BadCertificate,
            15 => ShareExceeded,
            _ => return None,
        })
    }
}

/// LIST_FLAVOURS body.
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct ListFlavours {
    #[n(0)]
    pub selector: FlavourSelector,
}

/// FLAVOURS body (answer to LIST_FLAVOURS) and catalog ADVERT body.
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct Flavours {
    #[n(0)]
    pub flavours: FlavourList,
}

/// ERROR body.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct ErrorBody {
    /// An [`ErrorCode`]; unknown codes are kept as numbers.
    #[n(0)]
    pub code: u16,
    #[n(1)]
    pub text: Text<MAX_ERROR_TEXT>,
}

impl ErrorBody {
    /// Builds an error body, cutting the text at [`MAX_ERROR_TEXT`] on a char boundary.
    pub fn new(code: ErrorCode, text: &str) -> ErrorBody {
        let mut end = text.len().min(MAX_ERROR_TEXT);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        ErrorBody {
            code: code as u16,
            text: Text::new(&text[..end]).unwrap_or_default(),
        }
    }

    pub fn code(&self) -> Option<ErrorCode> {
        ErrorCode::from_u16(self.code)
    }
}

/// A byte string of at most `N` bytes: decoding refuses a longer one from its header.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Bytes<const N: usize>(Vec<u8>);

impl<const N: usize> Bytes<N> {
    pub fn new(b: &[u8]) -> Result<Self, crate::model::ModelError> {
        if b.len() > N {
            return Err(crate::model::ModelError::TooLong {
                max: N,
                len: b.len(),
            });
        }
        Ok(Bytes(b.to_vec()))
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }
}

impl<const N: usize> std::fmt::Debug for Bytes<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

impl<C, const N: usize> Encode<C> for Bytes<N> {
    fn encode<W: minicbor::encode::Write>(
        &self,
        e: &mut minicbor::Encoder<W>,
        _: &mut C,
    ) -> Result<(), minicbor::encode::Error<W::Error>> {
        e.bytes(&self.0)?;
        Ok(())
    }
}

impl<'b, C, const N: usize> Decode<'b, C> for Bytes<N> {
    fn decode(d: &mut minicbor::Decoder<'b>, _: &mut C) -> Result<Self, minicbor::decode::Error> {
        // `bytes` refuses indefinite-length strings; the slice is borrowed, not copied, until
        // its length is checked.
        let b = d.bytes()?;
        Bytes::new(b).map_err(|e| minicbor::decode::Error::message(format!("bytes: {e}")))
    }
}

/// Largest sealed identity: the largest identity plus what sealing adds.
pub const MAX_SEALED: usize = MAX_IDENTITY + crate::seal::OVERHEAD;

/// PEER_REQUEST body: the consumer asks the seller to peer for a contract (steps 21-22).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct PeerRequest {
    #[n(0)]
    pub contract: Id,
    /// The consumer's Liqo cluster id.
    #[n(1)]
    pub cluster_id: Id,
    /// The consumer's node certificate (DER), to seal the identity to (docs/protocol.md).
    #[n(2)]
    pub certificate: Option<Bytes<{ crate::seal::MAX_CERTIFICATE }>>,
}

/// PEER_ACCEPT body: the seller's answer (step 26, Liqo's "ResourceOffer").
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct PeerAccept {
    #[n(0)]
    pub contract: Id,
    /// The provider's Liqo cluster id.
    #[n(1)]
    pub cluster_id: Id,
    /// A kubeconfig for Liqo's peering user (`liqoctl generate peering-user`); absent when
    /// the consumer already peers with this provider and reuses that peering.
    #[n(2)]
    pub identity: Option<crate::model::LongText<MAX_IDENTITY>>,
    /// The identity sealed to the consumer's certificate key (instead of `identity`).
    #[n(3)]
    pub sealed: Option<Bytes<MAX_SEALED>>,
}

/// RELEASE and RELEASED body.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct ContractRef {
    #[n(0)]
    pub contract: Id,
}

/// A decoded message body, one variant per kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    ListFlavours(ListFlavours),
    Flavours(Flavours),
    ReserveFlavour(ReserveRequest),
    Reserved(Box<Contract>),
    Error(ErrorBody),
    Advert(Flavours),
    PeerRequest(PeerRequest),
    PeerAccept(PeerAccept),
    Release(ContractRef),
    Released(ContractRef),
    /// The buyer extends a contract's end (docs/protocol.md).
    Renew(ContractRef),
    /// The seller's answer: the contract with its new `ends_at`.
    Renewed(Box<Contract>),
}

impl Body {
    pub fn kind(&self) -> Kind {
        match self {
            Body::ListFlavours(_) => Kind::ListFlavours,
            Body::Flavours(_) => Kind::Flavours,
            Body::ReserveFlavour(_) => Kind::ReserveFlavour,
            Body::Reserved(_) => Kind::Reserved,
            Body::Error(_) => Kind::Error,
            Body::Advert(_) => Kind::Advert,
            Body::PeerRequest(_) => Kind::PeerRequest,
            Body::PeerAccept(_) => Kind::PeerAccept,
            Body::Release(_) => Kind::Release,
            Body::Released(_) => Kind::Released,
            Body::Renew(_) => Kind::Renew,
            Body::Renewed(_) => Kind::Renewed,
        }
    }

    /// The body alone, as CBOR (what the envelope carries under key 6).
    pub fn to_bytes(&self) -> Vec<u8> {
        // Encoding into a Vec cannot fail (the writer is infallible).
        let r = match self {
            Body::ListFlavours(b) => minicbor::to_vec(b),
            Body::Flavours(b) | Body::Advert(b) => minicbor::to_vec(b),
            Body::ReserveFlavour(b) => minicbor::to_vec(b),
            Body::Reserved(b) => minicbor::to_vec(b.as_ref()),
            Body::Error(b) => minicbor::to_vec(b),
            Body::PeerRequest(b) => minicbor::to_vec(b),
            Body::PeerAccept(b) => minicbor::to_vec(b),
            Body::Release(b) | Body::Released(b) | Body::Renew(b) => minicbor::to_vec(b),
            Body::Renewed(b) => minicbor::to_vec(b.as_ref()),
        };
        r.unwrap_or_default()
    }

    fn from_bytes(kind: Kind, b: &[u8]) -> Result<Body, minicbor::decode::Error> {
        Ok(match kind {
            Kind::ListFlavours => Body::ListFlavours(minicbor::decode(b)?),
            Kind::Flavours => Body::Flavours(minicbor::decode(b)?),
            Kind::ReserveFlavour => Body::ReserveFlavour(minicbor::decode(b)?),
            Kind::Reserved => Body::Reserved(Box::new(minicbor::decode(b)?)),
            Kind::Error => Body::Error(minicbor::decode(b)?),
            Kind::Advert => Body::Advert(minicbor::decode(b)?),
            Kind::PeerRequest => Body::PeerRequest(minicbor::decode(b)?),
            Kind::PeerAccept => Body::PeerAccept(minicbor::decode(b)?),
            Kind::Release => Body::Release(minicbor::decode(b)?),
            Kind::Released => Body::Released(minicbor::decode(b)?),
            Kind::Renew => Body::Renew(minicbor::decode(b)?),
            Kind::Renewed => Body::Renewed(Box::new(minicbor::decode(b)?)),
        })
    }
}

/// The envelope as it is on the wire.
#[derive(Encode, Decode)]
#[cbor(map)]
struct RawEnvelope {
    #[n(0)]
    version: u8,
    #[n(1)]
    kind: u16,
    #[n(2)]
    id: u64,
    #[n(3)]
    correlation: Option<u64>,
    #[n(4)]
    sent_at: u64,
    #[n(5)]
    sender: Id,
    #[n(6)]
    body: ByteVec,
}

/// The part of the envelope that every protocol version keeps: keys 0 to 2.
#[derive(Decode)]
#[cbor(map)]
struct Header {
    #[n(0)]
    version: u8,
    #[n(2)]
    id: Option<u64>,
}

/// A decoded message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Unique per sender; answers carry it as their `correlation`.
    pub id: u64,
    /// The id of the message this one answers.
    pub correlation: Option<u64>,
    /// Unix milliseconds at the sender.
    pub sent_at: u64,
    /// Who the envelope says sent it; checked against the topic.
    pub sender: Id,
    pub body: Body,
}

impl Message {
    /// Encodes the message, refusing to produce a payload the receiver would refuse.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let raw = RawEnvelope {
            version: VERSION,
            kind: self.body.kind() as u16,
            id: self.id,
            correlation: self.correlation,
            sent_at: self.sent_at,
            sender: self.sender.clone(),
            body: ByteVec::from(self.body.to_bytes()),
        };
        let bytes = minicbor::to_vec(&raw).unwrap_or_default();
        if bytes.len() > MAX_PAYLOAD {
            return Err(WireError::TooLarge {
                len: bytes.len(),
                max: MAX_PAYLOAD,
            });
        }
        Ok(bytes)
    }

    /// Wraps any body bytes in an envelope, unchecked: for tests, fuzzing and tools that
    /// need to send what [`Message::encode`] refuses to produce.
    pub fn envelope(kind: u16, id: u64, sender: &Id, body: &[u8]) -> Vec<u8> {
        let raw = RawEnvelope {
            version: VERSION,
            kind,
            id,
            correlation: None,
            sent_at: 0,
            sender: sender.clone(),
            body: ByteVec::from(body.to_vec()),
        };
        minicbor::to_vec(&raw).unwrap_or_default()
    }

    /// Decodes a payload; see the module docs for the order of the checks.
    pub fn decode(bytes: &[u8]) -> Result<Message, WireError> {
        if bytes.len() > MAX_PAYLOAD {
            return Err(WireError::TooLarge {
                len: bytes.len(),
                max: MAX_PAYLOAD,
            });
        }
        let header: Header = minicbor::decode(bytes).map_err(|e| WireError::Malformed {
            id: None,
            reason: format!("envelope: {e}"),
        })?;
        if header.version != VERSION {
            return Err(WireError::UnsupportedVersion {
                version: header.version,
                id: header.id,
            });
        }
        let raw: RawEnvelope = minicbor::decode(bytes).map_err(|e| WireError::Malformed {
            id: header.id,
            reason: format!("envelope: {e}"),
        })?;
        let kind = Kind::from_u16(raw.kind).ok_or(WireError::UnknownKind {
            kind: raw.kind,
            id: Some(raw.id),
        })?;
        let body = Body::from_bytes(kind, &raw.body).map_err(|e| WireError::Malformed {
            id: Some(raw.id),
            reason: format!("{kind:?} body: {e}"),
        })?;
        Ok(Message {
            id: raw.id,
            correlation: raw.correlation,
            sent_at: raw.sent_at,
            sender: raw.sender,
            body,
        })
    }
}

/// Why a payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("payload of {len} bytes is over the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("malformed message: {reason}")]
    Malformed { id: Option<u64>, reason: String },
    #[error("unsupported protocol version {version} (this agent speaks {VERSION})")]
    UnsupportedVersion { version: u8, id: Option<u64> },
    #[error("unknown message kind {kind}")]
    UnknownKind { kind: u16, id: Option<u64> },
}

impl WireError {
    /// The ERROR code that answers this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::TooLarge { .. } => ErrorCode::TooLarge,
            WireError::Malformed { .. } => ErrorCode::Malformed,
            WireError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            WireError::UnknownKind { .. } => ErrorCode::UnknownKind,
        }
    }

    /// The id of the refused message, when it could be read: the ERROR's correlation.
    pub fn message_id(&self) -> Option<u64> {
        match self {
            WireError::TooLarge { .. } => None,
            WireError::Malformed { id, .. }
            | WireError::UnsupportedVersion { id, .. }
            | WireError::UnknownKind { id, .. } => *id,
        }
    }
}

/// Where a topic leads: who published it and for whom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `catalog/{node}`: a provider's retained advert (empty payload: the node is gone).
    Catalog { node: Id },
    /// `to/{recipient}/from/{sender}`.
    Addressed { to: Id, from: Id },
    /// `discovery/from/{sender}`.
    Discovery { from: Id },
}

/// Topic names for one node in one domain.
#[derive(Clone, Debug)]
pub struct Topics {
    root: String,
    me: Id,
}

impl Topics {
    pub fn new(domain: &Id, me: &Id) -> Topics {
        Topics {
            root: format!("fluidos/v1/{domain}"),
            me: me.clone(),
        }
    }

    pub fn me(&self) -> &Id {
        &self.me
    }

    /// This node's retained catalog entry (and the topic of its last will).
    pub fn my_catalog(&self) -> String {
        format!("{}/catalog/{}", self.root, self.me)
    }

    /// Where to send a message for `recipient`.
    pub fn to(&self, recipient: &Id) -> String {
        format!("{}/to/{}/from/{}", self.root, recipient, self.me)
    }

    /// Where this node broadcasts LIST_FLAVOURS.
    pub fn my_discovery(&self) -> String {
        format!("{}/discovery/from/{}", self.root, self.me)
    }

    /// Filters this node subscribes to: its own mail, all discovery, and the whole catalog
    /// when `catalog` is true.
    pub fn subscriptions(&self, catalog: bool) -> Vec<String> {
        let mut v = vec![
            format!("{}/to/{}/from/+", self.root, self.me),
            format!("{}/discovery/from/+", self.root),
        ];
        if catalog {
            v.push(format!("{}/catalog/+", self.root));
        }
        v
    }

    /// The sender named by an addressed or discovery topic of this domain (not parsed
    /// into an [`Id`]: this runs for every message, before the node task sees it).
    pub fn sender_of<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let rest = topic.strip_prefix(self.root.as_str())?;
        let (_, from) = rest.rsplit_once("/from/")?;
        (!from.is_empty() && !from.contains('/')).then_some(from)
    }

    /// Whether `topic` is a catalog entry of this domain (cheap: no id validation).
    pub fn is_catalog(&self, topic: &str) -> bool {
        topic
            .strip_prefix(self.root.as_str())
            .is_some_and(|r| r.starts_with("/catalog/"))
    }

    /// Parses a topic of this domain. Anything else (another domain, an extra level, an id
    /// outside the id alphabet) is `None`: the broker delivered something it should not have.
    pub fn parse(&self, topic: &str) -> Option<Route> {
        let rest = topic.strip_prefix(self.root.as_str())?.strip_prefix('/')?;
        let levels: Vec<&str> = rest.split('/').collect();
        match levels.as_slice() {
            ["catalog", node] => Some(Route::Catalog {
                node: Id::new(node).ok()?,
            }),
            ["to", to, "from", from] => Some(Route::Addressed {
                to: Id::new(to).ok()?,
                from: Id::new(from).ok()?,
            }),
            ["discovery", "from", from] => Some(Route::Discovery {
                from: Id::new(from).ok()?,
            }),
            _ => None,
        }
    }
}

/// One example message of each kind, with fixed values: the hex dumps in
/// `docs/protocol.md` are these, byte for byte (a test checks it), and they seed fuzzing.
pub fn examples() -> Vec<(&'static str, Message)> {
    use crate::model::{
        Contract, ContractState, Flavour, Location, Partitionability, Price, Resources,
    };
    let id = |s: &str| Id::new(s).unwrap_or_default();
    fn text<const N: usize>(s: &str) -> Text<N> {
        Text::new(s).unwrap_or_default()
    }
    const GIB: u64 = 1 << 30;
    const T0: u64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
    let flavour = Flavour {
        id: id("edge-pool.7"),
        provider: id("provider-1"),
        architecture: text("arm64"),
        resources: Resources {
            cpu: 4000,
            memory: 8 * GIB,
            pods: 110,
            storage: 0,
        },
        gpu: None,
        partitionability: Some(Partitionability {
            cpu_min: 500,
            memory_min: GIB,
            pods_min: 1,
            cpu_step: 500,
            memory_step: GIB,
            pods_step: 1,
        }),
        price: Price {
            amount: 2_000_000,
            currency: text("EUR"),
            period: text("hour"),
        },
        available: true,
        location: Some(Location {
            country: Some(text("IT")),
            city: Some(text("Turin")),
            notes: None,
        }),
    };
    let piece = Resources {
        cpu: 1000,
        memory: 2 * GIB,
        pods: 1,
        storage: 0,
    };
    let request = ReserveRequest {
        transaction: id("consumer-1.t5"),
        flavour: flavour.id.clone(),
        buyer: id("consumer-1"),
        partition: Some(piece),
    };
    let contract = Contract {
        id: id("provider-1.c9"),
        transaction: request.transaction.clone(),
        flavour: flavour.clone(),
        buyer: id("consumer-1"),
        seller: id("provider-1"),
        resources: piece,
        price: 500_000,
        created_at: T0 + 30,
        expires_at: T0 + 30 + 600_000,
        state: ContractState::Reserved,
        term_ms: None,
        ends_at: None,
    };
    let list = Flavours {
        flavours: FlavourList::from_slice_truncated(std::slice::from_ref(&flavour)),
    };
    let msg = |n: u64, corr: Option<u64>, from: &str, body: Body| Message {
        id: n,
        correlation: corr,
        sent_at: T0 + n * 10,
        sender: id(from),
        body,
    };
    vec![
        (
            "LIST_FLAVOURS",
            msg(
                1,
                None,
                "consumer-1",
                Body::ListFlavours(ListFlavours {
                    selector: FlavourSelector {
                        architecture: Some(text("arm64")),
                        min: Some(piece),
                        max: None,
                        max_price: Some(1_000_000),
                        gpu: None,
                        country: None,
                    },
                }),
            ),
        ),
        (
            "FLAVOURS",
            msg(2, Some(1), "provider-1", Body::Flavours(list.clone())),
        ),
        (
            "RESERVE_FLAVOUR",
            msg(3, None, "consumer-1", Body::ReserveFlavour(request)),
        ),
        (
            "RESERVED",
            msg(4, Some(3), "provider-1", Body::Reserved(Box::new(contract))),
        ),
        (
            "ERROR",
            msg(
                5,
                Some(3),
                "provider-1",
                Body::Error(ErrorBody::new(
                    ErrorCode::NoFit,
                    "the partition does not fit in what is left of flavour edge-pool.7",
                )),
            ),
        ),
        ("ADVERT", msg(6, None, "provider-1", Body::Advert(list))),
        (
            "PEER_REQUEST",
            msg(
                7,
                None,
                "consumer-1",
                Body::PeerRequest(PeerRequest {
                    contract: id("provider-1.c9"),
                    cluster_id: id("gw-consumer-cluster"),
                    certificate: None,
                }),
            ),
        ),
        (
            "PEER_ACCEPT",
            msg(
                8,
                Some(7),
                "provider-1",
                Body::PeerAccept(PeerAccept {
                    contract: id("provider-1.c9"),
                    cluster_id: id("gw-provider-cluster"),
                    identity: crate::model::LongText::new("apiVersion: v1\nkind: Config\n").ok(),
                    sealed: None,
                }),
            ),
        ),
        (
            "RELEASE",
            msg(
                9,
                None,
                "consumer-1",
                Body::Release(ContractRef {
                    contract: id("provider-1.c9"),
                }),
            ),
        ),
        (
            "RELEASED",
            msg(
                10,
                Some(9),
                "provider-1",
                Body::Released(ContractRef {
                    contract: id("provider-1.c9"),
                }),
            ),
        ),
        (
            "RENEW",
            msg(
                11,
                None,
                "consumer-1",
                Body::Renew(ContractRef {
                    contract: id("provider-1.c9"),
                }),
            ),
        ),
    ]
}

/// Formats bytes as the hex dumps of `docs/protocol.md`: 16 bytes a line, offset first.
pub fn hex_dump(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (i, chunk) in bytes.chunks(16).enumerate() {
        let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
        out.push_str(&format!("{:04x}  {}\n", i * 16, hex.join(" ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build_message(body: Body) -> Message {
        Message {
            id: 7,
            correlation: None,
            sent_at: 1_700_000_000_000,
            sender: Id::new("consumer-1").unwrap(),
            body,
        }
    }

    #[test]
    fn message_round_trips_through_cbor() {
        let m = build_message(Body::Error(ErrorBody::new(ErrorCode::NoFit, "too big")));
        let bytes = m.encode().unwrap();
        assert_eq!(Message::decode(&bytes).unwrap(), m);
    }

    #[test]
    fn error_envelope_has_the_documented_bytes() {
        let mut m = build_message(Body::Error(ErrorBody::new(ErrorCode::FlavourGone, "x")));
        m.correlation = Some(5);
        let bytes = m.encode().unwrap();
        #[rustfmt::skip]
        let expected: &[u8] = &[
            0xa7,                   // map(7)
            0x00, 0x01,             // 0: version 1
            0x01, 0x05,             // 1: kind 5 (ERROR)
            0x02, 0x07,             // 2: id 7
            0x03, 0x05,             // 3: correlation 5
            0x04, 0x1b, 0x00, 0x00, 0x01, 0x8b, 0xcf, 0xe5, 0x68, 0x00, // 4: sent_at
            0x05, 0x6a, b'c', b'o', b'n', b's', b'u', b'm', b'e', b'r', b'-', b'1', // 5: sender
            0x06, 0x46,             // 6: body, bytes(6)
                0xa2, 0x00, 0x05, 0x01, 0x61, b'x', // {0: 5, 1: "x"}
        ];
        assert_eq!(bytes, expected);
    }

    #[test]
    fn oversized_payload_is_refused_before_decoding() {
        let junk = vec![0xffu8; MAX_PAYLOAD + 1];
        assert!(matches!(
            Message::decode(&junk),
            Err(WireError::TooLarge { len, .. }) if len == MAX_PAYLOAD + 1
        ));
    }

    #[test]
    fn garbage_is_malformed_without_an_id() {
        let err = Message::decode(b"hello world").unwrap_err();
        assert_eq!(err.code(), ErrorCode::Malformed);
        assert_eq!(err.message_id(), None);
    }

    #[test]
    fn unknown_version_is_reported_with_the_message_id() {
        // {0: 2, 1: 1, 2: 9} : a version-2 header; the rest does not matter.
        let bytes = [0xa3, 0x00, 0x02, 0x01, 0x01, 0x02, 0x09];
        assert_eq!(
            Message::decode(&bytes),
            Err(WireError::UnsupportedVersion {
                version: 2,
                id: Some(9)
            })
        );
    }

    #[test]
    fn unknown_kind_is_reported_with_the_message_id() {
        let mut bytes = build_message(Body::ListFlavours(ListFlavours::default()))
            .encode()
            .unwrap();
        assert_eq!(&bytes[3..5], &[0x01, 0x01]); // key 1, kind 1
        bytes[4] = 0x17; // kind 23
        assert_eq!(
            Message::decode(&bytes),
            Err(WireError::UnknownKind {
                kind: 23,
                id: Some(7)
            })
        );
    }

    #[test]
    fn broken_body_is_malformed_with_the_message_id() {
        let raw = RawEnvelope {
            version: 1,
            kind: Kind::ReserveFlavour as u16,
            id: 11,
            correlation: None,
            sent_at: 0,
            sender: Id::new("a").unwrap(),
            body: ByteVec::from(vec![0xa1, 0x00]), // map(1) with a key and no value
        };
        let bytes = minicbor::to_vec(&raw).unwrap();
        let err = Message::decode(&bytes).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Malformed);
        assert_eq!(err.message_id(), Some(11));
    }

    #[test]
    fn sender_outside_the_id_alphabet_is_malformed() {
        let mut bytes = build_message(Body::ListFlavours(ListFlavours::default()))
            .encode()
            .unwrap();
        let pos = bytes.iter().position(|b| *b == b'-').unwrap();
        bytes[pos] = b'/';
        assert_eq!(
            Message::decode(&bytes).unwrap_err().code(),
            ErrorCode::Malformed
        );
    }

    #[test]
    fn topics_parse_only_this_domain_and_whole_levels() {
        let t = Topics::new(&Id::new("d1").unwrap(), &Id::new("me").unwrap());
        assert_eq!(
            t.parse("fluidos/v1/d1/to/me/from/p1"),
            Some(Route::Addressed {
                to: Id::new("me").unwrap(),
                from: Id::new("p1").unwrap()
            })
        );
        assert_eq!(
            t.parse("fluidos/v1/d1/catalog/p1"),
            Some(Route::Catalog {
                node: Id::new("p1").unwrap()
            })
        );
        assert_eq!(t.parse("fluidos/v1/d1/catalog/p1/x"), None);
        assert_eq!(t.parse("fluidos/v1/d2/catalog/p1"), None);
        assert_eq!(t.parse("fluidos/v1/d1x/catalog/p1"), None);
        assert_eq!(t.parse("fluidos/v1/d1/discovery/from/a b"), None);
        assert_eq!(t.my_catalog(), "fluidos/v1/d1/catalog/me");
        assert_eq!(t.to(&Id::new("p1").unwrap()), "fluidos/v1/d1/to/p1/from/me");
    }

    /// The decoding rules docs/protocol.md promises to other implementations.
    #[test]
    fn decoders_accept_any_key_order_null_optionals_and_skip_unknown_keys() {
        // ERROR body written as {1: "x", 7: [1, 2], 0: 5}: keys out of order plus an unknown key.
        let body = [0xa3, 0x01, 0x61, b'x', 0x07, 0x82, 0x01, 0x02, 0x00, 0x05];
        let b: ErrorBody = minicbor::decode(&body).unwrap();
        assert_eq!((b.code, b.text.as_str()), (5, "x"));
        // Selector {0: null, 3: 7}: a null optional is absent.
        let sel: FlavourSelector = minicbor::decode(&[0xa2, 0x00, 0xf6, 0x03, 0x07]).unwrap();
        assert_eq!(sel.architecture, None);
        assert_eq!(sel.max_price, Some(7));
        // A missing required key is an error: ERROR body without its text.
        assert!(minicbor::decode::<ErrorBody>(&[0xa1, 0x00, 0x05]).is_err());
        // Indefinite-length text is refused.
        assert!(
            minicbor::decode::<ErrorBody>(&[0xa2, 0x00, 0x05, 0x01, 0x7f, 0x61, b'x', 0xff])
                .is_err()
        );
    }

    #[test]
    fn every_example_round_trips() {
        for (name, m) in examples() {
            let bytes = m.encode().unwrap();
            assert_eq!(Message::decode(&bytes).unwrap(), m, "{name}");
        }
    }

    /// The hex dumps in docs/protocol.md are what the encoder produces, byte for byte.
    #[test]
    fn protocol_doc_hex_dumps_match_the_encoder() {
        let doc = include_str!("../../docs/protocol.md");
        for (name, m) in examples() {
            let marker = format!("<!-- example: {name} -->\n```text\n");
            let start = doc
                .find(&marker)
                .unwrap_or_else(|| panic!("docs/protocol.md has no example {name}"))
                + marker.len();
            let end = start + doc[start..].find("```").unwrap();
            assert_eq!(
                &doc[start..end],
                hex_dump(&m.encode().unwrap()),
                "example {name}"
            );
        }
    }

    #[test]
    fn error_text_is_cut_at_the_limit_on_a_char_boundary() {
        let long = "é".repeat(200); // 400 bytes
        let b = ErrorBody::new(ErrorCode::Malformed, &long);
        assert!(b.text.as_str().len() <= MAX_ERROR_TEXT);
        assert!(b.text.as_str().chars().all(|c| c == 'é'));
    }
}
