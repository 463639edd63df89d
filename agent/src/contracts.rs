//! Contract Manager: the rules of RESERVE_FLAVOUR on both sides, without I/O.
//!
//! The provider side is [`plan`]: given the flavour on offer and a request, either the piece
//! to carve out and what is left, or a [`Refusal`] that becomes an ERROR on the wire. The
//! durable half (one sled transaction, flushed before OK) is [`crate::tables::Tables::reserve`],
//! which calls [`plan`] inside the transaction so that the check and the write cannot be
//! separated by another request. The consumer side is [`check_answer`]: a RESERVED answer
//! is accepted only if it is the contract this node asked for, from the node it asked.
//! Contract states only move forward; [`can_move`] is the one place that says how.

use crate::discovery::price_of;
use crate::model::{Contract, ContractState, Flavour, Id, ReserveRequest, Resources};
use crate::wire::ErrorCode;

/// Why a reservation was refused: an expected outcome, not a failure of the provider.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("flavour {0} is not on offer (sold, changed or never existed)")]
    FlavourGone(Id),
    #[error("the partition does not fit in what is left of flavour {0}")]
    NoFit(Id),
    /// A superseded id whose piece does not fit what is left of its offer now: answered
    /// FLAVOUR_GONE, since NO_FIT is kept for the id on offer (docs/protocol.md, "Superseded
    /// flavour ids"), which a buyer may take as a lie.
    #[error(
        "flavour {named} was cut since; what is left of its offer ({current}) does not fit \
         the partition"
    )]
    CutSince {
        // Boxed: two ids would make every `Result<_, Refusal>` twice as large.
        named: Box<Id>,
        current: Box<Id>,
    },
    #[error("bad partition: {0}")]
    BadPartition(String),
    #[error(
        "this buyer already holds {0} reservations not yet peered, the most this provider \
         keeps per buyer; peer, release or let them lapse first"
    )]
    TooManyPending(u32),
    #[error(
        "this buyer would hold more than {percent}% of offer {offer}, the most this provider \
         sells to one buyer; ask for less or release a contract first"
    )]
    ShareExceeded { offer: Id, percent: u8 },
}

impl Refusal {
    pub fn code(&self) -> ErrorCode {
        match self {
            Refusal::FlavourGone(_) | Refusal::CutSince { .. } => ErrorCode::FlavourGone,
            Refusal::NoFit(_) => ErrorCode::NoFit,
            Refusal::BadPartition(_) => ErrorCode::BadPartition,
            Refusal::TooManyPending(_) => ErrorCode::TooManyPending,
            Refusal::ShareExceeded { .. } => ErrorCode::ShareExceeded,
        }
    }
}

/// What a reservation takes out of a flavour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// What the buyer gets.
    pub resources: Resources,
    /// Price of it per period.
    pub price: u64,
    /// What stays on offer; `None` when the flavour is sold out.
    pub remainder: Option<Resources>,
}

fn check_piece(name: &str, v: u64, min: u64, step: u64) -> Result<(), Refusal> {
    if v < min {
        return Err(Refusal::BadPartition(format!(
            "{name} {v} is below the minimum {min}"
        )));
    }
    if step != 0 && !v.is_multiple_of(step) {
        return Err(Refusal::BadPartition(format!(
            "{name} {v} is not a multiple of the step {step}"
        )));
    }
    Ok(())
}

/// The provider's decision on `req` against `flavour` (workflow steps 15-16).
pub fn plan(flavour: &Flavour, req: &ReserveRequest) -> Result<Plan, Refusal> {
    if !flavour.available {
        return Err(Refusal::FlavourGone(flavour.id.clone()));
    }
    let wanted = match (&flavour.partitionability, &req.partition) {
        (_, None) => flavour.resources,
        (None, Some(_)) => {
            return Err(Refusal::BadPartition(format!(
                "flavour {} is sold only whole",
                flavour.id
            )))
        }
        (Some(p), Some(part)) => {
            check_piece("cpu", part.cpu, p.cpu_min, p.cpu_step)?;
            check_piece("memory", part.memory, p.memory_min, p.memory_step)?;
            check_piece(
                "pods",
                part.pods as u64,
                p.pods_min as u64,
                p.pods_step as u64,
            )?;
            *part
        }
    };
    let left = flavour
        .resources
        .checked_sub(&wanted)
        .ok_or_else(|| Refusal::NoFit(flavour.id.clone()))?;
    Ok(Plan {
        resources: wanted,
        price: price_of(flavour, &wanted),
        remainder: (left.cpu > 0 || left.memory > 0 || left.pods > 0).then_some(left),
    })
}

/// The refusal a buyer is told for `req`: NO_FIT against a flavour other than the one named
/// (the request named a superseded id) becomes [`Refusal::CutSince`].
pub fn as_answered(r: Refusal, req: &ReserveRequest) -> Refusal {
    match r {
        Refusal::NoFit(current) if current != req.flavour => Refusal::CutSince {
            named: Box::new(req.flavour.clone()),
            current: Box::new(current),
        },
        r => r,
    }
}

