//! Property tests: every message the encoder produces decodes to the same message, for
//! generated values of every body kind (ids, texts with multi-byte characters, optional
//! fields present and absent, numbers across their whole range, lists up to their bounds).
//! The fuzz targets (fuzz/) check the other direction: whatever decodes re-encodes the same.

use fluidlet::model::*;
use fluidlet::wire::*;
use proptest::collection::vec;
use proptest::option::of;
use proptest::prelude::*;

fn id() -> impl Strategy<Value = Id> {
    "[A-Za-z0-9._-]{1,48}".prop_filter_map("valid id", |s| Id::new(&s).ok())
}

/// Text of at most N bytes, with some two-byte characters.
fn text<const N: usize>() -> impl Strategy<Value = Text<N>> {
    let chars = N.min(40) / 2;
    proptest::string::string_regex(&format!("[ -~éß]{{1,{chars}}}"))
        .expect("a valid pattern")
        .prop_filter_map("fits", |s| Text::<N>::new(&s).ok())
}

fn resources() -> impl Strategy<Value = Resources> {
    (any::<u64>(), any::<u64>(), any::<u32>(), any::<u64>()).prop_map(
        |(cpu, memory, pods, storage)| Resources {
            cpu,
            memory,
            pods,
            storage,
        },
    )
}

fn flavour() -> impl Strategy<Value = Flavour> {
    let gpu = (text::<32>(), any::<u32>(), any::<u64>()).prop_map(|(model, cores, m)| Gpu {
        model,
        cores,
        memory_bytes: m,
    });
    let part = (any::<[u64; 4]>(), any::<[u32; 2]>()).prop_map(|(a, b)| Partitionability {
        cpu_min: a[0],
        memory_min: a[1],
        pods_min: b[0],
        cpu_step: a[2],
        memory_step: a[3],
        pods_step: b[1],
    });
    let price =
        (any::<u64>(), text::<8>(), text::<16>()).prop_map(|(amount, currency, period)| Price {
            amount,
            currency,
            period,
        });
    let location = (of(text::<32>()), of(text::<32>()), of(text::<64>())).prop_map(
        |(country, city, notes)| Location {
            country,
            city,
            notes,
        },
    );
    (
        (id(), id(), text::<16>(), resources()),
        (of(gpu), of(part), price, any::<bool>(), of(location)),
    )
        .prop_map(
            |((id, provider, architecture, resources), (gpu, p, price, available, location))| {
                Flavour {
                    id,
                    provider,
                    architecture,
                    resources,
                    gpu,
                    partitionability: p,
                    price,
                    available,
                    location,
                }
            },
        )
}

fn selector() -> impl Strategy<Value = FlavourSelector> {
    let limits = (
        of(any::<u64>()),
        of(any::<u64>()),
        of(any::<u32>()),
        of(any::<u64>()),
    )
        .prop_map(|(cpu, memory, pods, storage)| Limits {
            cpu,
            memory,
            pods,
            storage,
        });
    (
        of(text::<16>()),
        of(resources()),
        of(limits),
        of(any::<u64>()),
        of(any::<bool>()),
        of(text::<32>()),
    )
        .prop_map(
            |(architecture, min, max, max_price, gpu, country)| FlavourSelector {
                architecture,
                min,
                max,
                max_price,
                gpu,
                country,
            },
        )
}

fn flavours() -> impl Strategy<Value = Flavours> {
    vec(flavour(), 0..=MAX_FLAVOURS).prop_map(|v| Flavours {
        flavours: FlavourList::from_slice_truncated(&v),
        ..Default::default()
    })
}

