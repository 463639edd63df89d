//! The node's files are private by construction: `data_dir` is created 0700, everything in it
//! (sled's files, the marker, the control socket, the fabric's kubeconfigs) is created under
//! umask 077, and secret files are created with mode 0600 before a byte is written.
//!
//! The provider keeps every PEER_ACCEPT (a kubeconfig for a Liqo peering user) in its tables,
//! and the consumer writes the kubeconfigs it receives under `data_dir/fabric`: whoever can read
//! them can peer with the provider's cluster. An agent run by hand (umask 022) used to leave
//! `data_dir` 0755 and the sled files 0644.
//!
//! A `data_dir` that already exists keeps its modes (it may be shared on purpose); anything
//! wider than owner-only is reported by [`mode_warnings`], at start and by `fluidlet check`.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Most entries [`mode_warnings`] looks at (a data_dir holds a few dozen).
const MAX_SCANNED: usize = 10_000;

/// Sets the process umask to 077 so that every file and directory created from now on (by
/// this agent and by the libraries it uses, sled included) is owner-only, whatever umask the
/// agent was started with. It is process-wide: a program embedding [`crate::Agent`] gets it
/// too.
/// An I/O error in words, without Rust's Debug text (`Os { code: 13, kind: ... }`).
pub fn io_words(e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::PermissionDenied => "permission denied (the agent's user may not write there)".into(),
        K::NotFound => "it does not exist".into(),
        K::ReadOnlyFilesystem => "the file system is read-only".into(),
        K::StorageFull => "the disk is full".into(),
        K::WouldBlock => "it is locked by another process".into(),
        _ => e.to_string(),
    }
}

pub fn private_umask() {
    // SAFETY: umask(2) only swaps the process's file mode creation mask; it cannot fail and
    // touches no memory.
    unsafe {
        libc::umask(0o077);
    }
}

/// Creates `dir` (and missing parents) with mode 0700 if it does not exist, after setting
/// the umask with [`private_umask`]. An existing directory is left as it is.
pub fn prepare_data_dir(dir: &Path) -> std::io::Result<()> {
    private_umask();
    if dir.exists() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    // The umask can only clear bits; this makes the mode exactly 0700 whatever it was.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Writes a secret file: created with mode 0600 (or truncated, its mode set to 0600 through
/// the open handle first if it already existed wider), then written. Never written first and
/// protected afterwards.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(contents)?;
    f.sync_all()
}

/// What is wider than owner-only in `dir` (the directory itself, and everything under it):
/// one line each for the directory and for the files, naming an example and the fix.
/// Nothing when `dir` does not exist yet.
pub fn mode_warnings(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return out;
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        out.push(format!(
            "data_dir {} has mode {mode:04o}: other users of this device can reach the node's \
             tables, which hold peering credentials; run chmod 700 {}",
            dir.display(),
            dir.display()
        ));
    }
    let (mut wide, mut example, mut scanned) = (0usize, None, 0usize);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            scanned += 1;
            if scanned > MAX_SCANNED {
                break;
            }
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            let mode = m.permissions().mode() & 0o7777;
            if m.is_dir() {
                stack.push(e.path());
            }
            if !m.file_type().is_symlink() && mode & 0o077 != 0 {
                wide += 1;
                example.get_or_insert((e.path(), mode));
            }
        }
    }
    if let Some((path, mode)) = example {
        out.push(format!(
            "{wide} file(s) under data_dir {} can be read or listed by other users (e.g. {} \
             has mode {mode:04o}); run chmod -R go= {}",
            dir.display(),
            path.display(),
            dir.display()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_new_data_dir_is_0700_and_an_existing_wide_one_is_reported() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("a/b");
        prepare_data_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert!(mode_warnings(&dir).is_empty());
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let f = dir.join("db");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        prepare_data_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o755, "an existing directory is left alone");
        let w = mode_warnings(&dir);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("0755") && w[0].contains("chmod 700"), "{w:?}");
        assert!(w[1].contains("1 file(s)") && w[1].contains("0644"), "{w:?}");
    }

    #[test]
    fn secret_files_are_0600_even_when_they_existed_wider() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("kubeconfig");
        write_private(&p, b"secret").unwrap();
        assert_eq!(mode(&p), 0o600);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&p, b"new").unwrap();
        assert_eq!(mode(&p), 0o600);
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
    }
}