/// Whether a contract may go from `from` to `to`. Released and Expired are final.
pub fn can_move(from: ContractState, to: ContractState) -> bool {
    use ContractState::*;
    matches!(
        (from, to),
        (Reserved, Active)
            | (Reserved, Released)
            | (Reserved, Expired)
            | (Active, Released)
            | (Active, Expired)
    )
}

/// Whether the Liqo peering between `c`'s buyer and seller is used by another contract: one
/// between the same two nodes that is live (Reserved or Active) and was granted a peering
/// (`granted`: a PEER_ACCEPT is on record for it).
///
/// The one rule both sides apply. When it holds, the provider sends no new identity
/// (`liqoctl generate peering-user` fails for a consumer that has one) and the consumer
/// reuses its peering; at a release or expiry, the provider deletes the peering user and
/// the consumer unpeers only when it does not hold. A contract that was reserved but never
/// peered does not keep a peering alive: it gets its own when it peers.
pub fn peering_in_use(c: &Contract, all: &[Contract], granted: impl Fn(&Id) -> bool) -> bool {
    all.iter()
        .any(|o| could_share_peering(c, o) && granted(&o.id))
}

/// The part of [`peering_in_use`] read from the contract alone: `o` is another live
/// contract between the same buyer and seller (whether it was granted a peering is asked
/// separately).
pub fn could_share_peering(c: &Contract, o: &Contract) -> bool {
    o.id != c.id
        && o.buyer == c.buyer
        && o.seller == c.seller
        && matches!(o.state, ContractState::Reserved | ContractState::Active)
}

/// Why a RESERVED answer was not accepted by the buyer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("RESERVED answer rejected: {0}")]
pub struct BadAnswer(pub String);