fn contract() -> impl Strategy<Value = Contract> {
    let state = prop_oneof![
        Just(ContractState::Reserved),
        Just(ContractState::Active),
        Just(ContractState::Released),
        Just(ContractState::Expired),
    ];
    (
        (id(), id(), flavour(), id(), id()),
        (
            resources(),
            any::<[u64; 3]>(),
            state,
            of(any::<u64>()),
            of(any::<u64>()),
        ),
    )
        .prop_map(
            |(
                (id, transaction, flavour, buyer, seller),
                (resources, n, state, term_ms, ends_at),
            )| Contract {
                id,
                transaction,
                flavour,
                buyer,
                seller,
                resources,
                price: n[0],
                created_at: n[1],
                expires_at: n[2],
                state,
                term_ms,
                ends_at,
            },
        )
}

fn body() -> impl Strategy<Value = Body> {
    let request =
        (id(), id(), id(), of(resources())).prop_map(|(transaction, flavour, buyer, p)| {
            ReserveRequest {
                transaction,
                flavour,
                buyer,
                partition: p,
            }
        });
    let error =
        (any::<u16>(), text::<MAX_ERROR_TEXT>()).prop_map(|(code, text)| ErrorBody { code, text });
    let identity = of("[ -~\n]{0,300}".prop_filter_map("fits", |s| LongText::new(&s).ok()));
    fn blob<const N: usize>(n: usize) -> impl Strategy<Value = Option<fluidlet::wire::Bytes<N>>> {
        of(proptest::collection::vec(any::<u8>(), 0..n)
            .prop_map(|b| fluidlet::wire::Bytes::new(&b).unwrap()))
    }
    let accept = (
        id(),
        id(),
        identity,
        of(text::<MAX_LIQO_VERSION>()),
        blob(200),
    )
        .prop_map(
            |(contract, cluster_id, identity, liqo_version, sealed)| PeerAccept {
                contract,
                cluster_id,
                identity,
                liqo_version,
                sealed,
            },
        );
    prop_oneof![
        selector().prop_map(|selector| Body::ListFlavours(ListFlavours { selector })),
        flavours().prop_map(Body::Flavours),
        request.prop_map(Body::ReserveFlavour),
        contract().prop_map(|c| Body::Reserved(Box::new(c))),
        error.prop_map(Body::Error),
        flavours().prop_map(Body::Advert),
        (id(), id(), of(text::<MAX_LIQO_VERSION>()), blob(600)).prop_map(
            |(contract, cluster_id, liqo_version, certificate)| Body::PeerRequest(PeerRequest {
                contract,
                cluster_id,
                liqo_version,
                certificate,
            })
        ),
        accept.prop_map(Body::PeerAccept),
        id().prop_map(|contract| Body::Release(ContractRef { contract })),
        id().prop_map(|contract| Body::Released(ContractRef { contract })),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    (any::<u64>(), of(any::<u64>()), any::<u64>(), id(), body()).prop_map(
        |(id, correlation, sent_at, sender, body)| Message {
            id,
            correlation,
            sent_at,
            sender,
            body,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn every_encoded_message_decodes_to_itself(msg in message()) {
        match msg.encode() {
            Ok(bytes) => {
                prop_assert!(bytes.len() <= MAX_PAYLOAD);
                prop_assert_eq!(Message::decode(&bytes), Ok(msg));
            }
            // The encoder refuses what the receiver would refuse; nothing else fails.
            Err(e) => prop_assert!(matches!(e, WireError::TooLarge { .. }), "{e}"),
        }
    }

    #[test]
    fn a_body_decodes_only_as_its_own_kind_or_fails_cleanly(msg in message(), other in 1u16..=10) {
        // The same body bytes under another kind: a clean error or a message of that kind.
        let payload = Message::envelope(other, msg.id, &msg.sender, &msg.body.to_bytes());
        if let Ok(m) = Message::decode(&payload) {
            prop_assert_eq!(m.body.kind() as u16, other);
        }
    }

    #[test]
    fn truncated_payloads_are_refused_without_panicking(msg in message(), cut in any::<prop::sample::Index>()) {
        if let Ok(bytes) = msg.encode() {
            let n = cut.index(bytes.len());
            prop_assert!(Message::decode(&bytes[..n]).is_err());
        }
    }
}
