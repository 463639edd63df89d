//! Plain data of the FLUIDOS workflow: flavours, selectors, reservations, contracts,
//! allocations, and their CBOR encoding.
//!
//! Every type here is what travels on the wire or sits in a table, so two rules hold
//! throughout. First, every bound that protects memory is part of the type: identifiers and
//! texts are `heapless` strings, lists of flavours are `heapless` vectors, so a hostile peer
//! cannot make a decoder allocate more than the type allows, whatever the payload says.
//! Second, structs are CBOR maps keyed by small integers (minicbor's `#[cbor(map)]`):
//! unknown keys are skipped and absent optional keys decode as `None`, which lets the
//! protocol grow without breaking older gateways. The exact layout is in `docs/protocol.md`.
//!
//! The flavour follows the FLUIDOS reference node's `K8Slice` flavour field by field
//! (characteristics, partitionability policy, price, availability, location), so a bridge
//! to the Go implementation is a mapping, not a redesign.

use minicbor::{Decode, Encode};
use std::fmt;

/// Longest identifier (flavour, contract, transaction), in bytes.
pub const MAX_ID: usize = 96;
/// Longest node or offer id: short enough that the ids built from it
/// (`{node}.c{n}`, `{offer}.{n}`) stay within [`MAX_ID`].
pub const MAX_NODE_ID: usize = 48;
/// Most flavours one advert or one FLAVOURS answer may carry.
pub const MAX_FLAVOURS: usize = 16;

