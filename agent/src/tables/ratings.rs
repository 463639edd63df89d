//! Ratings and Metrics (what this node learnt of each provider it bought from, or tried to)
//! and the intents it was given. Each change is one record of its own tree.

use super::codec::{dec, enc, one, scan};
use super::{TableError, Tables};
use crate::model::{Id, Intent};
use minicbor::{Decode, Encode};

/// What this node knows of a provider's behaviour (Ratings and Metrics).
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct Rating {
    #[n(0)]
    pub reservations_ok: u64,
    #[n(1)]
    pub reservations_failed: u64,
    /// Milliseconds from RESERVE_FLAVOUR sent to RESERVED received, last success.
    #[n(2)]
    pub last_latency_ms: u64,
    // Keys 3-5 came later: `default` lets records written before them decode.
    #[cbor(n(3), default)]
    pub peerings_ok: u64,
    #[cbor(n(4), default)]
    pub peerings_failed: u64,
    /// Milliseconds from PEER_REQUEST sent to the virtual node ready, last success.
    #[cbor(n(5), default)]
    pub last_peering_ms: u64,
    /// Reservations the provider refused (NO_FIT, or FLAVOUR_GONE twice in one flow) or
    /// ignored although it had just offered the flavour: see [`crate::rear`].
    #[cbor(n(6), default)]
    pub lies: u64,
    /// Unix ms until which the provider is ranked after every provider that did not lie
    /// (0: not demoted).
    #[cbor(n(7), default)]
    pub demoted_until: u64,
}

impl Rating {
    /// What ranking weighs: everything that went wrong with this provider.
    pub fn failures(&self) -> u64 {
        self.reservations_failed + self.peerings_failed
    }

    /// Whether the provider is demoted at `now`.
    pub fn demoted(&self, now: u64) -> bool {
        now < self.demoted_until
    }
}

impl Tables {
    /// Stores an intent, flushed: a submitted intent survives a crash.
    pub async fn put_intent(&self, intent: &Intent) -> Result<(), TableError> {
        self.intents.insert(intent.id.as_str(), enc(intent))?;
        self.flush().await
    }

    pub fn intents(&self) -> Result<Vec<Intent>, TableError> {
        scan("intents", &self.intents, b"")
    }

    pub fn intent(&self, id: &Id) -> Result<Option<Intent>, TableError> {
        one("intents", &self.intents, id.as_str().as_bytes())
    }

    /// Records the outcome of a reservation attempt with `provider`.
    pub fn rate(&self, provider: &Id, ok: bool, latency_ms: u64) -> Result<(), TableError> {
        self.update_rating(provider, |r| {
            if ok {
                r.reservations_ok += 1;
                r.last_latency_ms = latency_ms;
            } else {
                r.reservations_failed += 1;
            }
        })
    }

    /// Records that `provider` lied to a purchase (refused or ignored what it had just
    /// offered) and demotes it until `until` (Unix ms; a longer demotion already running is
    /// kept).
    pub fn demote(&self, provider: &Id, until: u64) -> Result<(), TableError> {
        self.update_rating(provider, |r| {
            r.lies += 1;
            r.demoted_until = r.demoted_until.max(until);
        })
    }

    /// Records the outcome of a peering with `provider`.
    pub fn rate_peering(&self, provider: &Id, ok: bool, ms: u64) -> Result<(), TableError> {
        self.update_rating(provider, |r| {
            if ok {
                r.peerings_ok += 1;
                r.last_peering_ms = ms;
            } else {
                r.peerings_failed += 1;
            }
        })
    }

    /// Applies `change` to `provider`'s rating atomically (flows running at once do not lose
    /// each other's counts); a rating that does not decode is reported, not overwritten.
    fn update_rating(&self, provider: &Id, change: impl Fn(&mut Rating)) -> Result<(), TableError> {
        let key = provider.as_str().as_bytes();
        let mut bad = None;
        self.ratings.update_and_fetch(key, |old| {
            let mut r = match old.map(|v| dec::<Rating>("ratings", key, v)).transpose() {
                Ok(r) => r.unwrap_or_default(),
                Err(e) => {
                    bad = Some(e);
                    return old.map(|v| v.to_vec());
                }
            };
            change(&mut r);
            Some(enc(&r))
        })?;
        bad.map_or(Ok(()), Err)
    }

    pub fn rating(&self, provider: &Id) -> Result<Option<Rating>, TableError> {
        one("ratings", &self.ratings, provider.as_str().as_bytes())
    }
}
