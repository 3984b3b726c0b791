//! Records the commit the binary is built from, for `flotilla_build_info`:
//! `FLOTILLA_COMMIT` when set (a container build without `.git`), else
//! `git rev-parse`, else `unknown`.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok().filter(|o| o.status.success())?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string()).filter(|s| !s.is_empty())
}

fn main() {
    println!("cargo:rerun-if-env-changed=FLOTILLA_COMMIT");
    let commit = std::env::var("FLOTILLA_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=FLOTILLA_COMMIT={commit}");
    // build again when HEAD moves: the file HEAD names, and HEAD itself
    for path in [git(&["rev-parse", "--git-path", "HEAD"]), git(&["symbolic-ref", "-q", "HEAD"])]
        .into_iter()
        .flatten()
    {
        let file =
            if path.starts_with("refs/") { git(&["rev-parse", "--git-path", &path]) } else { Some(path) };
        if let Some(file) = file {
            println!("cargo:rerun-if-changed={file}");
        }
    }
}
