//! The tables' tests: each rule of the module docs, on a real sled database in a temporary
//! directory.

use super::*;

use crate::model::Resources;

const MIN: u64 = 60_000;

fn id(s: &str) -> Id {
    Id::new(s).unwrap()
}

fn piece() -> Option<Resources> {
    Some(Resources {
        cpu: 500,
        memory: 1 << 30,
        pods: 1,
        storage: 0,
    })
}

fn request(tx: &str, flavour: &Id) -> ReserveRequest {
    ReserveRequest {
        transaction: id(tx),
        flavour: flavour.clone(),
        buyer: id("buyer"),
        partition: piece(),
    }
}

async fn provider(dir: &Path, retention: Duration) -> (Tables, Id) {
    let t = Tables::open_with(dir, retention).unwrap();
    let me = id("prov");
    t.sync_offers(&[(crate::model::demo_offer(&me), SaleTerms::default())])
        .await
        .unwrap();
    (t, me)
}

/// Opens the tables again after the test dropped them. sled's I/O threads may still hold
/// the database (and its file lock) for a moment after the last handle is dropped: a
/// reopen at once failed about one run in four on a busy machine.
fn reopen(dir: &Path, retention: Duration) -> Tables {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Tables::open_with(dir, retention) {
            Ok(t) => return t,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("reopen: {e}"),
        }
    }
}

fn current(t: &Tables) -> Id {
    t.flavours().unwrap()[0].flavour.id.clone()
}

async fn reserve(t: &Tables, me: &Id, tx: &str, now: u64) -> Contract {
    let req = request(tx, &current(t));
    match t.reserve(me, &req, now, 10 * MIN).await.unwrap() {
        Reservation::New(c) => c,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn each_bought_skips_only_this_nodes_own_sales() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tables::open_with(dir.path(), Duration::from_secs(60)).unwrap();
    let me = id("alice");
    // Sold by alice: `alice.c{n}`. Bought: from bob, and from sellers whose ids begin
    // like alice's sales (node ids may hold dots).
    let ids = [
        ("alice.c1", "alice", "bob"),
        ("alice.c22", "alice", "carol"),
        ("bob.c3", "bob", "alice"),
        ("alice.c2.c7", "alice.c2", "alice"),
        ("alice.x.c5", "alice.x", "alice"),
        ("alice.c.c1", "alice.c", "alice"),
    ];
    for (cid, seller, buyer) in ids {
        let c = crate::model::test_contract(
            cid,
            seller,
            buyer,
            Resources::default(),
            ContractState::Active,
        );
        t.complete_purchase(&c, 0).await.unwrap();
    }
    let mut seen = Vec::new();
    t.each_bought(&me, |c| seen.push(c.id.as_str().to_owned()))
        .unwrap();
    seen.sort();
    assert_eq!(seen, ["alice.c.c1", "alice.c2.c7", "alice.x.c5", "bob.c3"]);
}

#[tokio::test]
async fn a_repeat_gets_the_first_answer_even_once_active_and_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (t, me) = provider(dir.path(), Duration::from_secs(60)).await;
    let c = reserve(&t, &me, "t1", 0).await;
    assert_eq!(t.transaction_record_count(), 1);
    // A repeat gets the first answer (the contract as sold), even once it is Active.
    assert!(t.activate(&c.id, 1).await.unwrap());
    let again = t
        .reserve(&me, &request("t1", &c.flavour.id), 2, MIN)
        .await
        .unwrap();
    assert_eq!(again, Reservation::Repeat(c.clone()));
    drop(t);
    // The transaction index is rebuilt from the contracts at open.
    let t = reopen(dir.path(), Duration::from_secs(60));
    let again = t
        .reserve(&me, &request("t1", &c.flavour.id), 3, MIN)
        .await
        .unwrap();
    assert_eq!(again, Reservation::Repeat(c));
    assert_eq!(t.contracts().unwrap().len(), 1, "nothing sold twice");
}