/// The string newtypes travel as CBOR text strings (and serde strings); decoding goes through
/// their `new`, so every bound and alphabet rule holds for what comes off the wire.
macro_rules! string_codec {
    ($name:ident $(<const $n:ident>)?, $err:literal) => {
        impl<$(const $n: usize)?> serde::Serialize for $name$(<$n>)? {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<C, $(const $n: usize)?> Encode<C> for $name$(<$n>)? {
            fn encode<W: minicbor::encode::Write>(
                &self,
                e: &mut minicbor::Encoder<W>,
                _: &mut C,
            ) -> Result<(), minicbor::encode::Error<W::Error>> {
                e.str(self.as_str())?;
                Ok(())
            }
        }

        impl<'b, C, $(const $n: usize)?> Decode<'b, C> for $name$(<$n>)? {
            fn decode(
                d: &mut minicbor::Decoder<'b>,
                _: &mut C,
            ) -> Result<Self, minicbor::decode::Error> {
                $name::new(d.str()?)
                    .map_err(|e| minicbor::decode::Error::message(format!("{}{e}", $err)))
            }
        }
    };
}

string_codec!(Text<const N>, "");
string_codec!(LongText<const N>, "");
string_codec!(Id, "bad id: ");

/// A bounded UTF-8 text: decoding refuses anything longer than `N` bytes.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Text<const N: usize>(heapless::String<N>);

impl<const N: usize> Text<N> {
    /// Builds a text, or says how long it was if it does not fit.
    pub fn new(s: &str) -> Result<Self, ModelError> {
        let mut t = heapless::String::new();
        t.push_str(s).map_err(|_| ModelError::TooLong {
            max: N,
            len: s.len(),
        })?;
        Ok(Text(t))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl<const N: usize> fmt::Display for Text<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<const N: usize> fmt::Debug for Text<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// A longer bounded UTF-8 text, kept on the heap (workload manifests, kubeconfigs): decoding
/// refuses anything longer than `N` bytes before copying it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct LongText<const N: usize>(String);

impl<const N: usize> LongText<N> {
    pub fn new(s: &str) -> Result<Self, ModelError> {
        if s.len() > N {
            return Err(ModelError::TooLong {
                max: N,
                len: s.len(),
            });
        }
        Ok(LongText(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<const N: usize> fmt::Debug for LongText<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

/// An identifier: 1 to 96 bytes of `[A-Za-z0-9._-]`.
///
/// Node ids become MQTT topic levels and certificate CNs, so the alphabet is closed: no `/`,
/// `+`, `#` or spaces can ever reach a topic (a CN `nodeB/x` could otherwise publish under
/// `catalog/nodeB/x`). The same rule for every other id keeps logs and keys unambiguous.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Id(Text<MAX_ID>);

impl Id {
    pub fn new(s: &str) -> Result<Self, ModelError> {
        if s.is_empty() {
            return Err(ModelError::Empty);
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(ModelError::BadChar(c));
        }
        Ok(Id(Text::new(s)?))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// A list of at most `N` items: decoding refuses a longer array before decoding its items.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bounded<T, const N: usize>(pub heapless::Vec<T, N>);

impl<T: serde::Serialize, const N: usize> serde::Serialize for Bounded<T, N> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter())
    }
}

impl<T, const N: usize> Default for Bounded<T, N> {
    fn default() -> Self {
        Bounded(heapless::Vec::new())
    }
}

impl<T, const N: usize> Bounded<T, N> {
    /// Fails with the item back when the list is full.
    pub fn push(&mut self, item: T) -> Result<(), T> {
        self.0.push(item)
    }

    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<T: Clone, const N: usize> Bounded<T, N> {
    /// Takes the first `N` items of `items`; the caller checks the length if it matters.
    pub fn from_slice_truncated(items: &[T]) -> Self {
        let mut v = heapless::Vec::new();
        for it in items.iter().take(N) {
            let _ = v.push(it.clone());
        }
        Bounded(v)
    }
}

impl<C, T: Encode<C>, const N: usize> Encode<C> for Bounded<T, N> {
    fn encode<W: minicbor::encode::Write>(
        &self,
        e: &mut minicbor::Encoder<W>,
        ctx: &mut C,
    ) -> Result<(), minicbor::encode::Error<W::Error>> {
        e.array(self.0.len() as u64)?;
        for it in self.0.iter() {
            it.encode(e, ctx)?;
        }
        Ok(())
    }
}

impl<'b, C, T: Decode<'b, C>, const N: usize> Decode<'b, C> for Bounded<T, N> {
    fn decode(d: &mut minicbor::Decoder<'b>, ctx: &mut C) -> Result<Self, minicbor::decode::Error> {
        let len = d.array()?.ok_or_else(|| {
            minicbor::decode::Error::message("indefinite-length arrays are not accepted")
        })?;
        if len > N as u64 {
            return Err(minicbor::decode::Error::message(format!(
                "list of {len} items, at most {N} allowed"
            )));
        }
        let mut v = heapless::Vec::new();
        for _ in 0..len {
            // Cannot fail: len <= N was checked above.
            let _ = v.push(T::decode(d, ctx)?);
        }
        Ok(Bounded(v))
    }
}

/// Why a model value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("empty")]
    Empty,
    #[error("{len} bytes long, at most {max} allowed")]
    TooLong { max: usize, len: usize },
    #[error("character {0:?} not allowed (use A-Z a-z 0-9 . _ -)")]
    BadChar(char),
}

/// GPU characteristics of a flavour (optional, as in the reference K8Slice).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode, serde::Serialize)]
#[cbor(map)]
pub struct Gpu {
    #[n(0)]
    pub model: Text<32>,
    #[n(1)]
    pub cores: u32,
    #[n(2)]
    pub memory_bytes: u64,
}

/// How a flavour may be split: the smallest piece of each resource and the step above it.
///
/// A valid piece of resource `r` is a value `v` with `v >= r_min` and `v % r_step == 0`
/// (a step of 0 means any value at or above the minimum).
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode, serde::Serialize)]
#[cbor(map)]
pub struct Partitionability {
    #[n(0)]
    pub cpu_min: u64,
    #[n(1)]
    pub memory_min: u64,
    #[n(2)]
    pub pods_min: u32,
    #[n(3)]
    pub cpu_step: u64,
    #[n(4)]
    pub memory_step: u64,
    #[n(5)]
    pub pods_step: u32,
}

/// Price of a whole flavour for one period. `amount` is in millionths of the currency unit
/// (1.50 EUR = 1_500_000), so prices stay exact integers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode, serde::Serialize)]
#[cbor(map)]
pub struct Price {
    #[n(0)]
    pub amount: u64,
    #[n(1)]
    pub currency: Text<8>,
    #[n(2)]
    pub period: Text<16>,
}

/// Where a provider is (optional).
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode, serde::Serialize)]
#[cbor(map)]
pub struct Location {
    #[n(0)]
    pub country: Option<Text<32>>,
    #[n(1)]
    pub city: Option<Text<32>>,
    #[n(2)]
    pub notes: Option<Text<64>>,
}

/// An amount of each resource: what a partition takes, what an allocation holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Encode, Decode, serde::Serialize)]
#[cbor(map)]
pub struct Resources {
    /// CPU in millicores.
    #[n(0)]
    pub cpu: u64,
    /// Memory in bytes.
    #[n(1)]
    pub memory: u64,
    #[n(2)]
    pub pods: u32,
    /// Ephemeral storage in bytes.
    #[n(3)]
    pub storage: u64,
}

/// A Unix time in milliseconds as a UTC date and time, `2026-12-04 01:23:45 UTC`.
pub fn date_words(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (Howard Hinnant's days_from_civil, inverted), for 1970 on.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A price in millionths as a decimal ("0.9", "2", "0.000001").
pub fn price_words(micros: u64) -> String {
    let (whole, frac) = (micros / 1_000_000, micros % 1_000_000);
    if frac == 0 {
        return whole.to_string();
    }
    let frac = format!("{frac:06}");
    format!("{whole}.{}", frac.trim_end_matches('0'))
}

/// Bytes as a person reads them: the largest binary unit that divides them exactly
/// ("3 GiB", "1536 MiB", "512 B"), as Kubernetes quantities are usually written.
pub fn bytes_words(b: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if b >= 1 << shift && b.is_multiple_of(1 << shift) {
            return format!("{} {unit}", b >> shift);
        }
    }
    format!("{b} B")
}

impl std::fmt::Display for Resources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}m cpu, {} memory, {} pods",
            self.cpu,
            bytes_words(self.memory),
            self.pods
        )?;
        if self.storage > 0 {
            write!(f, ", {} storage", bytes_words(self.storage))?;
        }
        Ok(())
    }
}

