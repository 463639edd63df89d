//! The node's files are private by construction: started with umask 022 (an agent run by
//! hand), a provider and a consumer that trade and peer leave `data_dir` 0700 and every file
//! in it 0600. In its own test binary: it sets the process umask.

use fluidlet::model::IntentState;
use fluidlet_tests::*;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

/// Every entry under `dir` with its mode, the directory itself first.
fn modes(dir: &Path) -> Vec<(std::path::PathBuf, std::fs::FileType, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let m = std::fs::symlink_metadata(&d).unwrap();
        out.push((d.clone(), m.file_type(), m.permissions().mode() & 0o7777));
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = e.path().symlink_metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                out.push((e.path(), m.file_type(), m.permissions().mode() & 0o7777));
            }
        }
    }
    out
}

fn assert_private(dir: &Path) {
    let all = modes(dir);
    assert_eq!(
        all[0].2,
        0o700,
        "data_dir {} is {:04o}",
        dir.display(),
        all[0].2
    );
    let mut files = 0;
    for (path, kind, mode) in &all {
        if kind.is_dir() {
            assert_eq!(*mode, 0o700, "{} is {mode:04o}", path.display());
        } else if kind.is_file() || kind.is_socket() {
            files += 1;
            assert_eq!(*mode, 0o600, "{} is {mode:04o}", path.display());
        }
    }
    assert!(files >= 4, "the test looked at the node's files: {all:?}");
}

#[tokio::test]
async fn data_dir_and_every_file_in_it_are_owner_only_whatever_the_umask() {
    let b = broker(BrokerKind::Embedded).expect("embedded broker");
    let t = tempfile::tempdir().unwrap();
    let d = fresh_domain();
    let pcfg = provider_config("prov", &d, b.port, t.path());
    let ccfg = config("cons", &d, b.port, t.path());
    let (pd, cd) = (pcfg.data_dir.clone(), ccfg.data_dir.clone());
    assert!(
        !pd.exists() && !cd.exists(),
        "the agents create their data_dir"
    );
    // SAFETY: umask(2) only swaps the process's file mode creation mask.
    unsafe { libc::umask(0o022) };
    let provider = start(pcfg, None).await;
    unsafe { libc::umask(0o022) };
    let consumer = start(ccfg, None).await;
    // An intent placed end to end: a reservation, a peering and its kubeconfig on file.
    let intent = consumer
        .submit_intent(intent_spec("web", 1000, 1))
        .await
        .expect("intent accepted");
    eventually("the intent to be placed", || {
        consumer
            .tables()
            .intent(&intent.id)
            .ok()
            .flatten()
            .is_some_and(|i| i.state == IntentState::Placed)
    })
    .await;
    assert_private(&pd);
    assert_private(&cd);
    assert!(
        modes(&cd)
            .iter()
            .any(|(p, _, _)| p.starts_with(cd.join("fabric"))),
        "the consumer's fabric files were checked"
    );
    consumer.shutdown().await;
    provider.shutdown().await;
    assert_private(&pd);
    assert_private(&cd);
}