#[tokio::test]
async fn due_reads_only_the_entries_due_and_decodes_no_contract() {
    let dir = tempfile::tempdir().unwrap();
    let (t, me) = provider(dir.path(), Duration::from_secs(60)).await;
    let due = reserve(&t, &me, "t0", 0).await; // peering deadline 10 min
    let mut later = Vec::new();
    for i in 1..8 {
        later.push(reserve(&t, &me, &format!("t{i}"), MIN).await); // 11 min
    }
    // The contracts not due are made undecodable: reading any of them would fail.
    for c in &later {
        t.ledger
            .insert(keys::contract(&c.id), &b"not cbor"[..])
            .unwrap();
    }
    assert_eq!(t.due(10 * MIN - 1, 100).unwrap(), vec![]);
    assert_eq!(
        t.due(10 * MIN, 100).unwrap(),
        vec![(10 * MIN, due.id.clone())]
    );
    assert_eq!(t.contract(&due.id).unwrap().map(|c| c.id), Some(due.id));
    assert_eq!(t.due(11 * MIN, 3).unwrap().len(), 3, "at most the limit");
}

#[tokio::test]
async fn peering_removes_the_deadline_and_ending_sets_the_retention_one() {
    let dir = tempfile::tempdir().unwrap();
    let (t, me) = provider(dir.path(), Duration::from_millis(5 * MIN)).await;
    let a = reserve(&t, &me, "ta", 0).await;
    let b = reserve(&t, &me, "tb", 0).await;
    assert_eq!(t.deadline_count(), 2);
    assert!(t.activate(&a.id, 1).await.unwrap());
    assert_eq!(
        t.due(u64::MAX - 1, 10).unwrap(),
        vec![(10 * MIN, b.id.clone())]
    );
    t.end_contract(&a.id, ContractState::Released, 2 * MIN)
        .await
        .unwrap();
    t.end_contract(&b.id, ContractState::Expired, 10 * MIN)
        .await
        .unwrap();
    assert_eq!(
        t.due(u64::MAX - 1, 10).unwrap(),
        vec![(7 * MIN, a.id.clone()), (15 * MIN, b.id.clone())]
    );
}

#[tokio::test]
async fn a_contract_past_retention_is_deleted_with_its_records_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (t, me) = provider(dir.path(), Duration::from_millis(5 * MIN)).await;
    let c = reserve(&t, &me, "t1", 0).await;
    let kept = reserve(&t, &me, "t2", 0).await;
    t.put_peer_cluster(&c.id, &id("cluster")).unwrap();
    t.end_contract(&c.id, ContractState::Released, MIN)
        .await
        .unwrap();
    t.flush().await.unwrap();
    drop(t);

    let t = reopen(dir.path(), Duration::from_millis(5 * MIN));
    assert_eq!(
        t.due(6 * MIN - 1, 10).unwrap(),
        vec![],
        "still in retention"
    );
    let due = t.due(6 * MIN, 10).unwrap();
    assert_eq!(due, vec![(6 * MIN, c.id.clone())]);
    assert!(t.prune(due[0].0, &due[0].1).unwrap());
    assert_eq!(t.contract(&c.id).unwrap(), None);
    assert_eq!(t.allocation(&c.id).unwrap(), None);
    assert_eq!(t.peer_cluster(&c.id).unwrap(), None);
    assert_eq!(
        t.transaction_record_count(),
        1,
        "only the live contract's record is left"
    );
    assert_eq!(
        t.deadline_count(),
        1,
        "only the live contract's peering deadline"
    );
    assert!(t.contract(&kept.id).unwrap().is_some());
    // A retry of the pruned transaction is a new request: the flavour id it named was
    // superseded under unchanged terms, so it is served afresh with a new contract.
    let retry = t
        .reserve(&me, &request("t1", &c.flavour.id), 7 * MIN, MIN)
        .await
        .unwrap();
    assert!(
        matches!(retry, Reservation::New(ref n) if n.id != c.id),
        "{retry:?}"
    );
}

#[tokio::test]
async fn prune_deletes_nothing_of_a_live_contract() {
    let dir = tempfile::tempdir().unwrap();
    let (t, me) = provider(dir.path(), Duration::from_millis(MIN)).await;
    let c = reserve(&t, &me, "t1", 0).await;
    assert!(!t.prune(c.expires_at, &c.id).unwrap());
    assert!(t.contract(&c.id).unwrap().is_some());
    assert_eq!(t.transaction_record_count(), 1);
}