impl Resources {
    /// `self - other` per resource, or `None` if any resource would go below zero.
    pub fn checked_sub(&self, other: &Resources) -> Option<Resources> {
        Some(Resources {
            cpu: self.cpu.checked_sub(other.cpu)?,
            memory: self.memory.checked_sub(other.memory)?,
            pods: self.pods.checked_sub(other.pods)?,
            storage: self.storage.checked_sub(other.storage)?,
        })
    }

    /// `self + other` per resource, saturating (capacity cannot exceed u64 anyway).
    pub fn saturating_add(&self, other: &Resources) -> Resources {
        Resources {
            cpu: self.cpu.saturating_add(other.cpu),
            memory: self.memory.saturating_add(other.memory),
            pods: self.pods.saturating_add(other.pods),
            storage: self.storage.saturating_add(other.storage),
        }
    }

    pub fn is_zero(&self) -> bool {
        *self == Resources::default()
    }
}

/// A flavour: a piece of a provider's capacity on offer (the reference K8Slice flavour).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode, serde::Serialize)]
#[cbor(map)]
pub struct Flavour {
    #[n(0)]
    pub id: Id,
    /// The node that sells it; must equal the sender named by the topic.
    #[n(1)]
    pub provider: Id,
    /// Kubernetes architecture name: `amd64`, `arm64`, `arm`.
    #[n(2)]
    pub architecture: Text<16>,
    #[n(3)]
    pub resources: Resources,
    #[n(4)]
    pub gpu: Option<Gpu>,
    /// `None`: sold only whole.
    #[n(5)]
    pub partitionability: Option<Partitionability>,
    #[n(6)]
    pub price: Price,
    #[n(7)]
    pub available: bool,
    #[n(8)]
    pub location: Option<Location>,
}

/// Upper bounds per resource; an absent field means no bound.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Encode, Decode, serde::Serialize)]
#[cbor(map)]
pub struct Limits {
    #[n(0)]
    pub cpu: Option<u64>,
    #[n(1)]
    pub memory: Option<u64>,
    #[n(2)]
    pub pods: Option<u32>,
    #[n(3)]
    pub storage: Option<u64>,
}

/// What a consumer looks for. Every bound is optional; an empty selector matches any flavour.
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode, serde::Serialize)]
#[cbor(map)]
pub struct FlavourSelector {
    #[n(0)]
    pub architecture: Option<Text<16>>,
    /// Least of each resource wanted (absent: no minimum).
    #[n(1)]
    pub min: Option<Resources>,
    /// Most of each resource wanted (absent, or an absent field: no maximum).
    #[n(2)]
    pub max: Option<Limits>,
    /// Highest price the consumer pays for what it buys (same units as [`Price::amount`]).
    #[n(3)]
    pub max_price: Option<u64>,
    /// Required GPU: any flavour with a GPU matches when true.
    #[n(4)]
    pub gpu: Option<bool>,
    /// Required country (the flavour's `location.country`, compared exactly).
    #[n(5)]
    pub country: Option<Text<32>>,
}

