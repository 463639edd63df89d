//! The wire: MQTT topics, the CBOR envelope, size limits, and decoding errors that say what
//! was wrong.
//!
//! Decoders are strict about the encoding ([`check_encoding`]: one data item and nothing
//! after it, definite lengths, no key twice, shortest integers), so that two implementations
//! can never read one payload two ways; and an ERROR is recognised ([`is_error`]) even when
//! nothing else in it can be decoded, so that it is never answered.
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

use crate::model::{Contract, FlavourList, FlavourSelector, Id, ReserveRequest, Text, MAX_NODE_ID};
use minicbor::bytes::ByteVec;
use minicbor::{Decode, Encode};

/// The only protocol version this agent speaks.
pub const VERSION: u8 = 1;
/// The revision of version 1 this agent implements (docs/protocol.md section 9): which of
/// the compatible changes listed in the changelog it has. Adverts and FLAVOURS answers carry
/// it (key 2); a peer that sends none is revision 0, a build from before v0.1.0.
pub const REVISION: u16 = 1;
/// Longest `agent` text in an advert (`fluidlet 0.1.0 (2040fc1)`).
pub const MAX_AGENT: usize = 64;
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
/// Longest Liqo version in PEER_REQUEST / PEER_ACCEPT (`v1.0.3`, or a commit id).
pub const MAX_LIQO_VERSION: usize = 64;

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
    /// The kind's name as docs/protocol.md spells it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::ListFlavours => "LIST_FLAVOURS",
            Kind::Flavours => "FLAVOURS",
            Kind::ReserveFlavour => "RESERVE_FLAVOUR",
            Kind::Reserved => "RESERVED",
            Kind::Error => "ERROR",
            Kind::Advert => "ADVERT",
            Kind::PeerRequest => "PEER_REQUEST",
            Kind::PeerAccept => "PEER_ACCEPT",
            Kind::Release => "RELEASE",
            Kind::Released => "RELEASED",
            Kind::Renew => "RENEW",
            Kind::Renewed => "RENEWED",
        }
    }

    /// Every kind, in the order of their numbers: the one table `from_u16` reads.
    pub const ALL: [Kind; 12] = [
        Kind::ListFlavours,
        Kind::Flavours,
        Kind::ReserveFlavour,
        Kind::Reserved,
        Kind::Error,
        Kind::Advert,
        Kind::PeerRequest,
        Kind::PeerAccept,
        Kind::Release,
        Kind::Released,
        Kind::Renew,
        Kind::Renewed,
    ];

    pub fn from_u16(v: u16) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| *k as u16 == v)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
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
    /// Every code, in the order of their numbers: the one table `from_u16` reads.
    pub const ALL: [ErrorCode; 15] = {
        use ErrorCode::*;
        [
            Malformed,
            TooLarge,
            UnsupportedVersion,
            UnknownKind,
            FlavourGone,
            NoFit,
            BadPartition,
            Unexpected,
            Storage,
            Busy,
            NoContract,
            PeeringFailed,
            TooManyPending,
            BadCertificate,
            ShareExceeded,
        ]
    };

    pub fn from_u16(v: u16) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| *c as u16 == v)
    }

    /// The code's name as docs/protocol.md spells it.
    pub fn name(self) -> &'static str {
        use ErrorCode::*;
        match self {
            Malformed => "MALFORMED",
            TooLarge => "TOO_LARGE",
            UnsupportedVersion => "UNSUPPORTED_VERSION",
            UnknownKind => "UNKNOWN_KIND",
            FlavourGone => "FLAVOUR_GONE",
            NoFit => "NO_FIT",
            BadPartition => "BAD_PARTITION",
            Unexpected => "UNEXPECTED",
            Storage => "STORAGE",
            Busy => "BUSY",
            NoContract => "NO_CONTRACT",
            PeeringFailed => "PEERING_FAILED",
            TooManyPending => "TOO_MANY_PENDING",
            BadCertificate => "BAD_CERTIFICATE",
            ShareExceeded => "SHARE_EXCEEDED",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
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
    /// The sender's implementation and release (`fluidlet 0.1.0 (2040fc1)`), for operators;
    /// nothing depends on it. Absent from builds before v0.1.0.
    #[n(1)]
    pub agent: Option<Text<MAX_AGENT>>,
    /// The protocol revision the sender implements ([`REVISION`]); absent: 0.
    #[n(2)]
    pub revision: Option<u16>,
}