#[tokio::test]
async fn a_database_from_before_the_index_is_indexed_once_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (t, me) = provider(dir.path(), Duration::from_millis(MIN)).await;
    let live = reserve(&t, &me, "t1", 0).await;
    let ended = reserve(&t, &me, "t2", 0).await;
    t.end_contract(&ended.id, ContractState::Released, 0)
        .await
        .unwrap();
    // As a version before the index left it: a tree per table, no index, no record
    // that it was built.
    as_old_layout(&t, false).await;
    drop(t);
    let t = reopen(dir.path(), Duration::from_millis(MIN));
    let due = t.due(u64::MAX - 1, 10).unwrap();
    assert_eq!(due.len(), 2);
    assert!(due.contains(&(live.expires_at, live.id.clone())));
    assert!(due
        .iter()
        .any(|(at, c)| c == &ended.id && *at > live.expires_at));
}

#[tokio::test]
async fn a_superseded_flavour_id_is_served_from_the_current_flavour() {
    let dir = tempfile::tempdir().unwrap();
    let (t, me) = provider(dir.path(), Duration::from_secs(60)).await;
    let first = current(&t);
    let a = t
        .reserve(&me, &request("ta", &first), 0, MIN)
        .await
        .unwrap();
    let b = t
        .reserve(&me, &request("tb", &first), 0, MIN)
        .await
        .unwrap();
    let (Reservation::New(a), Reservation::New(b)) = (a, b) else {
        panic!("both served");
    };
    assert_eq!(a.flavour.id, first);
    assert_eq!(
        b.flavour.id, first,
        "the contract names the id the buyer named"
    );
    assert_eq!(
        b.flavour.resources.cpu, 3500,
        "served from the reduced flavour"
    );
    assert_eq!(t.flavours().unwrap()[0].flavour.resources.cpu, 3000);
    assert_ne!(current(&t), first);
    // A whole purchase under a superseded id is refused: what it named is gone.
    let mut whole = request("tc", &first);
    whole.partition = None;
    assert!(matches!(
        t.reserve(&me, &whole, 0, MIN).await.unwrap(),
        Reservation::Refused(Refusal::FlavourGone(_))
    ));
}

#[tokio::test]
async fn a_superseded_id_from_before_the_terms_changed_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (t, me) = provider(dir.path(), Duration::from_secs(60)).await;
    let first = current(&t);
    reserve(&t, &me, "ta", 0).await;
    let mut offer = crate::model::demo_offer(&me);
    offer.price.amount *= 2;
    t.sync_offers(&[(offer, SaleTerms::default())])
        .await
        .unwrap();
    let r = t
        .reserve(&me, &request("tb", &first), 0, MIN)
        .await
        .unwrap();
    assert_eq!(r, Reservation::Refused(Refusal::FlavourGone(first)));
    // The current id still sells, at the new price.
    let c = reserve(&t, &me, "tc", 0).await;
    assert_eq!(c.price, 2 * 250_000);
}

/// A provider whose offer sells under a contract term of `term` ms.
async fn provider_with_term(dir: &Path, retention: Duration, term: u64) -> (Tables, Id) {
    let t = Tables::open_with(dir, retention).unwrap();
    let me = id("prov");
    let sale = SaleTerms {
        max_per_buyer: 100,
        term_ms: term,
    };
    t.sync_offers(&[(crate::model::demo_offer(&me), sale)])
        .await
        .unwrap();
    (t, me)
}

#[tokio::test]
async fn a_contracts_term_end_is_indexed_moved_by_renew_and_kept_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (t, me) = provider_with_term(dir.path(), Duration::from_millis(5 * MIN), 30 * MIN).await;
    let c = reserve(&t, &me, "t1", 0).await;
    assert_eq!(c.ends_at, Some(30 * MIN));
    assert_eq!(
        t.due(u64::MAX - 1, 10).unwrap(),
        vec![(10 * MIN, c.id.clone())],
        "Reserved: the first thing due, the peering deadline (the term ends later)"
    );
    assert!(t.activate(&c.id, MIN).await.unwrap());
    assert_eq!(
        t.due(u64::MAX - 1, 10).unwrap(),
        vec![(30 * MIN, c.id.clone())],
        "Active: only the term's end"
    );
    let renewed = t.renew(&c.id, 20 * MIN).await.unwrap().unwrap();
    assert_eq!(renewed.ends_at, Some(50 * MIN));
    assert_eq!(
        t.due(u64::MAX - 1, 10).unwrap(),
        vec![(50 * MIN, c.id.clone())],
        "the renewal moved the entry"
    );
    // A repeated renewal adds nothing and leaves the single entry.
    t.renew(&c.id, 20 * MIN).await.unwrap().unwrap();
    assert_eq!(t.deadline_count(), 1);
    drop(t);

    let t = reopen(dir.path(), Duration::from_millis(5 * MIN));
    assert_eq!(t.due(50 * MIN - 1, 10).unwrap(), vec![]);
    assert_eq!(
        t.due(50 * MIN, 10).unwrap(),
        vec![(50 * MIN, c.id.clone())],
        "still due after a restart"
    );
    t.end_contract(&c.id, ContractState::Expired, 50 * MIN)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        t.due(u64::MAX - 1, 10).unwrap(),
        vec![(55 * MIN, c.id.clone())],
        "ended: only the retention's entry"
    );
}