/// RESERVE_FLAVOUR body.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode, serde::Serialize)]
#[cbor(map)]
pub struct ReserveRequest {
    /// Chosen by the buyer; the provider answers a repeated id with its first answer.
    #[n(0)]
    pub transaction: Id,
    #[n(1)]
    pub flavour: Id,
    #[n(2)]
    pub buyer: Id,
    /// The piece wanted of a partitionable flavour; `None` buys the whole flavour.
    #[n(3)]
    pub partition: Option<Resources>,
}

/// Where a contract is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode, serde::Serialize)]
#[cbor(index_only)]
pub enum ContractState {
    /// Signed, resources set aside, peering not done yet.
    #[n(0)]
    Reserved,
    /// Peering established; the consumer uses the resources.
    #[n(1)]
    Active,
    /// Released by the consumer; resources returned.
    #[n(2)]
    Released,
    /// Never peered before its expiry; resources returned.
    #[n(3)]
    Expired,
}

impl ContractState {
    /// The state's name as `fluidlet status` (text and JSON) shows it.
    pub fn name(self) -> &'static str {
        match self {
            ContractState::Reserved => "Reserved",
            ContractState::Active => "Active",
            ContractState::Released => "Released",
            ContractState::Expired => "Expired",
        }
    }
}

impl std::fmt::Display for ContractState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

/// A signed reservation: what was bought, by whom, from whom, until when.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode, serde::Serialize)]
#[cbor(map)]
pub struct Contract {
    #[n(0)]
    pub id: Id,
    #[n(1)]
    pub transaction: Id,
    /// The flavour as it was advertised when bought.
    #[n(2)]
    pub flavour: Flavour,
    #[n(3)]
    pub buyer: Id,
    #[n(4)]
    pub seller: Id,
    /// What the buyer got: the partition, or the whole flavour's resources.
    #[n(5)]
    pub resources: Resources,
    /// Price of what was bought, per `flavour.price.period`.
    #[n(6)]
    pub price: u64,
    /// Unix milliseconds.
    #[n(7)]
    pub created_at: u64,
    /// Unix milliseconds after which an unpeered reservation lapses.
    #[n(8)]
    pub expires_at: u64,
    #[n(9)]
    pub state: ContractState,
    /// Length of one term in milliseconds: RENEW moves `ends_at` to at most this far from
    /// now. `None`: the contract never ends while Active (older providers, own use).
    #[n(10)]
    pub term_ms: Option<u64>,
    /// Unix milliseconds at which the contract ends (Expired, capacity returned) unless the
    /// buyer renews it before.
    #[n(11)]
    pub ends_at: Option<u64>,
}

/// Which side of a contract an allocation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode, serde::Serialize)]
#[cbor(index_only)]
pub enum AllocationKind {
    /// Provider side: local capacity set aside for a buyer.
    #[n(0)]
    Node,
    /// Consumer side: a remote capacity that will appear as a Liqo virtual node.
    #[n(1)]
    VirtualNode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode, serde::Serialize)]
#[cbor(index_only)]
pub enum AllocationStatus {
    #[n(0)]
    Inactive,
    #[n(1)]
    Active,
    #[n(2)]
    Released,
}

/// An entry of the Available Resources table's allocations (workflow steps 16, 20, 25).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode, serde::Serialize)]
#[cbor(map)]
pub struct Allocation {
    #[n(0)]
    pub contract: Id,
    #[n(1)]
    pub kind: AllocationKind,
    #[n(2)]
    pub status: AllocationStatus,
    #[n(3)]
    pub resources: Resources,
    /// The other party: buyer for a Node allocation, seller for a VirtualNode one.
    #[n(4)]
    pub peer: Id,
    /// Unix milliseconds of the last status change.
    #[n(5)]
    pub updated_at: u64,
    /// Provider side: the configured offer the resources were taken from.
    #[n(6)]
    pub offer: Option<Id>,
}

/// A flavour this node sells, with the configured offer it was cut from. The flavour's
/// resources are always the offer's total minus what live Node allocations hold.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode, serde::Serialize)]
#[cbor(map)]
pub struct OwnFlavour {
    #[n(0)]
    pub offer: Id,
    #[n(1)]
    pub flavour: Flavour,
}