impl Flavours {
    /// This node's flavours, labelled with its release and [`REVISION`].
    pub fn own(flavours: FlavourList) -> Flavours {
        Flavours {
            flavours,
            agent: Text::new(&crate::model::version()).ok(),
            revision: Some(REVISION),
        }
    }
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

/// Largest certificate a PEER_REQUEST may carry (a P-256 node certificate is under 1 KiB).
pub const MAX_CERTIFICATE: usize = 4096;
/// Bytes a seal adds to the identity: the ephemeral P-256 point (65) and the AEAD tag (16)
/// (docs/protocol.md, "Sealed identity"; `seal` checks its construction against it).
pub const SEAL_OVERHEAD: usize = 65 + 16;
/// Largest sealed identity: the largest identity plus what sealing adds.
pub const MAX_SEALED: usize = MAX_IDENTITY + SEAL_OVERHEAD;

/// PEER_REQUEST body: the consumer asks the seller to peer for a contract (steps 21-22).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct PeerRequest {
    #[n(0)]
    pub contract: Id,
    /// The consumer's Liqo cluster id.
    #[n(1)]
    pub cluster_id: Id,
    /// The consumer's Liqo version (`liqoctl info --get local.version`); absent from older
    /// senders.
    #[n(2)]
    pub liqo_version: Option<Text<MAX_LIQO_VERSION>>,
    /// The consumer's node certificate (DER), to seal the identity to (docs/protocol.md).
    #[n(3)]
    pub certificate: Option<Bytes<MAX_CERTIFICATE>>,
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
    /// The provider's Liqo version; absent from older senders.
    #[n(3)]
    pub liqo_version: Option<Text<MAX_LIQO_VERSION>>,
    /// The identity sealed to the consumer's certificate key (instead of `identity`).
    #[n(4)]
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
        if self.sender.as_str().len() > MAX_NODE_ID {
            return Err(WireError::Malformed {
                id: Some(self.id),
                reason: format!("sender {} is longer than a node id", self.sender),
            });
        }
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

