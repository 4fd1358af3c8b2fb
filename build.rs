//! Build script: stamps the binary with the commit it was built from, for `batchd --version`.
//!
//! The commit comes from `BATCHD_COMMIT` when set (a packager, or a container build without
//! `.git`), else from `git rev-parse` in the source tree, else it is `unknown` (a tarball):
//! the build never fails for want of git.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=BATCHD_COMMIT");
    let commit = std::env::var("BATCHD_COMMIT").ok().filter(|c| !c.trim().is_empty()).or_else(git_commit).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=BATCHD_COMMIT={}", commit.trim());
    // Run again when HEAD moves (a commit, a checkout): watch HEAD and the branch it names,
    // wherever git keeps them (a worktree's .git is a file pointing elsewhere).
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    for name in ["HEAD", "packed-refs"].into_iter().map(String::from).chain(branch) {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]).filter(|p| std::path::Path::new(p).exists()) {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}

/// The short commit of the source tree.
fn git_commit() -> Option<String> {
    git(&["rev-parse", "--short=12", "HEAD"])
}

/// What `git ARGS` prints, trimmed; `None` without git, outside a repository, or on failure.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok().filter(|o| o.status.success())?;
    String::from_utf8(out.stdout).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}