/// A flavour another node sells, as last heard (Peering Candidates table).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode, serde::Serialize)]
#[cbor(map)]
pub struct Candidate {
    #[n(0)]
    pub flavour: Flavour,
    /// Unix milliseconds when it was last advertised or listed.
    #[n(1)]
    pub seen_at: u64,
}

/// Largest workload manifest an intent may carry.
pub const MAX_MANIFEST: usize = 64 * 1024;

/// Where an intent is in the workflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode, serde::Serialize)]
#[cbor(index_only)]
pub enum IntentState {
    /// Received, not looked up yet (steps 1-3).
    #[n(0)]
    Submitted,
    /// Discovery and reservation running (steps 4-20).
    #[n(1)]
    Reserving,
    /// A contract is held; peering is being set up (steps 21-28).
    #[n(2)]
    Peering,
    /// Capacity found; the workload is being applied (steps 29-31).
    #[n(3)]
    Deploying,
    /// The workload runs where `placement` says.
    #[n(4)]
    Placed,
    /// Ended without a placement; `error` says why.
    #[n(5)]
    Failed,
}

impl IntentState {
    /// Placed and Failed are final; every other state resumes after a restart.
    pub fn is_final(self) -> bool {
        matches!(self, IntentState::Placed | IntentState::Failed)
    }

    /// The state's name as `intent list` and the log show it.
    pub fn name(self) -> &'static str {
        match self {
            IntentState::Submitted => "Submitted",
            IntentState::Reserving => "Reserving",
            IntentState::Peering => "Peering",
            IntentState::Deploying => "Deploying",
            IntentState::Placed => "Placed",
            IntentState::Failed => "Failed",
        }
    }
}

impl std::fmt::Display for IntentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

/// A service request (workflow step 1): a workload, what it needs, and where it got to.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode, serde::Serialize)]
#[cbor(map)]
pub struct Intent {
    #[n(0)]
    pub id: Id,
    #[n(1)]
    pub name: Id,
    /// Kubernetes namespace the workload is applied in.
    #[n(2)]
    pub namespace: Id,
    /// The workload: a Kubernetes manifest (YAML or JSON), applied as it is plus placement.
    #[n(3)]
    pub manifest: LongText<MAX_MANIFEST>,
    /// What the workload needs (the decomposed resource request, step 2).
    #[n(4)]
    pub selector: FlavourSelector,
    #[n(5)]
    pub state: IntentState,
    /// The contract that pays for the placement, once there is one.
    #[n(6)]
    pub contract: Option<Id>,
    /// Where the workload runs: a virtual node's name, or `local`.
    #[n(7)]
    pub placement: Option<Text<128>>,
    #[n(8)]
    pub error: Option<Text<256>>,
    #[n(9)]
    pub created_at: u64,
    #[n(10)]
    pub updated_at: u64,
}

/// The list of flavours in an advert or a FLAVOURS answer.
pub type FlavourList = Bounded<Flavour, MAX_FLAVOURS>;

/// A contract for unit tests: `seller` sold `buyer` the piece `resources` of its flavour
/// `pool.1`, under contract id `id`.
/// Kubernetes' name for this machine's architecture.
pub fn k8s_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        other => other,
    }
}

/// The demo provider's one offer: 4 CPUs, 8 GiB, 110 pods, sold in pieces of 500m / 1 GiB.
/// Here rather than in `demo` so that unit tests use it in builds without the demo feature.
pub fn demo_offer(provider: &Id) -> Flavour {
    Flavour {
        id: Id::new("edge-pool").unwrap_or_default(),
        provider: provider.clone(),
        architecture: Text::new(k8s_arch()).unwrap_or_default(),
        resources: Resources {
            cpu: 4000,
            memory: 8 << 30,
            pods: 110,
            storage: 0,
        },
        gpu: None,
        partitionability: Some(Partitionability {
            cpu_min: 500,
            memory_min: 1 << 30,
            pods_min: 1,
            cpu_step: 500,
            memory_step: 1 << 30,
            pods_step: 1,
        }),
        price: Price {
            amount: 2_000_000,
            currency: Text::new("EUR").unwrap_or_default(),
            period: Text::new("hour").unwrap_or_default(),
        },
        available: true,
        location: None,
    }
}

/// This build's release, `0.1.0` (the workspace version; releases are tagged `v0.1.0`,
/// docs/operations.md "Versions").
pub const RELEASE: &str = env!("CARGO_PKG_VERSION");
/// The short git revision this build was made from, or empty when it was built outside a git
/// checkout (`build.rs`).
pub const GIT_REV: &str = env!("FLUIDLET_GIT_REV");