/// The consumer's check of a RESERVED answer from `from` to its request `req`.
///
/// The contract id must start with the seller's id (`{seller}.`), so one seller cannot
/// overwrite another's contract in the buyer's tables by choosing its id.
pub fn check_answer(c: &Contract, from: &Id, req: &ReserveRequest) -> Result<(), BadAnswer> {
    let bad = |what: String| Err(BadAnswer(what));
    if &c.seller != from {
        return bad(format!("seller {} but sent by {from}", c.seller));
    }
    if c.buyer != req.buyer {
        return bad(format!("buyer {} is not {}", c.buyer, req.buyer));
    }
    if c.transaction != req.transaction {
        return bad(format!(
            "transaction {} is not {}",
            c.transaction, req.transaction
        ));
    }
    if c.flavour.id != req.flavour {
        return bad(format!("flavour {} is not {}", c.flavour.id, req.flavour));
    }
    if !c.id.as_str().starts_with(&format!("{from}.")) {
        return bad(format!("contract id {} is not in {from}'s namespace", c.id));
    }
    if let Some(p) = &req.partition {
        if c.resources != *p {
            return bad("resources differ from the partition asked for".into());
        }
    }
    if c.state != ContractState::Reserved {
        return bad(format!("state {}, not Reserved", c.state));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Partitionability, Price, Text};

    fn build_flavour(partitionable: bool) -> Flavour {
        Flavour {
            id: Id::new("offer.1").unwrap(),
            provider: Id::new("p1").unwrap(),
            architecture: Text::new("amd64").unwrap(),
            resources: Resources {
                cpu: 4000,
                memory: 8000,
                pods: 10,
                storage: 0,
            },
            gpu: None,
            partitionability: partitionable.then_some(Partitionability {
                cpu_min: 1000,
                memory_min: 1000,
                pods_min: 1,
                cpu_step: 500,
                memory_step: 1000,
                pods_step: 1,
            }),
            price: Price {
                amount: 4000,
                currency: Text::new("EUR").unwrap(),
                period: Text::new("hour").unwrap(),
            },
            available: true,
            location: None,
        }
    }

    fn build_request(partition: Option<Resources>) -> ReserveRequest {
        ReserveRequest {
            transaction: Id::new("c1.t1").unwrap(),
            flavour: Id::new("offer.1").unwrap(),
            buyer: Id::new("c1").unwrap(),
            partition,
        }
    }

    fn part(cpu: u64, memory: u64, pods: u32) -> Option<Resources> {
        Some(Resources {
            cpu,
            memory,
            pods,
            storage: 0,
        })
    }

    #[test]
    fn partition_leaves_a_reduced_remainder() {
        let p = plan(&build_flavour(true), &build_request(part(1500, 2000, 1))).unwrap();
        assert_eq!(p.resources.cpu, 1500);
        assert_eq!(p.price, 1500);
        assert_eq!(p.remainder, part(2500, 6000, 9));
    }

    #[test]
    fn whole_purchase_leaves_nothing() {
        let p = plan(&build_flavour(false), &build_request(None)).unwrap();
        assert_eq!(p.resources.cpu, 4000);
        assert_eq!(p.remainder, None);
    }

    #[test]
    fn taking_all_of_a_partitionable_flavour_leaves_nothing() {
        let p = plan(&build_flavour(true), &build_request(part(4000, 8000, 10))).unwrap();
        assert_eq!(p.remainder, None);
    }

    #[test]
    fn partition_larger_than_what_is_left_is_refused_as_no_fit() {
        let r = plan(&build_flavour(true), &build_request(part(4500, 1000, 1)));
        assert_eq!(r, Err(Refusal::NoFit(Id::new("offer.1").unwrap())));
    }

    #[test]
    fn partition_off_the_step_or_under_the_minimum_is_refused() {
        let f = build_flavour(true);
        let r = plan(&f, &build_request(part(1200, 1000, 1))).unwrap_err();
        assert!(
            matches!(r, Refusal::BadPartition(ref m) if m.contains("multiple")),
            "{r}"
        );
        let r = plan(&f, &build_request(part(500, 1000, 1))).unwrap_err();
        assert!(
            matches!(r, Refusal::BadPartition(ref m) if m.contains("minimum")),
            "{r}"
        );
        let r = plan(&f, &build_request(part(1000, 1000, 0))).unwrap_err();
        assert_eq!(r.code(), ErrorCode::BadPartition);
    }

    #[test]
    fn splitting_a_whole_only_flavour_is_refused() {
        let r = plan(&build_flavour(false), &build_request(part(1000, 1000, 1)));
        assert!(matches!(r, Err(Refusal::BadPartition(_))));
    }

    #[test]
    fn unavailable_flavour_is_gone() {
        let mut f = build_flavour(false);
        f.available = false;
        assert!(matches!(
            plan(&f, &build_request(None)),
            Err(Refusal::FlavourGone(_))
        ));
    }

    #[test]
    fn contract_states_only_move_forward() {
        use ContractState::*;
        assert!(can_move(Reserved, Active));
        assert!(can_move(Reserved, Expired));
        assert!(can_move(Active, Released));
        assert!(
            can_move(Active, Expired),
            "a peered contract ends when its term runs out unrenewed"
        );
        assert!(!can_move(Released, Active));
        assert!(!can_move(Expired, Reserved));
        assert!(!can_move(Reserved, Reserved));
    }

    fn build_contract(id: &str) -> Contract {
        let f = build_flavour(false);
        Contract {
            id: Id::new(id).unwrap(),
            transaction: Id::new("c1.t1").unwrap(),
            resources: f.resources,
            flavour: f,
            buyer: Id::new("c1").unwrap(),
            seller: Id::new("p1").unwrap(),
            price: 4000,
            created_at: 0,
            expires_at: 1,
            state: ContractState::Reserved,
            term_ms: None,
            ends_at: None,
        }
    }

    #[test]
    fn answer_from_the_seller_for_this_transaction_is_accepted() {
        let req = build_request(None);
        let p1 = Id::new("p1").unwrap();
        assert_eq!(check_answer(&build_contract("p1.c9"), &p1, &req), Ok(()));
    }

    #[test]
    fn answer_in_another_sellers_namespace_or_from_another_node_is_rejected() {
        let req = build_request(None);
        let p1 = Id::new("p1").unwrap();
        assert!(check_answer(&build_contract("p2.c9"), &p1, &req).is_err());
        assert!(check_answer(&build_contract("p1.c9"), &Id::new("p2").unwrap(), &req).is_err());
        let mut other_tx = req.clone();
        other_tx.transaction = Id::new("c1.t2").unwrap();
        assert!(check_answer(&build_contract("p1.c9"), &p1, &other_tx).is_err());
    }

    #[test]
    fn a_peering_is_in_use_only_by_live_granted_contracts_of_the_same_pair() {
        use crate::model::test_contract;
        let piece = Resources {
            cpu: 500,
            memory: 1 << 30,
            pods: 1,
            storage: 0,
        };
        let c = |id: &str, buyer: &str, state| test_contract(id, "p", buyer, piece, state);
        let this = c("p.c1", "b", ContractState::Active);
        let granted = |id: &Id| id.as_str() != "p.c3";
        let in_use = |others: Vec<Contract>| {
            let mut all = vec![this.clone()];
            all.extend(others);
            peering_in_use(&this, &all, granted)
        };
        assert!(!in_use(vec![]), "the contract itself does not count");
        assert!(in_use(vec![c("p.c2", "b", ContractState::Active)]));
        assert!(
            in_use(vec![c("p.c2", "b", ContractState::Reserved)]),
            "granted, still peering"
        );
        assert!(
            !in_use(vec![c("p.c3", "b", ContractState::Reserved)]),
            "reserved, never peered"
        );
        assert!(!in_use(vec![c("p.c2", "b", ContractState::Released)]));
        assert!(!in_use(vec![c("p.c2", "b", ContractState::Expired)]));
        assert!(!in_use(vec![c("p.c2", "other", ContractState::Active)]));
        let mut foreign = c("q.c2", "b", ContractState::Active);
        foreign.seller = Id::new("q").unwrap();
        assert!(
            !in_use(vec![foreign]),
            "another seller's peering is another peering"
        );
    }
}
