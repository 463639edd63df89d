//! Sealed peering credentials on the domain broker as shipped (mosquitto, mutual TLS, the
//! domain ACL): PEER_ACCEPT's kubeconfig crosses the broker only as ciphertext sealed to the
//! buyer's certificate key, and a seller seals only to a certificate of the sender's from the
//! domain CA.

use fluidlet::model::{Id, IntentState, Resources};
use fluidlet::wire::{Body, Bytes, ErrorCode, Message, PeerRequest};
use fluidlet_tests::{eventually, files_under, flavours, provider_config, start, Rogue};
use fluidlet_tests::{TlsDomain, WAIT};

const DRY_IDENTITY: &str = "kubeconfig of Liqo's peering user";

fn der(files: &fluidlet::config::TlsFiles) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_file(&files.cert)
        .unwrap()
        .to_vec()
}

fn peer_request(contract: &Id, certificate: Option<Vec<u8>>) -> Body {
    Body::PeerRequest(PeerRequest {
        contract: contract.clone(),
        cluster_id: Id::new("bob-cluster").unwrap(),
        liqo_version: None,
        certificate: certificate.map(|c| Bytes::new(&c).unwrap()),
    })
}

async fn answer(rogue: &mut Rogue) -> (Vec<u8>, Message) {
    let (_, payload) = rogue.recv_within(WAIT).await.expect("an answer");
    let m = Message::decode(&payload).unwrap();
    (payload, m)
}

fn refusal(m: &Message) -> (ErrorCode, String) {
    match &m.body {
        Body::Error(e) => (e.code().unwrap(), e.text.to_string()),
        other => panic!("expected ERROR, got {other:?}"),
    }
}

#[tokio::test]
async fn the_peering_identity_crosses_the_broker_sealed_to_the_buyers_certificate() {
    let Some(d) = TlsDomain::start() else { return };
    let Some(other) = TlsDomain::start() else {
        return;
    };
    let ad = tempfile::tempdir().unwrap();
    let mut acfg = provider_config("alice", &d.domain, d.port, ad.path());
    acfg.tls = Some(d.enrol("alice"));
    let alice = start(acfg, None).await;
    let bob_files = d.enrol("bob");
    let mut bob = Rogue::connect_tls(d.port, &d.domain, "bob", &bob_files).await;

    let flavour = flavours(&alice)[0].id.clone();
    bob.send(
        "alice",
        Body::ReserveFlavour(fluidlet::model::ReserveRequest {
            transaction: Id::new("bob.t1").unwrap(),
            flavour,
            buyer: Id::new("bob").unwrap(),
            partition: Some(Resources {
                cpu: 500,
                memory: 1 << 30,
                pods: 1,
                storage: 0,
            }),
        }),
    )
    .await;
    let Body::Reserved(contract) = answer(&mut bob).await.1.body else {
        panic!("no contract")
    };

    // Without a certificate, with carol's, with one from another domain's CA: refused.
    bob.send("alice", peer_request(&contract.id, None)).await;
    let (code, text) = refusal(&answer(&mut bob).await.1);
    assert_eq!(code, ErrorCode::BadCertificate, "{text}");
    assert!(text.contains("certificate"), "{text}");
    bob.send(
        "alice",
        peer_request(&contract.id, Some(der(&d.enrol("carol")))),
    )
    .await;
    let (code, text) = refusal(&answer(&mut bob).await.1);
    assert_eq!(code, ErrorCode::BadCertificate, "{text}");
    assert!(text.contains("\"carol\""), "{text}");
    bob.send(
        "alice",
        peer_request(&contract.id, Some(der(&other.enrol("bob")))),
    )
    .await;
    let (code, text) = refusal(&answer(&mut bob).await.1);
    assert_eq!(code, ErrorCode::BadCertificate, "{text}");
    assert!(text.contains("domain CA"), "{text}");

    // With its own certificate: granted, and what crosses the broker is ciphertext.
    bob.send("alice", peer_request(&contract.id, Some(der(&bob_files))))
        .await;
    let (payload, m) = answer(&mut bob).await;
    let Body::PeerAccept(grant) = m.body else {
        panic!("not granted: {:?}", m.body)
    };
    assert!(
        grant.identity.is_none(),
        "identity in clear on a TLS domain"
    );
    let sealed = grant.sealed.expect("a sealed identity");
    let loaded = fluidlet::tls::load(&bob_files, &Id::new("bob").unwrap()).unwrap();
    let keys = fluidlet::seal::Keys::new(&loaded.certificate, &loaded.key, loaded.roots).unwrap();
    let alice_id = Id::new("alice").unwrap();
    let bob_id = Id::new("bob").unwrap();
    let ctx = fluidlet::seal::Context {
        contract: &contract.id,
        provider: &alice_id,
        buyer: &bob_id,
    };
    let opened = keys
        .open(&ctx, sealed.as_slice())
        .expect("opens with bob's key");
    assert!(opened.contains(DRY_IDENTITY), "{opened}");
    assert!(
        !payload
            .windows(DRY_IDENTITY.len())
            .any(|w| w == DRY_IDENTITY.as_bytes()),
        "the kubeconfig is readable on the wire"
    );
    // Nor does the seller keep it in clear for repeated requests.
    let kept = alice.tables().peer_grant(&contract.id).unwrap().unwrap();
    assert!(kept.identity.is_none() && kept.sealed.is_some());
    alice.shutdown().await;
}

#[tokio::test]
async fn an_intent_over_tls_peers_with_the_unsealed_identity() {
    let Some(d) = TlsDomain::start() else { return };
    let (ad, bd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut acfg = provider_config("alice", &d.domain, d.port, ad.path());
    acfg.tls = Some(d.enrol("alice"));
    let alice = start(acfg, None).await;
    let bob = start(d.config("bob", d.enrol("bob"), bd.path()), None).await;
    let intent = bob
        .submit_intent(fluidlet_tests::intent_spec("web", 1000, 1))
        .await
        .unwrap();
    eventually("the intent to end", || {
        bob.tables()
            .intent(&intent.id)
            .unwrap()
            .is_some_and(|i| i.state.is_final())
    })
    .await;
    let ended = bob.tables().intent(&intent.id).unwrap().unwrap();
    assert_eq!(ended.state, IntentState::Placed, "{:?}", ended.error);
    let identity = files_under(bd.path())
        .into_iter()
        .find(|(p, _)| p.to_string_lossy().ends_with(".kubeconfig"))
        .expect("the identity file");
    assert!(identity.1.contains(DRY_IDENTITY), "{}", identity.1);
    bob.shutdown().await;
    alice.shutdown().await;
}