#[tokio::test]
async fn a_term_ending_with_the_peering_deadline_keeps_its_entry_once_peered() {
    let dir = tempfile::tempdir().unwrap();
    let (t, me) = provider_with_term(dir.path(), Duration::from_millis(5 * MIN), 10 * MIN).await;
    // Term = peering deadline: one key for both.
    let c = reserve(&t, &me, "t1", 0).await;
    assert_eq!(
        t.due(u64::MAX - 1, 10).unwrap(),
        vec![(10 * MIN, c.id.clone())]
    );
    assert!(t.activate(&c.id, MIN).await.unwrap());
    assert_eq!(
        t.due(u64::MAX - 1, 10).unwrap(),
        vec![(10 * MIN, c.id.clone())],
        "the term's end is still due"
    );
}

#[tokio::test]
async fn a_bought_contracts_term_end_is_indexed_and_moved_by_extend() {
    let dir = tempfile::tempdir().unwrap();
    let (seller, me) =
        provider_with_term(dir.path(), Duration::from_millis(5 * MIN), 30 * MIN).await;
    let sold = reserve(&seller, &me, "t1", 0).await;
    drop(seller);
    let dir = tempfile::tempdir().unwrap();
    let t = Tables::open_with(dir.path(), Duration::from_millis(5 * MIN)).unwrap();
    t.complete_purchase(&sold, 0).await.unwrap();
    assert_eq!(
        t.due(u64::MAX - 1, 10).unwrap(),
        vec![(10 * MIN, sold.id.clone())],
        "Reserved: the peering deadline, which comes before the term's end"
    );
    assert!(t.activate(&sold.id, MIN).await.unwrap());
    t.extend(&sold.id, 45 * MIN).await.unwrap();
    assert_eq!(
        t.due(u64::MAX - 1, 10).unwrap(),
        vec![(45 * MIN, sold.id.clone())]
    );
    // Only ever later.
    t.extend(&sold.id, 40 * MIN).await.unwrap();
    assert_eq!(
        t.due(u64::MAX - 1, 10).unwrap(),
        vec![(45 * MIN, sold.id.clone())]
    );
}

#[tokio::test]
async fn a_repeat_after_a_renewal_gets_the_first_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (t, me) = provider_with_term(dir.path(), Duration::from_secs(60), 30 * MIN).await;
    let c = reserve(&t, &me, "t1", 0).await;
    assert!(t.activate(&c.id, 1).await.unwrap());
    t.renew(&c.id, 20 * MIN).await.unwrap().unwrap();
    let again = t
        .reserve(&me, &request("t1", &c.flavour.id), 21 * MIN, MIN)
        .await
        .unwrap();
    assert_eq!(again, Reservation::Repeat(c.clone()));
    let Reservation::Repeat(first) = again else {
        unreachable!()
    };
    assert_eq!(enc(&first), enc(&c), "byte-identical");
}

#[tokio::test]
async fn a_database_from_before_the_index_gets_its_terms_ends_indexed() {
    let dir = tempfile::tempdir().unwrap();
    let (t, me) = provider_with_term(dir.path(), Duration::from_millis(MIN), 30 * MIN).await;
    let c = reserve(&t, &me, "t1", 0).await;
    assert!(t.activate(&c.id, 1).await.unwrap());
    as_old_layout(&t, false).await;
    drop(t);
    let t = reopen(dir.path(), Duration::from_millis(MIN));
    assert_eq!(t.due(u64::MAX - 1, 10).unwrap(), vec![(30 * MIN, c.id)]);
}

