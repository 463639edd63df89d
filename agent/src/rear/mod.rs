//! REAR Manager: the REAR protocol as a node speaks it, in two sides.
//!
//! - [`consumer`]: buying. From a flavour selector to a durable contract and a peering:
//!   candidates (5), discovery (6-7, 10-12), reservation (13-14, 19-20), peering (21-22,
//!   26-28), release and teardown of what this node bought.
//! - [`provider`]: selling. The node task hands it the requests of other nodes: LIST_FLAVOURS
//!   (8-9), RESERVE_FLAVOUR (15-18), PEER_REQUEST (23-26), RELEASE.
//!
//! Step numbers are those of the seed workflow "two nodes, same domain"; each function's doc
//! names the steps it performs. Both sides work on `Shared` ([`crate::shared`]); neither imports
//! the other.

pub mod consumer;
pub mod provider;

pub use crate::shared::RearError;

/// What the Network Manager does when a contract is signed (steps 18 and 19). With Liqo v1
/// there is nothing to deploy yet: `liqoctl peer` (steps 26-27) sets up the WireGuard
/// gateways that give the two clusters reachability. See docs/fabric.md.
pub(crate) const NETWORK_NOTE: &str =
    "informed of the contract: reachability comes with the Liqo peering (gateway set up at step 27)";