    /// Decodes a payload; see the module docs for the order of the checks, and
    /// [`check_encoding`] for how strict it is.
    pub fn decode(bytes: &[u8]) -> Result<Message, WireError> {
        if bytes.len() > MAX_PAYLOAD {
            return Err(WireError::TooLarge {
                len: bytes.len(),
                max: MAX_PAYLOAD,
            });
        }
        // Key 0 missing, unreadable or there twice: still name the message if key 2 can be
        // read (docs/protocol.md section 5, step 2). Twice is caught here, before the version
        // is looked at, so that `{0: 1, 0: 9}` and `{0: 9, 0: 1}` get the same answer.
        if count_key(bytes, 0) > 1 {
            return Err(WireError::Malformed {
                id: peek_key(bytes, 2),
                reason: "envelope: key 0 (the version) twice".into(),
            });
        }
        let header: Header = minicbor::decode(bytes).map_err(|e| WireError::Malformed {
            id: peek_key(bytes, 2),
            reason: format!("envelope: {e}"),
        })?;
        if header.version != VERSION {
            return Err(WireError::UnsupportedVersion {
                version: header.version,
                id: header.id,
            });
        }
        check_encoding(bytes).map_err(|reason| WireError::Malformed {
            id: header.id,
            reason: format!("envelope: {reason}"),
        })?;
        let raw: RawEnvelope = minicbor::decode(bytes).map_err(|e| WireError::Malformed {
            id: header.id,
            reason: format!("envelope: {e}"),
        })?;
        if raw.sender.as_str().len() > MAX_NODE_ID {
            return Err(WireError::Malformed {
                id: Some(raw.id),
                reason: format!(
                    "envelope: sender is {} bytes, a node id is at most {MAX_NODE_ID}",
                    raw.sender.as_str().len()
                ),
            });
        }
        let kind = Kind::from_u16(raw.kind).ok_or(WireError::UnknownKind {
            kind: raw.kind,
            id: Some(raw.id),
        })?;
        let body = check_encoding(&raw.body)
            .map_err(minicbor::decode::Error::message)
            .and_then(|()| Body::from_bytes(kind, &raw.body))
            .map_err(|e| WireError::Malformed {
                id: Some(raw.id),
                reason: format!("{kind} body: {e}"),
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

/// Whether a payload is an ERROR, as far as its envelope's key 1 (the kind, which keeps its
/// meaning in every protocol version) can be read, whatever else is wrong with it: its size,
/// its version, its other keys or its body. ERRORs are never answered, not even a broken
/// one: two nodes that cannot understand each other must not answer each other forever.
pub fn is_error(payload: &[u8]) -> bool {
    peek_key(payload, 1) == Some(Kind::Error as u64)
}

/// The unsigned integer under `key` in the top-level map, read leniently: the map's entries
/// are walked in order, each key must be an unsigned integer and each value before the one
/// wanted is skipped as far as it is well-formed; the first entry with that key decides.
/// It "could be read" (docs/protocol.md section 5) when it is reached before anything that
/// stops the walk (a key that is not an unsigned integer, an item that is not well-formed,
/// the end of the bytes); what follows it does not matter.
fn peek_key(payload: &[u8], key: u64) -> Option<u64> {
    let mut found = None;
    walk(payload, |k, d| {
        if k != key {
            return d.skip().is_ok();
        }
        found = d.u64().ok();
        false
    });
    found
}

/// How often `key` occurs in the top-level map, as far as the walk of [`peek_key`] gets.
fn count_key(payload: &[u8], key: u64) -> usize {
    let mut n = 0;
    walk(payload, |k, d| {
        n += usize::from(k == key);
        d.skip().is_ok()
    });
    n
}

/// Walks the entries of the top-level map leniently, calling `f` with each key and the
/// decoder at its value; `f` consumes the value and says whether to go on. Stops at the first
/// key that is not an unsigned integer, and at the end of the map or of the bytes.
fn walk(payload: &[u8], mut f: impl FnMut(u64, &mut minicbor::Decoder<'_>) -> bool) {
    let mut d = minicbor::Decoder::new(payload);
    let Ok(n) = d.map() else { return };
    let mut i = 0u64;
    while n.is_none_or(|n| i < n) {
        if d.datatype()
            .map_or(true, |t| t == minicbor::data::Type::Break)
        {
            return;
        }
        let Ok(k) = d.u64() else { return };
        if !f(k, &mut d) {
            return;
        }
        i += 1;
    }
}

/// Deepest nesting of arrays, maps and tags accepted in a payload (the deepest message,
/// a FLAVOURS answer, nests 4: body, list, flavour, its partitionability).
pub const MAX_DEPTH: usize = 16;

/// The encoding rules decoders enforce on the envelope and on every body, beyond the layout
/// of each kind (docs/protocol.md section 4): the bytes are exactly one CBOR data item
/// (nothing after it); no map, array, text or byte string anywhere has an indefinite length;
/// no map has the same key twice; every integer, length and tag is in its shortest form
/// (preferred serialization, RFC 8949 section 4.2.1); nesting is at most [`MAX_DEPTH`]. These
/// hold inside unknown keys too. Floats and simple values are checked only for
/// well-formedness. Everything [`Message::encode`] produces passes.
pub fn check_encoding(bytes: &[u8]) -> Result<(), String> {
    let mut pos = 0;
    item(bytes, &mut pos, 0)?;
    if pos != bytes.len() {
        return Err(format!(
            "{} bytes after the end of the data item",
            bytes.len() - pos
        ));
    }
    Ok(())
}

/// Takes `n` bytes at `pos`.
fn take<'b>(b: &'b [u8], pos: &mut usize, n: u64) -> Result<&'b [u8], String> {
    let end = usize::try_from(n)
        .ok()
        .and_then(|n| pos.checked_add(n))
        .filter(|end| *end <= b.len())
        .ok_or_else(|| "truncated".to_string())?;
    let s = &b[*pos..end];
    *pos = end;
    Ok(s)
}

/// One data item starting at `pos`; leaves `pos` after it.
fn item(b: &[u8], pos: &mut usize, depth: usize) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("nested deeper than {MAX_DEPTH}"));
    }
    let start = *pos;
    let first = take(b, pos, 1)?[0];
    let (major, info) = (first >> 5, first & 0x1f);
    let arg = match info {
        0..=23 => u64::from(info),
        24..=27 => {
            let width = 1u64 << (info - 24);
            let v = take(b, pos, width)?
                .iter()
                .fold(0u64, |acc, x| (acc << 8) | u64::from(*x));
            // Major type 7 uses these widths for floats (and 24 for simple values).
            let shortest = match info {
                24 => 24,
                25 => 0x100,
                26 => 0x1_0000,
                _ => 0x1_0000_0000,
            };
            if major != 7 && v < shortest {
                return Err(format!(
                    "integer or length {v} at byte {start} is not in its shortest form"
                ));
            }
            if major == 7 && info == 24 && v < 32 {
                return Err(format!(
                    "simple value {v} at byte {start} is not well-formed"
                ));
            }
            v
        }
        31 if (2..=5).contains(&major) => {
            return Err(format!("indefinite length at byte {start}"));
        }
        _ => return Err(format!("not well-formed at byte {start}")),
    };
    let room = (b.len() - *pos) as u64;
    match major {
        0 | 1 => {}
        2 | 3 => {
            take(b, pos, arg)?;
        }
        4 => {
            if arg > room {
                return Err("truncated".into());
            }
            for _ in 0..arg {
                item(b, pos, depth + 1)?;
            }
        }
        5 => {
            if arg > room / 2 {
                return Err("truncated".into());
            }
            let mut keys: Vec<&[u8]> = Vec::with_capacity(arg as usize);
            for _ in 0..arg {
                let k = *pos;
                item(b, pos, depth + 1)?;
                keys.push(&b[k..*pos]);
                item(b, pos, depth + 1)?;
            }
            keys.sort_unstable();
            if let Some(w) = keys.windows(2).find(|w| w[0] == w[1]) {
                let key: String = w[0].iter().take(16).map(|x| format!("{x:02x}")).collect();
                return Err(format!("map at byte {start} has the key 0x{key} twice"));
            }
        }
        6 => item(b, pos, depth + 1)?,
        _ => {} // 7: simple values and floats, their bytes already taken
    }
    Ok(())
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

