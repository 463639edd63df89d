//! Discovery Manager: which flavours match a selector, what buying one would cost, and which
//! candidate is best.
//!
//! Both sides of discovery use the same function, [`fit`]: the provider to answer
//! LIST_FLAVOURS (workflow step 8) and the consumer to pick among its Peering Candidates
//! (steps 5 and 12). One function means the consumer never asks for a piece the provider
//! would refuse to list. It is pure: no clock, no table, no broker, so every edge case is a
//! unit test. The I/O half of discovery lives in [`crate::rear::consumer`] (broadcasting
//! LIST_FLAVOURS, collecting FLAVOURS into the candidates table), [`crate::rear::provider`]
//! (answering LIST_FLAVOURS) and [`crate::node`] (catalog adverts into the candidates table).

use crate::model::{Candidate, Flavour, FlavourSelector, Id, Resources};
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

/// What a selector would buy of a flavour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fit {
    /// The piece to ask for; `None` buys the whole flavour.
    pub partition: Option<Resources>,
    /// What the buyer gets.
    pub resources: Resources,
    /// What it costs per period (see [`crate::model::Price`]).
    pub price: u64,
    /// How much more than the selector's minimum the buyer gets, CPU then memory: the
    /// "fit" tie-breaker, smaller is better.
    pub waste: (u64, u64),
}

/// Smallest valid piece of one resource: at least `want` and `min`, a multiple of `step`.
fn piece(want: u64, min: u64, step: u64) -> Option<u64> {
    let v = want.max(min);
    if step == 0 {
        return Some(v);
    }
    v.div_ceil(step).checked_mul(step)
}

fn within(v: u64, min: u64, max: Option<u64>) -> bool {
    v >= min && max.is_none_or(|m| v <= m)
}

/// Price of `part` of `flavour`: the flavour's price times the part's share of its CPU,
/// rounded up (a flavour without CPU is sold whole at its price).
pub fn price_of(flavour: &Flavour, part: &Resources) -> u64 {
    let total = flavour.resources.cpu;
    if total == 0 || part.cpu >= total {
        return flavour.price.amount;
    }
    let p = (flavour.price.amount as u128 * part.cpu as u128).div_ceil(total as u128);
    u64::try_from(p).unwrap_or(u64::MAX)
}

/// Whether `flavour` satisfies `sel`, and if so what would be bought.
///
/// A flavour sold whole matches when each of its resources lies within the selector's
/// bounds. A partitionable flavour matches when the smallest valid piece covering the
/// selector's minimum (rounded up to the flavour's minimum and step) fits in the flavour and
/// within the selector's maximum. Storage is never partitioned by a step: a piece takes
/// exactly the storage the selector asks for.
pub fn fit(flavour: &Flavour, sel: &FlavourSelector) -> Option<Fit> {
    if !flavour.available {
        return None;
    }
    if let Some(arch) = &sel.architecture {
        if arch.as_str() != flavour.architecture.as_str() {
            return None;
        }
    }
    if sel.gpu == Some(true) && flavour.gpu.is_none() {
        return None;
    }
    if let Some(country) = &sel.country {
        let theirs = flavour.location.as_ref().and_then(|l| l.country.as_ref());
        if theirs != Some(country) {
            return None;
        }
    }
    let min = sel.min.unwrap_or_default();
    let max = sel.max.unwrap_or_default();
    let have = flavour.resources;
    let (partition, got) = match &flavour.partitionability {
        None => (None, have),
        Some(p) => {
            let part = Resources {
                cpu: piece(min.cpu, p.cpu_min, p.cpu_step)?,
                memory: piece(min.memory, p.memory_min, p.memory_step)?,
                pods: u32::try_from(piece(
                    min.pods as u64,
                    p.pods_min as u64,
                    p.pods_step as u64,
                )?)
                .ok()?,
                storage: min.storage,
            };
            have.checked_sub(&part)?;
            (Some(part), part)
        }
    };
    let ok = within(got.cpu, min.cpu, max.cpu)
        && within(got.memory, min.memory, max.memory)
        && within(got.pods as u64, min.pods as u64, max.pods.map(u64::from))
        && within(got.storage, min.storage, max.storage);
    if !ok {
        return None;
    }
    let price = price_of(flavour, &got);
    if sel.max_price.is_some_and(|m| price > m) {
        return None;
    }
    Some(Fit {
        partition,
        resources: got,
        price,
        waste: (got.cpu - min.cpu, got.memory - min.memory),
    })
}

