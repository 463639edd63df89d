//! fluidlet: a small agent that makes an edge gateway a full node of a FLUIDOS domain.
//!
//! A FLUIDOS node sells spare capacity as *flavours* and buys other nodes' flavours through
//! REAR: discovery (LIST_FLAVOURS), reservation (RESERVE_FLAVOUR, which yields a contract),
//! then peering. fluidlet speaks REAR as CBOR over MQTT through a domain broker, which acts
//! as the domain's Catalog (retained adverts, cleared by last will), and keeps its tables
//! in sled so that nothing it acknowledged is lost on a crash.
//!
//! Modules, named after the functional elements of the FLUIDOS workflow, each importing only
//! modules listed above it (docs/architecture.md draws the graph; `agent/tests/architecture.rs`
//! derives it from the source and checks both the drawing and this list):
//!
//! - [`model`]: flavours, selectors, contracts, allocations; bounded CBOR types.
//! - [`files`]: owner-only data_dir and secret files, and the warning when they are not.
//! - [`wire`]: topics, the envelope, size limits, decode errors. Pure.
//! - [`fabric`]: Virtual Fabric Manager: the k3s + Liqo shim and its dry-run backend.
//! - [`config`]: the TOML config, validated into model types.
//! - [`discovery`]: Discovery Manager: selector matching and candidate ranking. Pure.
//! - [`contracts`]: Contract Manager: reservation planning and contract rules. Pure.
//! - [`tables`]: the sled tree and its one writer.
//! - [`tls`]: mutual TLS to the broker (rustls + ring), the node-id = CN check.
//! - the crate root's own items: [`AgentError`], [`Step`], [`Observer`] ([`unix_ms`] and
//!   [`version`] are [`model`]'s, re-exported).
//! - [`metrics`]: counters kept with atomics, shown by `fluidlet status --json` and written
//!   as a Prometheus text file for node_exporter.
//! - [`broker`]: the MQTT session (rumqttc): will, reconnect, subscriptions, advert.
//! - [`seal`]: peering credentials sealed to the buyer's certificate key (ECDH, HKDF, AEAD).
//! - [`shared`]: what the running node's parts share: config, tables, MQTT client, pending
//!   answers, workflow steps, advert; and [`rear::RearError`].
//! - [`enrol`]: the key made on the device, a CSR and a one-time token sent to the domain's
//!   signer, the certificate written back (`fluidlet enrol`, zero-touch first boot); the
//!   rotation of a running node's key and certificate at `renew_at` of its life.
//! - [`terms`]: contract terms against hoarding: share cap per buyer, RENEW, expiry.
//! - [`rear`]: REAR Manager, in two sides, each function's doc naming its workflow steps:
//!   - [`rear::consumer`]: buying: candidates, discovery, reservation, peering, release
//!     (steps 5-7, 10-14, 19-22, 26-28);
//!   - [`rear::provider`]: selling: answers to LIST_FLAVOURS, RESERVE_FLAVOUR, PEER_REQUEST
//!     and RELEASE (steps 8-9, 15-18, 23-26).
//! - [`orchestrator`]: Node Orchestrator: intents, placement, the workflow state machine.
//! - [`control`]: the local control socket (`fluidlet intent`, `status`, `contract`).
//! - [`node`]: the running node: lifecycle (start, the one place that starts tasks, clean
//!   stop) and dispatch of inbound messages to the two sides of REAR.
//! - `demo` (feature `demo`): an embedded broker and two nodes in one process.
//! - [`cli`]: the work of each `fluidlet` command (the binary only parses the command line).
//!
//! Data flows one way: broker -> wire -> manager -> tables, and back out through wire.

pub mod broker;
pub mod cli;
pub mod config;
pub mod contracts;
pub mod control;
#[cfg(feature = "demo")]
pub mod demo;
pub mod discovery;
pub mod enrol;
pub mod fabric;
pub mod files;
pub mod metrics;
pub mod model;
pub mod node;
pub mod orchestrator;
pub mod rear;
pub mod seal;
pub mod shared;
pub mod tables;
pub mod terms;
pub mod tls;
pub mod wire;

pub use config::Config;
pub use model::{unix_ms, version, GIT_REV, RELEASE};
pub use node::Agent;

use std::sync::Arc;

/// Anything that stops a node from starting or running. Expected outcomes (a refused
/// reservation) are not here: see [`rear::RearError`] and [`tables::Reservation`].
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Table(#[from] tables::TableError),
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("broker: {0}")]
    Broker(String),
    #[error("{0}")]
    Other(String),
}

/// One step of the FLUIDOS workflow as it happens on a node (numbers as in the seed
/// workflow "two nodes, same domain").
#[derive(Clone, Debug)]
pub struct Step {
    pub number: u8,
    /// The functional element acting: "REAR Manager", "Contract Manager", ...
    pub element: &'static str,
    pub node: model::Id,
    pub text: String,
}

/// Receives every [`Step`]; the demo prints them, tests record them.
pub type Observer = Arc<dyn Fn(&Step) + Send + Sync>;