    /// The domain these topics are in.
    pub fn domain(&self) -> &str {
        self.root.strip_prefix("fluidos/v1/").unwrap_or(&self.root)
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
        ..Default::default()
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
                    liqo_version: None,
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
                    liqo_version: None,
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

    #[test]
    fn kinds_and_codes_are_numbered_in_order_and_named_once() {
        for (n, k) in Kind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, n + 1);
            assert_eq!(Kind::from_u16(n as u16 + 1), Some(*k));
        }
        for (n, c) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(*c as usize, n + 1);
            assert_eq!(ErrorCode::from_u16(n as u16 + 1), Some(*c));
        }
        assert_eq!(Kind::from_u16(0), None);
        assert_eq!(Kind::from_u16(Kind::ALL.len() as u16 + 1), None);
        assert_eq!(ErrorCode::from_u16(ErrorCode::ALL.len() as u16 + 1), None);
        let mut names: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
        names.extend(ErrorCode::ALL.iter().map(|c| c.name()));
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n, "a name used twice");
        // Each name is the one docs/protocol.md uses.
        let doc = include_str!("../../docs/protocol.md");
        for name in names {
            assert!(doc.contains(name), "{name} is not in docs/protocol.md");
        }
    }

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

    /// The Liqo version is a new optional key: bodies from older senders (without it) still
    /// decode, and a body with it round-trips.
    #[test]
    fn peer_bodies_without_the_liqo_version_still_decode() {
        let old = PeerRequest {
            contract: Id::new("p.c1").unwrap(),
            cluster_id: Id::new("c").unwrap(),
            liqo_version: None,
            certificate: None,
        };
        let bytes = minicbor::to_vec(&old).unwrap();
        assert_eq!(bytes[0], 0xa2, "two keys, as before the version existed");
        let new = PeerRequest {
            liqo_version: Text::new("v1.0.3").ok(),
            ..old.clone()
        };
        let back: PeerRequest = minicbor::decode(&minicbor::to_vec(&new).unwrap()).unwrap();
        assert_eq!(back, new);
        let accept = PeerAccept {
            contract: Id::new("p.c1").unwrap(),
            cluster_id: Id::new("p").unwrap(),
            identity: None,
            liqo_version: None,
            sealed: None,
        };
        assert_eq!(minicbor::to_vec(&accept).unwrap()[0], 0xa2);
        let too_long = format!("{:0<1$}", "v", MAX_LIQO_VERSION + 1);
        let mut bad = minicbor::to_vec(&old).unwrap();
        bad[0] = 0xa3;
        minicbor::encode(2u8, &mut bad).unwrap();
        minicbor::encode(too_long.as_str(), &mut bad).unwrap();
        assert!(minicbor::decode::<PeerRequest>(&bad).is_err());
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

    fn envelope_bytes() -> Vec<u8> {
        build_message(Body::Error(ErrorBody::new(ErrorCode::NoFit, "x")))
            .encode()
            .unwrap()
    }

    /// Wraps `body` (any bytes) in an otherwise valid envelope of `kind`, id 7.
    fn with_body(kind: Kind, body: &[u8]) -> Vec<u8> {
        Message::envelope(kind as u16, 7, &Id::new("consumer-1").unwrap(), body)
    }

    fn malformed_with_id(bytes: &[u8]) -> String {
        match Message::decode(bytes) {
            Err(WireError::Malformed {
                id: Some(7),
                reason,
            }) => reason,
            other => panic!("expected MALFORMED with id 7, got {other:?}"),
        }
    }

    #[test]
    fn trailing_bytes_after_the_envelope_or_the_body_are_malformed() {
        let mut bytes = envelope_bytes();
        assert!(Message::decode(&bytes).is_ok());
        bytes.push(0x00);
        assert!(malformed_with_id(&bytes).contains("1 bytes after"));
        // ERROR body {0: 6, 1: "x"} followed by a stray 0.
        let body = [0xa2, 0x00, 0x06, 0x01, 0x61, b'x', 0x00];
        assert!(malformed_with_id(&with_body(Kind::Error, &body)).contains("after the end"));
    }

    #[test]
    fn indefinite_length_maps_are_malformed() {
        // The envelope as an indefinite map: a6 -> bf ... ff.
        let mut bytes = envelope_bytes();
        assert_eq!(bytes[0], 0xa6);
        bytes[0] = 0xbf;
        bytes.push(0xff);
        assert!(malformed_with_id(&bytes).contains("indefinite"));
        // An ERROR body as an indefinite map, and one inside an unknown key.
        let body = [0xbf, 0x00, 0x06, 0x01, 0x61, b'x', 0xff];
        assert!(malformed_with_id(&with_body(Kind::Error, &body)).contains("indefinite"));
        let body = [0xa3, 0x00, 0x06, 0x01, 0x61, b'x', 0x09, 0xbf, 0xff];
        assert!(malformed_with_id(&with_body(Kind::Error, &body)).contains("indefinite"));
    }

    #[test]
    fn duplicate_keys_are_malformed() {
        // {0: 6, 1: "x", 0: 5}: which code would it be?
        let body = [0xa3, 0x00, 0x06, 0x01, 0x61, b'x', 0x00, 0x05];
        assert!(malformed_with_id(&with_body(Kind::Error, &body)).contains("twice"));
        // A second sender (key 5) in the envelope.
        let mut bytes = envelope_bytes();
        assert_eq!(bytes[0], 0xa6);
        bytes[0] = 0xa7;
        bytes.extend_from_slice(&[0x05, 0x61, b'e']);
        assert!(malformed_with_id(&bytes).contains("twice"));
    }

    #[test]
    fn integers_and_lengths_not_in_their_shortest_form_are_malformed() {
        // Code 6 written as 18 06 (one extra byte) instead of 06.
        let body = [0xa2, 0x00, 0x18, 0x06, 0x01, 0x61, b'x'];
        assert!(malformed_with_id(&with_body(Kind::Error, &body)).contains("shortest"));
        // The text length written as 78 01.
        let body = [0xa2, 0x00, 0x06, 0x01, 0x78, 0x01, b'x'];
        assert!(malformed_with_id(&with_body(Kind::Error, &body)).contains("shortest"));
        // The same in the envelope: the id 7 as 19 00 07.
        let bytes = envelope_bytes();
        assert_eq!(&bytes[5..7], &[0x02, 0x07]);
        let mut long = bytes[..6].to_vec();
        long.extend_from_slice(&[0x19, 0x00, 0x07]);
        long.extend_from_slice(&bytes[7..]);
        assert!(matches!(
            Message::decode(&long),
            Err(WireError::Malformed { reason, .. }) if reason.contains("shortest")
        ));
        // The shortest forms at each width's edge are accepted.
        for ok in [
            &[0x17][..],
            &[0x18, 0x18],
            &[0x19, 0x01, 0x00],
            &[0x1a, 0x00, 0x01, 0x00, 0x00],
            &[0x1b, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00],
        ] {
            assert_eq!(check_encoding(ok), Ok(()), "{ok:02x?}");
        }
    }

    #[test]
    fn nesting_is_bounded() {
        let mut deep = vec![0x81; MAX_DEPTH + 1];
        deep.push(0x00);
        assert!(check_encoding(&deep).unwrap_err().contains("nested"));
        let mut ok = vec![0x81; MAX_DEPTH];
        ok.push(0x00);
        assert_eq!(check_encoding(&ok), Ok(()));
    }

    #[test]
    fn every_example_passes_the_encoding_check() {
        for (name, m) in examples() {
            let bytes = m.encode().unwrap();
            assert_eq!(check_encoding(&bytes), Ok(()), "{name}");
        }
    }

    #[test]
    fn a_sender_longer_than_a_node_id_is_malformed() {
        let long = "n".repeat(crate::model::MAX_NODE_ID + 1);
        let bytes = Message::envelope(1, 7, &Id::new(&long).unwrap(), &[0xa1, 0x00, 0xa0]);
        assert!(malformed_with_id(&bytes).contains("at most 48"));
        let just = "n".repeat(crate::model::MAX_NODE_ID);
        let bytes = Message::envelope(1, 7, &Id::new(&just).unwrap(), &[0xa1, 0x00, 0xa0]);
        assert!(Message::decode(&bytes).is_ok());
        // And the encoder does not produce one.
        let mut m = build_message(Body::ListFlavours(ListFlavours::default()));
        m.sender = Id::new(&long).unwrap();
        assert!(m.encode().is_err());
    }

    #[test]
    fn an_error_is_recognised_whatever_else_is_wrong_with_it() {
        // The cases an independent client found answered with MALFORMED.
        let code_as_text = [0xa2, 0x00, 0x61, b'6', 0x01, 0x61, b'x'];
        let mut long_text = vec![0xa2, 0x00, 0x06, 0x01, 0x79, 0x01, 0x2c];
        long_text.extend(std::iter::repeat_n(b'a', 300));
        for body in [&code_as_text[..], &long_text, &[]] {
            let bytes = with_body(Kind::Error, body);
            assert!(Message::decode(&bytes).is_err());
            assert!(is_error(&bytes), "{body:02x?}");
        }
        // An unknown version (key 1 keeps its meaning), an oversized one, a good one.
        assert!(is_error(&[0xa3, 0x00, 0x02, 0x01, 0x05, 0x02, 0x09]));
        let mut big = with_body(Kind::Error, &vec![0; MAX_PAYLOAD]);
        assert!(Message::decode(&big).is_err());
        assert!(is_error(&big));
        big.clear();
        assert!(!is_error(&big));
        assert!(is_error(&envelope_bytes()));
        // Not errors.
        let list = build_message(Body::ListFlavours(ListFlavours::default()))
            .encode()
            .unwrap();
        assert!(!is_error(&list));
        assert!(!is_error(b"hello world"));
        assert!(!is_error(&[0xa1, 0x01, 0x61, b'5']));
    }

    /// The readings docs/protocol.md sections 4 and 5 settle, one assertion each.
    #[test]
    fn the_settled_readings_of_the_encoding_rules_hold() {
        let malformed = |b: &[u8]| match Message::decode(b) {
            Err(WireError::Malformed { id, .. }) => id,
            other => panic!("expected MALFORMED for {b:02x?}, got {other:?}"),
        };
        // Key 0 twice is MALFORMED whichever value comes first, correlated to key 2.
        assert_eq!(
            malformed(&[0xa4, 0x00, 0x01, 0x00, 0x09, 0x01, 0x01, 0x02, 0x07]),
            Some(7)
        );
        assert_eq!(
            malformed(&[0xa4, 0x00, 0x09, 0x00, 0x01, 0x01, 0x01, 0x02, 0x07]),
            Some(7)
        );
        // A text key at the top level is not an unknown key: MALFORMED, and the walk for key 2
        // stops at it.
        let mut text_key = envelope_bytes();
        text_key[0] += 1;
        text_key.extend_from_slice(&[0x61, b'x', 0x00]);
        assert_eq!(malformed(&text_key), Some(7));
        assert_eq!(
            malformed(&[0xa3, 0x01, 0x01, 0x61, b'x', 0x00, 0x02, 0x07]),
            None
        );
        // Key 2 read before something that is not well-formed still correlates.
        assert_eq!(malformed(&[0xa3, 0x01, 0x01, 0x02, 0x07, 0x1c]), Some(7));
        // Invalid UTF-8 is MALFORMED inside an unknown key too (every text string is UTF-8).
        let body = [0xa3, 0x00, 0x06, 0x01, 0x61, b'x', 0x09, 0x62, 0xff, 0xfe];
        assert_eq!(malformed(&with_body(Kind::Error, &body)), Some(7));
        // Nesting: an item inside 16 arrays, maps or tags is accepted, inside 17 it is not;
        // the outermost map counts as one of them.
        let body = |arrays: usize| {
            let mut b = vec![0xa2, 0x00, 0x06, 0x01, 0x61, b'x'];
            b[0] = 0xa3;
            b.push(0x09);
            b.extend(std::iter::repeat_n(0x81, arrays));
            b.push(0x00);
            b
        };
        assert!(Message::decode(&with_body(Kind::Error, &body(15))).is_ok());
        assert!(Message::decode(&with_body(Kind::Error, &body(16))).is_err());
        // Key 1 read as 5 in a longer form, or before the bytes end, is an ERROR.
        assert!(is_error(&[0xa2, 0x01, 0x18, 0x05, 0x02, 0x07]));
        assert!(is_error(&[0xa3, 0x00, 0x01, 0x01, 0x05, 0x02]));
        assert!(!is_error(&[0xa2, 0x61, b'x', 0x00, 0x01, 0x05]));
    }

    #[test]
    fn error_text_is_cut_at_the_limit_on_a_char_boundary() {
        let long = "é".repeat(200); // 400 bytes
        let b = ErrorBody::new(ErrorCode::Malformed, &long);
        assert!(b.text.as_str().len() <= MAX_ERROR_TEXT);
        assert!(b.text.as_str().chars().all(|c| c == 'é'));
    }
}