#[tokio::test]
async fn prune_leaves_an_ended_contract_whose_entry_was_already_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (t, me) = provider(dir.path(), Duration::from_millis(5 * MIN)).await;
    let c = reserve(&t, &me, "t1", 0).await;
    // The sweeper read the peering deadline's entry, then the contract was released.
    t.end_contract(&c.id, ContractState::Released, MIN)
        .await
        .unwrap();
    assert!(!t.prune(c.expires_at, &c.id).unwrap());
    assert!(
        t.contract(&c.id).unwrap().is_some(),
        "kept for its retention"
    );
    assert_eq!(t.due(u64::MAX - 1, 10).unwrap(), vec![(6 * MIN, c.id)]);
}

#[tokio::test]
async fn a_superseded_id_from_before_the_sale_terms_changed_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (t, me) = provider(dir.path(), Duration::from_secs(60)).await;
    let offer = crate::model::demo_offer(&me);
    let first = current(&t);
    reserve(&t, &me, "ta", 0).await;
    // The same terms again: superseded ids are still served.
    t.sync_offers(&[(offer.clone(), SaleTerms::default())])
        .await
        .unwrap();
    assert!(matches!(
        t.reserve(&me, &request("tb", &first), 0, MIN)
            .await
            .unwrap(),
        Reservation::New(_)
    ));
    for sale in [
        SaleTerms {
            max_per_buyer: 50,
            term_ms: 0,
        },
        SaleTerms {
            max_per_buyer: 50,
            term_ms: 3_600_000,
        },
    ] {
        let before = current(&t);
        // Supersedes `before` under the terms in force.
        reserve(&t, &me, &format!("tx{}", sale.term_ms), 0).await;
        assert_ne!(current(&t), before);
        t.sync_offers(&[(offer.clone(), sale)]).await.unwrap();
        let tx = format!("tc{}", sale.term_ms);
        let r = t
            .reserve(&me, &request(&tx, &before), 0, MIN)
            .await
            .unwrap();
        assert_eq!(
            r,
            Reservation::Refused(Refusal::FlavourGone(before.clone())),
            "{sale:?}"
        );
    }
}

#[tokio::test]
async fn a_superseded_id_names_its_offer_for_the_admission() {
    let dir = tempfile::tempdir().unwrap();
    let (t, me) = provider(dir.path(), Duration::from_secs(60)).await;
    let first = current(&t);
    let offer = t.flavours().unwrap()[0].offer.clone();
    reserve(&t, &me, "ta", 0).await;
    assert_eq!(t.own_flavour(&first).unwrap(), None, "superseded");
    assert_eq!(t.offer_of(&first).unwrap(), Some(offer.clone()));
    assert_eq!(t.offer_of(&current(&t)).unwrap(), Some(offer));
    assert_eq!(t.offer_of(&id("elsewhere.1")).unwrap(), None);
    assert_eq!(t.offer_of(&id("nodot")).unwrap(), None);
}

/// Rewrites `t`'s database as fluidlet wrote it at 04a7442, before the ledger tree: a tree
/// per table, the flavour on offer under its flavour id, a transaction record per sale, the
/// deadline index with the entries that version kept (a Reserved contract's term end too);
/// with `index` false without that index and its marker, as a version before the index left
/// it.
async fn as_old_layout(t: &Tables, index: bool) {
    let old = |name: &str| t.db.open_tree(name).unwrap();
    for (name, prefix) in [("offers", keys::OFFER), ("terms", keys::EPOCH)] {
        for kv in t.ledger.scan_prefix(prefix) {
            let (k, v) = kv.unwrap();
            old(name).insert(&k[prefix.len()..], v).unwrap();
        }
    }
    for f in t.flavours().unwrap() {
        old("available")
            .insert(f.flavour.id.as_str(), enc(&f))
            .unwrap();
    }
    for kv in t.ledger.scan_prefix(b"t/") {
        let (k, v) = kv.unwrap();
        old("transactions").insert(&k[2..], v).unwrap();
    }
    for kv in t.ledger.scan_prefix(keys::CONTRACT) {
        let (k, v) = kv.unwrap();
        let r: Record = codec::dec("contracts", &k, &v).unwrap();
        let c = &r.contract;
        old("contracts").insert(c.id.as_str(), enc(c)).unwrap();
        old("allocations")
            .insert(c.id.as_str(), enc(&r.allocation()))
            .unwrap();
        if r.kind == crate::model::AllocationKind::Node {
            let tx = format!("in/{}/{}", c.buyer, c.transaction);
            old("transactions").insert(tx, enc(&c.id)).unwrap();
        }
        let mut due: Vec<u64> = match c.state {
            ContractState::Reserved => vec![c.expires_at],
            ContractState::Active => vec![],
            _ => r.kept_until.into_iter().collect(),
        };
        if matches!(c.state, ContractState::Reserved | ContractState::Active) {
            due.extend(c.ends_at);
        }
        if index {
            for at in due {
                let mut key = at.to_be_bytes().to_vec();
                key.extend_from_slice(c.id.as_str().as_bytes());
                old("deadlines").insert(key, &[][..]).unwrap();
            }
        }
    }
    t.ledger.clear().unwrap();
    t.meta.remove(b"layout").unwrap();
    if index {
        t.meta.insert(b"deadlines", &[1u8]).unwrap();
    } else {
        t.meta.remove(b"deadlines").unwrap();
    }
    t.flush().await.unwrap();
}