/// The flavours among `flavours` that match `sel`.
pub fn matching<'a>(
    flavours: impl IntoIterator<Item = &'a Flavour>,
    sel: &FlavourSelector,
) -> Vec<Flavour> {
    flavours
        .into_iter()
        .filter(|f| fit(f, sel).is_some())
        .cloned()
        .collect()
}

/// How this node stands with a provider, from Ratings and Metrics: what ranking weighs
/// besides price and fit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Standing {
    /// The provider recently refused or ignored a reservation of what it had just offered
    /// (a liar, see [`crate::rear`]): ranked after every provider that is not, whatever
    /// its price, until the demotion ends.
    pub demoted: bool,
    /// Failed reservations and peerings; fewer first, at the same price.
    pub failures: u64,
}

/// Fresh candidates that match `sel`, best first: providers not demoted before demoted ones
/// (a liar cannot buy the top of the list with a low price), then lowest price, then the
/// provider's record (fewer failures first), then least waste, then provider and flavour id
/// so the order is deterministic.
pub fn rank(
    candidates: impl IntoIterator<Item = Candidate>,
    sel: &FlavourSelector,
    now: u64,
    max_age_ms: u64,
    standing: impl Fn(&Id) -> Standing,
) -> Vec<(Candidate, Fit)> {
    let v: Vec<(Standing, Candidate, Fit)> = candidates
        .into_iter()
        .filter(|c| now.saturating_sub(c.seen_at) <= max_age_ms)
        .filter_map(|c| fit(&c.flavour, sel).map(|f| (standing(&c.flavour.provider), c, f)))
        .collect();
    // Sort positions, not the candidates: a candidate is large, and moving it log n times
    // each made ranking a big domain cost more than storing it.
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_unstable_by(|&i, &j| {
        let ((sa, a, fa), (sb, b, fb)) = (&v[i], &v[j]);
        (
            sa.demoted,
            fa.price,
            sa.failures,
            fa.waste,
            &a.flavour.provider,
            &a.flavour.id,
        )
            .cmp(&(
                sb.demoted,
                fb.price,
                sb.failures,
                fb.waste,
                &b.flavour.provider,
                &b.flavour.id,
            ))
    });
    let mut slots: Vec<Option<(Candidate, Fit)>> =
        v.into_iter().map(|(_, c, f)| Some((c, f))).collect();
    order.into_iter().filter_map(|i| slots[i].take()).collect()
}

/// Peering candidates kept per provider: twice the flavours of one advert, since answers to
/// different selectors list different flavours and ids change as flavours are cut.
pub const MAX_CANDIDATES_PER_PROVIDER: usize = 2 * crate::model::MAX_FLAVOURS;

/// The Peering Candidates table: other providers' flavours as last advertised or listed,
/// by `{provider}/{flavour}`.
///
/// A cache, kept in memory and CBOR-encoded: the broker's retained catalog sends every
/// advert again after a restart, and candidates are only trusted for `candidate_ttl`
/// anyway. In sled, a domain of thousands of providers made every advert stored cost 30x
/// more once the tree outgrew sled's page cache and about 2 KiB of resident memory per
/// candidate, against about 250 bytes here (`bench/examples/tables_probe.rs`,
/// docs/benchmarks.md). Bounded per provider ([`MAX_CANDIDATES_PER_PROVIDER`]).
#[derive(Default)]
pub struct Candidates {
    map: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
    /// The protocol revision each provider with candidates last said it implements
    /// (docs/protocol.md section 9); a provider not in it is revision 0. One entry per
    /// provider that has candidates: dropped with its last candidate.
    revisions: Mutex<BTreeMap<Id, u16>>,
}

