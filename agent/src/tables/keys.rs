//! The keys of the `ledger` tree. Every record a contract's life touches lives in that one
//! tree, under a prefix naming its table, so that each change of a contract (a group of
//! reservations, a peering, an end, a renewal, a deletion) is one atomic `apply_batch`:
//!
//! | prefix | table | key after the prefix | value |
//! | --- | --- | --- | --- |
//! | `o/` | offers | offer id | the configured offer: a [`Flavour`](crate::model::Flavour) whose resources are the total |
//! | `e/` | terms | offer id | [`Epoch`](super::Epoch): first flavour number issued under the offer's current terms |
//! | `a/` | available | offer id | [`OwnFlavour`](crate::model::OwnFlavour): the offer's flavour on offer now (its id is in the record) |
//! | `c/` | contracts | contract id | the contract with its allocation (`ledger::Record`) |
//! | `t/out/` | purchases in flight | `{tx}` | [`Outgoing`](super::Outgoing) |
//! | `t/peer/` | peering grants | contract id | the PEER_ACCEPT given |
//! | `t/peer-cluster/` | granted clusters | contract id | the consumer's cluster id |
//!
//! Prefixes are one letter and a `/`; ids never contain `/`, so no key of one table is a
//! prefix-match of another's.

use crate::model::Id;

pub(crate) const OFFER: &[u8] = b"o/";
pub(crate) const EPOCH: &[u8] = b"e/";
pub(crate) const AVAILABLE: &[u8] = b"a/";
pub(crate) const CONTRACT: &[u8] = b"c/";
pub(crate) const PURCHASE: &[u8] = b"t/out/";
pub(crate) const GRANT: &[u8] = b"t/peer/";
pub(crate) const GRANT_CLUSTER: &[u8] = b"t/peer-cluster/";

fn key(prefix: &[u8], parts: &[&str]) -> Vec<u8> {
    let len = parts.iter().map(|p| p.len() + 1).sum::<usize>();
    let mut k = Vec::with_capacity(prefix.len() + len);
    k.extend_from_slice(prefix);
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(b'/');
        }
        k.extend_from_slice(p.as_bytes());
    }
    k
}

pub(crate) fn offer(id: &Id) -> Vec<u8> {
    key(OFFER, &[id.as_str()])
}
pub(crate) fn epoch(offer: &Id) -> Vec<u8> {
    key(EPOCH, &[offer.as_str()])
}
pub(crate) fn available(offer: &Id) -> Vec<u8> {
    key(AVAILABLE, &[offer.as_str()])
}
pub(crate) fn contract(id: &Id) -> Vec<u8> {
    key(CONTRACT, &[id.as_str()])
}
pub(crate) fn purchase(tx: &Id) -> Vec<u8> {
    key(PURCHASE, &[tx.as_str()])
}
pub(crate) fn grant(contract: &Id) -> Vec<u8> {
    key(GRANT, &[contract.as_str()])
}
pub(crate) fn grant_cluster(contract: &Id) -> Vec<u8> {
    key(GRANT_CLUSTER, &[contract.as_str()])
}

/// The offer and flavour number of a flavour id `{offer}.{n}`, if it has that form.
pub(crate) fn superseded_offer(flavour: &Id) -> Option<(Id, u64)> {
    let (offer, n) = flavour.as_str().rsplit_once('.')?;
    Some((Id::new(offer).ok()?, n.parse().ok()?))
}

/// Whether a contracts key (after its prefix) is one of `me`'s own sales, `{me}.c{n}`
/// (docs/protocol.md): decided from the key, without decoding the contract.
pub(crate) fn is_sale_of(me: &Id, contract_key: &[u8]) -> bool {
    let sold = format!("{me}.c");
    contract_key
        .strip_prefix(sold.as_bytes())
        .is_some_and(|n| !n.is_empty() && n.iter().all(u8::is_ascii_digit))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Id {
        Id::new(s).unwrap()
    }

    #[test]
    fn no_key_of_one_table_falls_under_another_tables_prefix() {
        let x = id("x");
        let keys = [
            offer(&x),
            epoch(&x),
            available(&x),
            contract(&x),
            purchase(&x),
            grant(&x),
            grant_cluster(&x),
        ];
        let prefixes = [
            OFFER,
            EPOCH,
            AVAILABLE,
            CONTRACT,
            PURCHASE,
            GRANT,
            GRANT_CLUSTER,
        ];
        for (i, k) in keys.iter().enumerate() {
            for (j, p) in prefixes.iter().enumerate() {
                assert_eq!(k.starts_with(p), i == j, "{:?} under {:?}", k, p);
            }
        }
    }

    #[test]
    fn a_sale_key_is_recognised_by_its_form_only() {
        let me = id("alice");
        assert!(is_sale_of(&me, b"alice.c1"));
        assert!(is_sale_of(&me, b"alice.c22"));
        for other in ["bob.c3", "alice.c2.c7", "alice.x.c5", "alice.c", "alice.cx"] {
            assert!(!is_sale_of(&me, other.as_bytes()), "{other}");
        }
    }
}