/// The writer's state after some work equals the state rebuilt from the tree: nothing the
/// decisions rely on lives only in memory.
fn assert_state_matches_tree(t: &Tables) {
    let kept = t.writer();
    let loaded = Ledger::load(&t.ledger).unwrap();
    assert_eq!(kept.unpeered, loaded.unpeered, "unpeered per buyer");
    assert_eq!(
        kept.offers.keys().collect::<Vec<_>>(),
        loaded.offers.keys().collect::<Vec<_>>()
    );
    for (id, o) in &kept.offers {
        let l = &loaded.offers[id];
        assert_eq!(o.total, l.total, "{id}: total");
        assert_eq!(o.epoch, l.epoch, "{id}: epoch");
        assert_eq!(o.current, l.current, "{id}: flavour on offer");
        assert_eq!(o.held, l.held, "{id}: held per buyer");
    }
}

fn buyer_request(buyer: &str, tx: &str, flavour: &Id) -> ReserveRequest {
    ReserveRequest {
        buyer: id(buyer),
        ..request(tx, flavour)
    }
}

#[tokio::test]
async fn a_group_of_reservations_is_decided_in_turn_and_written_as_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (t, me) = provider(dir.path(), Duration::from_secs(60)).await;
    let first = current(&t);
    // Four buyers pipelining on the id they saw, one of them twice in the group.
    let reqs = [
        buyer_request("a", "a.t1", &first),
        buyer_request("b", "b.t1", &first),
        buyer_request("a", "a.t1", &first),
        buyer_request("c", "c.t1", &first),
    ];
    let Decided { answers, written } = t.reserve_batch(&me, &reqs, 0, MIN, 8).unwrap();
    written.unwrap();
    let ids: Vec<_> = answers
        .iter()
        .map(|a| match a {
            Reservation::New(c) | Reservation::Repeat(c) => c.id.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(matches!(answers[2], Reservation::Repeat(_)));
    assert_eq!(
        ids[0], ids[2],
        "the same transaction gets the same contract"
    );
    assert_eq!(t.contracts().unwrap().len(), 3);
    assert_eq!(
        t.flavours().unwrap()[0].flavour.resources.cpu,
        4000 - 3 * 500
    );
    assert_state_matches_tree(&t);
    // After a restart the same request is still answered with the first contract.
    t.flush().await.unwrap();
    drop(t);
    let t = reopen(dir.path(), Duration::from_secs(60));
    let again = t.reserve(&me, &reqs[1], 5, MIN).await.unwrap();
    assert_eq!(again, answers[1].clone().into_repeat());
}

impl Reservation {
    fn into_repeat(self) -> Reservation {
        match self {
            Reservation::New(c) => Reservation::Repeat(c),
            other => other,
        }
    }
}

#[tokio::test]
async fn the_pending_limit_counts_unpeered_reservations_and_peering_frees_one() {
    let dir = tempfile::tempdir().unwrap();
    let (t, me) = provider(dir.path(), Duration::from_secs(60)).await;
    let one = |tx: &str| vec![buyer_request("a", tx, &current(&t))];
    let d = t.reserve_batch(&me, &one("a.t1"), 0, MIN, 2).unwrap();
    let Reservation::New(c1) = &d.answers[0] else {
        panic!("{:?}", d.answers)
    };
    t.reserve_batch(&me, &one("a.t2"), 0, MIN, 2).unwrap();
    let d = t.reserve_batch(&me, &one("a.t3"), 0, MIN, 2).unwrap();
    assert_eq!(
        d.answers[0],
        Reservation::Refused(Refusal::TooManyPending(2))
    );
    assert!(t.activate(&c1.id, 1).await.unwrap());
    let d = t.reserve_batch(&me, &one("a.t3"), 0, MIN, 2).unwrap();
    assert!(
        matches!(d.answers[0], Reservation::New(_)),
        "peered: room again"
    );
    t.end_contract(&c1.id, ContractState::Released, 2)
        .await
        .unwrap();
    assert_eq!(t.unpeered_by_buyer()[&id("a")], 2);
    assert_state_matches_tree(&t);
}

#[tokio::test]
async fn the_share_cap_counts_what_the_buyer_holds_until_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tables::open_with(dir.path(), Duration::from_secs(60)).unwrap();
    let me = id("prov");
    let sale = SaleTerms {
        max_per_buyer: 25,
        term_ms: 0,
    };
    t.sync_offers(&[(crate::model::demo_offer(&me), sale)])
        .await
        .unwrap();
    // 25% of 4000m: two pieces of 500m.
    let a = reserve(&t, &me, "t1", 0).await;
    reserve(&t, &me, "t2", 0).await;
    let r = t
        .reserve(&me, &request("t3", &current(&t)), 0, MIN)
        .await
        .unwrap();
    assert!(matches!(
        r,
        Reservation::Refused(Refusal::ShareExceeded { percent: 25, .. })
    ));
    t.end_contract(&a.id, ContractState::Released, 1)
        .await
        .unwrap();
    assert!(matches!(
        t.reserve(&me, &request("t3", &current(&t)), 2, MIN)
            .await
            .unwrap(),
        Reservation::New(_)
    ));
    assert_state_matches_tree(&t);
    drop(t);
    let t = reopen(dir.path(), Duration::from_secs(60));
    assert!(
        matches!(
            t.reserve(&me, &request("t4", &current(&t)), 3, MIN)
                .await
                .unwrap(),
            Reservation::Refused(Refusal::ShareExceeded { .. })
        ),
        "the holding is rebuilt at open"
    );
}