fn candidate_key(provider: &Id, flavour: &Id) -> Vec<u8> {
    format!("{provider}/{flavour}").into_bytes()
}

fn encode(flavour: &Flavour, now: u64) -> Vec<u8> {
    let c = Candidate {
        flavour: flavour.clone(),
        seen_at: now,
    };
    // Encoding into a Vec cannot fail.
    minicbor::to_vec(&c).unwrap_or_default()
}

impl Candidates {
    /// The map, however a panicking holder left it (each update is complete or not made:
    /// a poisoned lock holds no half-written entry).
    fn map(&self) -> MutexGuard<'_, BTreeMap<Vec<u8>, Vec<u8>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn revisions(&self) -> MutexGuard<'_, BTreeMap<Id, u16>> {
        self.revisions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the revision `provider`'s advert or FLAVOURS answer carried (absent: 0).
    pub fn note_revision(&self, provider: &Id, revision: Option<u16>) {
        self.revisions()
            .insert(provider.clone(), revision.unwrap_or(0));
    }

    /// The protocol revision `provider` last said it implements; 0 when it said none or is
    /// not known.
    pub fn revision(&self, provider: &Id) -> u16 {
        self.revisions().get(provider).copied().unwrap_or(0)
    }

    /// Drops the revisions of providers that have no candidate left.
    fn prune_revisions(&self, map: &BTreeMap<Vec<u8>, Vec<u8>>) {
        self.revisions().retain(|p, _| {
            let prefix = format!("{p}/").into_bytes();
            map.range(prefix.clone()..)
                .next()
                .is_some_and(|(k, _)| k.starts_with(&prefix))
        });
    }

    /// The keys of `provider`'s candidates.
    fn keys_of(map: &BTreeMap<Vec<u8>, Vec<u8>>, provider: &Id) -> Vec<Vec<u8>> {
        let prefix = format!("{provider}/").into_bytes();
        map.range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Replaces everything known of `provider` with `flavours` (an advert).
    pub fn replace(&self, provider: &Id, flavours: &[Flavour], now: u64) {
        let mut map = self.map();
        for k in Self::keys_of(&map, provider) {
            map.remove(&k);
        }
        for f in flavours {
            map.insert(candidate_key(provider, &f.id), encode(f, now));
        }
        if flavours.is_empty() {
            self.revisions().remove(provider);
        }
    }

    /// Adds or refreshes `provider`'s candidates `flavours` (an answer lists only what matched
    /// its selector, so nothing else of the provider is dropped). A provider keeps at most
    /// [`MAX_CANDIDATES_PER_PROVIDER`]: beyond it the ones seen longest ago are forgotten
    /// (their number is returned), so a provider answering every discovery with new flavour
    /// ids cannot grow the table.
    pub fn add<'a>(
        &self,
        provider: &Id,
        flavours: impl IntoIterator<Item = &'a Flavour>,
        now: u64,
    ) -> usize {
        let mut map = self.map();
        for f in flavours {
            map.insert(candidate_key(provider, &f.id), encode(f, now));
        }
        let mut theirs: Vec<(u64, Vec<u8>)> = Self::keys_of(&map, provider)
            .into_iter()
            .map(|k| {
                let seen = map
                    .get(&k)
                    .and_then(|v| minicbor::decode::<Candidate>(v).ok())
                    .map_or(0, |c| c.seen_at);
                (seen, k)
            })
            .collect();
        let over = theirs.len().saturating_sub(MAX_CANDIDATES_PER_PROVIDER);
        if over > 0 {
            theirs.sort();
            for (_, k) in theirs.into_iter().take(over) {
                map.remove(&k);
            }
        }
        over
    }

    /// Forgets every candidate last advertised or listed before `cutoff` (Unix ms): a
    /// provider whose adverts stopped coming (`advert_max_age`). Returns how many went.
    pub fn forget_seen_before(&self, cutoff: u64) -> usize {
        let mut map = self.map();
        let before = map.len();
        map.retain(|_, v| minicbor::decode::<Candidate>(v).is_ok_and(|c| c.seen_at >= cutoff));
        self.prune_revisions(&map);
        before - map.len()
    }

    /// Forgets one candidate (it was sold or refused).
    pub fn remove(&self, provider: &Id, flavour: &Id) {
        let mut map = self.map();
        map.remove(&candidate_key(provider, flavour));
        if Self::keys_of(&map, provider).is_empty() {
            self.revisions().remove(provider);
        }
    }

    /// Whether a candidate of `provider` was advertised or listed after `t` (Unix ms).
    pub fn heard_since(&self, provider: &Id, t: u64) -> bool {
        let map = self.map();
        Self::keys_of(&map, provider).iter().any(|k| {
            map.get(k)
                .and_then(|v| minicbor::decode::<Candidate>(v).ok())
                .is_some_and(|c| c.seen_at > t)
        })
    }

    /// How many candidates are kept.
    pub fn count(&self) -> usize {
        self.map().len()
    }

    /// Every candidate, by provider then flavour id.
    pub fn all(&self) -> Vec<Candidate> {
        self.map()
            .values()
            .filter_map(|v| minicbor::decode(v).ok())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Id, Limits, Partitionability, Price, Text};

    const GI: u64 = 1 << 30;

    fn build_flavour(id: &str, cpu: u64, mem_gi: u64, price: u64) -> Flavour {
        Flavour {
            id: Id::new(id).unwrap(),
            provider: Id::new("p1").unwrap(),
            architecture: Text::new("arm64").unwrap(),
            resources: Resources {
                cpu,
                memory: mem_gi * GI,
                pods: 110,
                storage: 0,
            },
            gpu: None,
            partitionability: None,
            price: Price {
                amount: price,
                currency: Text::new("EUR").unwrap(),
                period: Text::new("hour").unwrap(),
            },
            available: true,
            location: None,
        }
    }

    fn build_partitionable(id: &str, cpu: u64, mem_gi: u64, price: u64) -> Flavour {
        let mut f = build_flavour(id, cpu, mem_gi, price);
        f.partitionability = Some(Partitionability {
            cpu_min: 500,
            memory_min: GI,
            pods_min: 1,
            cpu_step: 500,
            memory_step: GI / 2,
            pods_step: 1,
        });
        f
    }

    fn build_selector(cpu: u64, mem_gi: u64) -> FlavourSelector {
        FlavourSelector {
            min: Some(Resources {
                cpu,
                memory: mem_gi * GI,
                pods: 1,
                storage: 0,
            }),
            ..Default::default()
        }
    }

    fn build_candidate(f: Flavour, seen_at: u64) -> Candidate {
        Candidate {
            flavour: f,
            seen_at,
        }
    }

    #[test]
    fn empty_selector_matches_any_available_flavour() {
        let f = build_flavour("f", 2000, 4, 100);
        assert!(fit(&f, &FlavourSelector::default()).is_some());
        let unavailable = Flavour {
            available: false,
            ..f
        };
        assert!(fit(&unavailable, &FlavourSelector::default()).is_none());
    }

    #[test]
    fn architecture_must_match_exactly() {
        let f = build_flavour("f", 2000, 4, 100);
        let sel = FlavourSelector {
            architecture: Some(Text::new("amd64").unwrap()),
            ..Default::default()
        };
        assert!(fit(&f, &sel).is_none());
    }

    #[test]
    fn whole_flavour_matches_only_within_min_and_max() {
        let f = build_flavour("f", 2000, 4, 100);
        assert!(
            fit(&f, &build_selector(2000, 4)).is_some(),
            "min is inclusive"
        );
        assert!(fit(&f, &build_selector(2001, 4)).is_none());
        let mut sel = build_selector(1000, 1);
        sel.max = Some(Limits {
            cpu: Some(1999),
            ..Default::default()
        });
        assert!(fit(&f, &sel).is_none(), "whole flavour above max cpu");
        sel.max = Some(Limits {
            cpu: Some(2000),
            ..Default::default()
        });
        let got = fit(&f, &sel).unwrap();
        assert_eq!(got.partition, None);
        assert_eq!(got.resources, f.resources);
        assert_eq!(got.waste, (1000, 3 * GI));
    }

    #[test]
    fn partitionable_flavour_yields_the_smallest_valid_piece() {
        let f = build_partitionable("f", 4000, 8, 400);
        // 700 millicores round up to the 500 step: 1000; 1.2 GiB rounds to 1.5 GiB.
        let sel = FlavourSelector {
            min: Some(Resources {
                cpu: 700,
                memory: GI + GI / 5,
                pods: 0,
                storage: 0,
            }),
            ..Default::default()
        };
        let got = fit(&f, &sel).unwrap();
        let part = got.partition.unwrap();
        assert_eq!(part.cpu, 1000);
        assert_eq!(part.memory, GI + GI / 2);
        assert_eq!(part.pods, 1, "pods rounded up to the flavour minimum");
        assert_eq!(got.price, 100, "a quarter of the CPU costs a quarter");
    }

    #[test]
    fn partitionable_flavour_without_room_does_not_match() {
        let f = build_partitionable("f", 4000, 8, 400);
        assert!(fit(&f, &build_selector(4500, 1)).is_none());
        assert!(
            fit(&f, &build_selector(4000, 8)).is_some(),
            "exactly all of it"
        );
    }

    #[test]
    fn piece_above_the_selector_max_does_not_match() {
        let f = build_partitionable("f", 4000, 8, 400);
        let mut sel = build_selector(100, 1);
        sel.max = Some(Limits {
            cpu: Some(400),
            ..Default::default()
        });
        assert!(fit(&f, &sel).is_none(), "the minimum piece is 500");
    }

    #[test]
    fn max_price_applies_to_what_is_bought() {
        let f = build_partitionable("f", 4000, 8, 400);
        let mut sel = build_selector(1000, 1);
        sel.max_price = Some(99);
        assert!(fit(&f, &sel).is_none());
        sel.max_price = Some(100);
        assert!(fit(&f, &sel).is_some());
    }

    #[test]
    fn gpu_requirement_filters_flavours_without_gpu() {
        let f = build_flavour("f", 2000, 4, 100);
        let sel = FlavourSelector {
            gpu: Some(true),
            ..Default::default()
        };
        assert!(fit(&f, &sel).is_none());
    }

    #[test]
    fn price_of_a_part_rounds_up_and_survives_huge_values() {
        let f = build_flavour("f", 3, 1, 10);
        let part = Resources {
            cpu: 1,
            ..Default::default()
        };
        assert_eq!(price_of(&f, &part), 4);
        let big = build_flavour("f", u64::MAX, 1, u64::MAX);
        assert_eq!(price_of(&big, &big.resources), u64::MAX);
    }

    #[test]
    fn rank_orders_by_price_then_waste_and_drops_stale_candidates() {
        let cheap_big = build_flavour("a", 8000, 16, 50);
        let cheap_tight = build_flavour("b", 2000, 4, 50);
        let dear = build_flavour("c", 2000, 4, 90);
        let stale = build_flavour("d", 2000, 4, 1);
        let ranked = rank(
            [
                build_candidate(dear, 1000),
                build_candidate(cheap_big, 1000),
                build_candidate(stale, 0),
                build_candidate(cheap_tight, 1000),
            ],
            &build_selector(2000, 4),
            1500,
            600,
            |_| Standing::default(),
        );
        let ids: Vec<&str> = ranked.iter().map(|(c, _)| c.flavour.id.as_str()).collect();
        assert_eq!(ids, ["b", "a", "c"]);
    }

    #[test]
    fn rank_prefers_the_provider_that_failed_less_at_the_same_price() {
        let mut shaky = build_flavour("s", 2000, 4, 50);
        shaky.provider = Id::new("shaky").unwrap();
        let mut steady = build_flavour("t", 8000, 16, 50);
        steady.provider = Id::new("steady").unwrap();
        let failures = |p: &Id| Standing {
            demoted: false,
            failures: if p.as_str() == "shaky" { 3 } else { 0 },
        };
        let ranked = rank(
            [
                build_candidate(shaky.clone(), 0),
                build_candidate(steady, 0),
            ],
            &build_selector(2000, 4),
            0,
            600,
            failures,
        );
        let ids: Vec<&str> = ranked.iter().map(|(c, _)| c.flavour.id.as_str()).collect();
        assert_eq!(ids, ["t", "s"], "reliability before fit");
        // But price still comes first.
        shaky.price.amount = 49;
        let ranked = rank(
            [build_candidate(shaky, 0)],
            &build_selector(2000, 4),
            0,
            600,
            failures,
        );
        assert_eq!(ranked.len(), 1);
    }

    #[test]
    fn rank_puts_a_demoted_provider_after_every_other_whatever_its_price() {
        let mut liar = build_flavour("l", 2000, 4, 1);
        liar.provider = Id::new("liar").unwrap();
        let mut honest = build_flavour("h", 2000, 4, 90);
        honest.provider = Id::new("honest").unwrap();
        let standing = |demote: bool| {
            move |p: &Id| Standing {
                demoted: demote && p.as_str() == "liar",
                failures: 0,
            }
        };
        let cands = [
            build_candidate(liar.clone(), 0),
            build_candidate(honest.clone(), 0),
        ];
        let ids = |r: Vec<(Candidate, Fit)>| -> Vec<String> {
            r.iter().map(|(c, _)| c.flavour.id.to_string()).collect()
        };
        let sel = build_selector(2000, 4);
        assert_eq!(
            ids(rank(cands.clone(), &sel, 0, 600, standing(false))),
            ["l", "h"],
            "cheapest first while nobody is demoted"
        );
        assert_eq!(
            ids(rank(cands, &sel, 0, 600, standing(true))),
            ["h", "l"],
            "a demoted provider comes last, still listed"
        );
    }

    fn flavour_of(provider: &str, i: usize) -> Flavour {
        let mut f = crate::model::demo_offer(&Id::new(provider).unwrap());
        f.id = Id::new(&format!("f{i:03}")).unwrap();
        f
    }

    #[test]
    fn candidates_per_provider_are_bounded_and_the_oldest_are_forgotten() {
        let t = Candidates::default();
        let good = Id::new("good").unwrap();
        for i in 0..3 {
            assert_eq!(t.add(&good, [&flavour_of("good", i)], 1), 0);
        }
        let extra = 10;
        let eve = Id::new("eve").unwrap();
        let forgotten: usize = (0..MAX_CANDIDATES_PER_PROVIDER + extra)
            .map(|i| t.add(&eve, [&flavour_of("eve", i)], 100 + i as u64))
            .sum();
        assert_eq!(forgotten, extra);
        let all = t.all();
        let eves: Vec<_> = all
            .iter()
            .filter(|c| c.flavour.provider.as_str() == "eve")
            .collect();
        assert_eq!(eves.len(), MAX_CANDIDATES_PER_PROVIDER);
        assert!(
            eves.iter().all(|c| c.seen_at >= 100 + extra as u64),
            "the newest are kept"
        );
        assert_eq!(
            all.len() - eves.len(),
            3,
            "another provider's are untouched"
        );
    }

    #[test]
    fn an_advert_replaces_one_providers_candidates_never_one_whose_id_extends_it() {
        let t = Candidates::default();
        let (a, ab) = (Id::new("a").unwrap(), Id::new("ab").unwrap());
        t.replace(&a, &[flavour_of("a", 1), flavour_of("a", 2)], 1);
        t.replace(&ab, &[flavour_of("ab", 1)], 1);
        t.replace(&a, &[flavour_of("a", 3)], 2);
        let ids: Vec<String> = t
            .all()
            .iter()
            .map(|c| format!("{}/{}", c.flavour.provider, c.flavour.id))
            .collect();
        assert_eq!(ids, ["a/f003", "ab/f001"]);
        t.replace(&a, &[], 3);
        assert_eq!(t.count(), 1);
        assert_eq!(t.forget_seen_before(2), 1, "ab's was seen at 1");
        assert_eq!(t.count(), 0);
    }
}