/// `fluidlet 0.1.0 (2040fc1)`, or `fluidlet 0.1.0` without a revision: what `--version`
/// prints, the first log line, `status` and the advert carry.
pub fn version() -> String {
    if GIT_REV.is_empty() {
        format!("fluidlet {RELEASE}")
    } else {
        format!("fluidlet {RELEASE} ({GIT_REV})")
    }
}

/// Unix time in milliseconds (0 if the clock is before 1970).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) fn test_contract(
    id: &str,
    seller: &str,
    buyer: &str,
    resources: Resources,
    state: ContractState,
) -> Contract {
    let seller = Id::new(seller).unwrap();
    Contract {
        id: Id::new(id).unwrap(),
        transaction: Id::new(&format!("{buyer}.t1")).unwrap(),
        flavour: Flavour {
            id: Id::new("pool.1").unwrap(),
            provider: seller.clone(),
            architecture: Text::new("arm64").unwrap(),
            resources: Resources::default(),
            gpu: None,
            partitionability: None,
            price: Price::default(),
            available: true,
            location: None,
        },
        buyer: Id::new(buyer).unwrap(),
        seller,
        resources,
        price: 1,
        created_at: 0,
        expires_at: 1,
        state,
        term_ms: None,
        ends_at: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_accepts_the_topic_safe_alphabet_only() {
        assert!(Id::new("node-A_1.x").is_ok());
        assert_eq!(Id::new(""), Err(ModelError::Empty));
        assert_eq!(Id::new("node/B"), Err(ModelError::BadChar('/')));
        assert_eq!(Id::new("a+b"), Err(ModelError::BadChar('+')));
        assert!(matches!(
            Id::new(&"x".repeat(97)),
            Err(ModelError::TooLong { max: 96, len: 97 })
        ));
    }

    #[test]
    fn bounded_list_refuses_more_items_than_its_bound_before_decoding_them() {
        // An array header claiming 17 items, followed by nothing.
        let bytes = [0x91u8];
        let err = minicbor::decode::<Bounded<u8, 16>>(&bytes).unwrap_err();
        assert!(err.to_string().contains("at most 16"), "{err}");
        // A huge claimed length is refused too, without allocating.
        let bytes = [0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(minicbor::decode::<Bounded<u8, 16>>(&bytes).is_err());
    }

    #[test]
    fn text_refuses_longer_strings_on_decode() {
        let long = minicbor::to_vec("abcdefghi").unwrap();
        assert!(minicbor::decode::<Text<8>>(&long).is_err());
        let ok = minicbor::to_vec("abcdefgh").unwrap();
        assert_eq!(
            minicbor::decode::<Text<8>>(&ok).unwrap().as_str(),
            "abcdefgh"
        );
    }

    #[test]
    fn resources_subtract_only_when_every_resource_suffices() {
        let a = Resources {
            cpu: 1000,
            memory: 10,
            pods: 2,
            storage: 0,
        };
        let b = Resources {
            cpu: 500,
            memory: 11,
            pods: 1,
            storage: 0,
        };
        assert_eq!(a.checked_sub(&b), None);
        let c = Resources { memory: 4, ..b };
        assert_eq!(
            a.checked_sub(&c),
            Some(Resources {
                cpu: 500,
                memory: 6,
                pods: 1,
                storage: 0
            })
        );
    }
}

#[cfg(test)]
mod words_tests {
    use super::*;

    #[test]
    fn dates_sizes_and_prices_read_as_people_write_them() {
        assert_eq!(date_words(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(date_words(1_796_347_138_000), "2026-12-04 01:18:58 UTC");
        // 2000-02-29, a leap day in a century year.
        assert_eq!(date_words(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(bytes_words(3 << 30), "3 GiB");
        assert_eq!(bytes_words(1536 << 20), "1536 MiB");
        assert_eq!(bytes_words(512), "512 B");
        assert_eq!(bytes_words(0), "0 B");
        assert_eq!(price_words(900_000), "0.9");
        assert_eq!(price_words(2_000_000), "2");
        assert_eq!(price_words(1), "0.000001");
        let r = Resources {
            cpu: 1500,
            memory: 3 << 30,
            pods: 2,
            storage: 0,
        };
        assert_eq!(r.to_string(), "1500m cpu, 3 GiB memory, 2 pods");
    }
}
