//! Records the git revision the agent is built from, for `fluidlet --version`, the first log
//! line, `status` and the advert (docs/operations.md, "Versions"). Without git, or outside a
//! checkout (a source tarball, a container without `.git`), the revision is simply left
//! out: the build never fails for it, and no build-time crate is needed.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

fn main() {
    let rev = git(&["rev-parse", "--short=7", "HEAD"]).unwrap_or_default();
    println!("cargo:rustc-env=FLUIDLET_GIT_REV={rev}");
    println!("cargo:rerun-if-changed=build.rs");
    // Rebuild when HEAD moves: HEAD itself (a checkout), the branch it points to (a commit)
    // and packed-refs (a gc). Paths from git, so worktrees work too.
    // Only files that exist: cargo reruns a build script whose watched file is missing on
    // every build (a branch whose ref is only in packed-refs).
    let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string()];
    watch.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for path in watch {
        if let Some(p) = git(&["rev-parse", "--git-path", &path]) {
            if std::path::Path::new(&p).exists() {
                println!("cargo:rerun-if-changed={p}");
            }
        }
    }
}