#[tokio::test]
async fn a_database_of_the_old_layout_is_moved_once_and_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let (t, me) = provider_with_term(dir.path(), Duration::from_millis(5 * MIN), 30 * MIN).await;
    let a = reserve(&t, &me, "t1", 0).await;
    let b = reserve(&t, &me, "t2", 0).await;
    assert!(t.activate(&a.id, 1).await.unwrap());
    t.end_contract(&b.id, ContractState::Released, 2)
        .await
        .unwrap();
    let due = t.due(u64::MAX - 1, 10).unwrap();
    let flavours = t.flavours().unwrap();
    as_old_layout(&t, true).await;
    drop(t);
    let t = reopen(dir.path(), Duration::from_millis(5 * MIN));
    assert_eq!(t.due(u64::MAX - 1, 10).unwrap(), due, "the index as it was");
    assert_eq!(t.flavours().unwrap(), flavours);
    assert_eq!(
        t.contract(&a.id).unwrap().unwrap().state,
        ContractState::Active
    );
    assert_eq!(
        t.contract(&b.id).unwrap().unwrap().state,
        ContractState::Released
    );
    assert_eq!(
        t.reserve(&me, &request("t1", &a.flavour.id), 3, MIN)
            .await
            .unwrap(),
        Reservation::Repeat(a.clone())
    );
    assert!(
        t.db.tree_names().iter().all(|n| &n[..] != b"contracts"),
        "old trees dropped"
    );
    assert_state_matches_tree(&t);
}

/// The database fluidlet wrote at commit 04a7442 (tests/fixtures/README.md), unpacked.
fn fixture_04a7442() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let tar = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/tables-04a7442.tar"
    );
    let st = std::process::Command::new("tar")
        .args(["-xf", tar, "-C"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(st.success(), "tar -xf {tar}");
    dir
}

#[tokio::test]
async fn a_database_written_by_04a7442_opens_migrated_with_everything_in_it() {
    let dir = fixture_04a7442();
    let data = dir.path().join("db");
    let me = id("gw-fixture");
    let week = Duration::from_secs(7 * 24 * 3600);
    let t = Tables::open_for(&data, &me, week).await.unwrap();
    let state = |c: &str| t.contract(&id(c)).unwrap().map(|c| c.state);
    assert_eq!(state("gw-fixture.c2"), Some(ContractState::Active));
    assert_eq!(state("gw-fixture.c4"), Some(ContractState::Reserved));
    assert_eq!(state("gw-fixture.c6"), Some(ContractState::Released));
    assert_eq!(state("gw-fixture.c8"), Some(ContractState::Expired));
    assert_eq!(state("gw-fixture.c10"), Some(ContractState::Active));
    assert_eq!(state("seller-x.c7"), Some(ContractState::Active));
    // Capacity: 4000m less the three live pieces of 500m, on offer under the same id.
    let on_offer = t.flavours().unwrap();
    assert_eq!(on_offer.len(), 1);
    assert_eq!(on_offer[0].flavour.id, id("edge-pool.13"));
    assert_eq!(on_offer[0].flavour.resources.cpu, 2500);
    assert_eq!(t.allocations().unwrap().len(), 6);
    assert_eq!(
        t.unpeered_by_buyer(),
        [(id("buyer-a"), 1)].into_iter().collect()
    );
    assert_eq!(
        t.held_by(&id("buyer-a"), &id("edge-pool")).unwrap().cpu,
        1000
    );
    assert!(t.peer_grant(&id("gw-fixture.c2")).unwrap().is_some());
    assert_eq!(
        t.peer_cluster(&id("gw-fixture.c10")).unwrap(),
        Some(id("buyer-d-cluster"))
    );
    let flight = t.purchases_in_flight().unwrap();
    assert_eq!(flight.len(), 1);
    assert_eq!(flight[0].request.transaction, id("gw-fixture.t101"));
    assert_eq!(
        t.rating(&id("seller-x")).unwrap().unwrap().reservations_ok,
        1
    );
    assert!(t.rating(&id("seller-y")).unwrap().unwrap().lies == 1);
    assert_eq!(t.intents().unwrap().len(), 1);
    // The index: one entry per contract: the Reserved one's peering deadline, the Active
    // ones' term ends, the ended ones' retention (04a7442 also kept the Reserved one's term
    // end, a second entry this layout does not keep).
    assert_eq!(t.deadline_count(), 6);
    let c4 = t.contract(&id("gw-fixture.c4")).unwrap().unwrap();
    assert!(t
        .due(u64::MAX - 1, 10)
        .unwrap()
        .contains(&(c4.expires_at, c4.id.clone())));
    // A retried transaction still gets its first answer, byte for byte.
    let retry = ReserveRequest {
        transaction: c4.transaction.clone(),
        flavour: c4.flavour.id.clone(),
        buyer: c4.buyer.clone(),
        partition: Some(c4.resources),
    };
    let again = t
        .reserve(&me, &retry, 1_767_225_700_000, MIN)
        .await
        .unwrap();
    assert_eq!(again, Reservation::Repeat(c4));
    assert_state_matches_tree(&t);
    // Moved once: a second open finds the new layout and no old tree.
    drop(t);
    let t = reopen(&data, week);
    assert_eq!(t.contracts().unwrap().len(), 6);
    assert_eq!(t.meta.get(b"layout").unwrap().as_deref(), Some(&[2u8][..]));
    // 04a7442 looked for its identity under `node`: with the marker file beside it, a
    // downgraded binary finds it gone and refuses the directory as damaged instead of
    // re-offering what was sold.
    assert!(t.meta.get(b"node").unwrap().is_none());
    assert!(t.meta.get(b"owner").unwrap().is_some());
    assert!(data.join("fluidlet.node").exists());
}

/// `fluidlet check` on a database of an older release reports it and leaves it as it was:
/// migrating it there would make a rollback to that release impossible.
#[tokio::test]
async fn preflight_leaves_a_database_of_an_older_release_unmigrated() {
    let dir = fixture_04a7442();
    let data = dir.path().join("db");
    let me = id("gw-fixture");
    assert_eq!(
        Tables::preflight(&data, &me, &[]).unwrap(),
        Preflight::OldLayout
    );
    let db = open_db(&data).unwrap();
    assert!(legacy::pending(&db).unwrap(), "still the old layout");
    drop(db);
    // The start migrates it; a check after that checks it.
    let t = Tables::open_for(&data, &me, Duration::from_secs(60))
        .await
        .unwrap();
    drop(t);
    assert!(matches!(
        Tables::preflight(&data, &me, &[]).unwrap(),
        Preflight::Ready { .. }
    ));
}
