//! `meshid demo`, the README's main job: runs, narrates, cleans up (also on Ctrl-C).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::meshid;

fn workdir(line: &str) -> PathBuf {
    let start = line
        .rfind('(')
        .expect("the first line names the work directory")
        + 1;
    PathBuf::from(&line[start..line.len() - 1])
}

fn still_running(dir: &std::path::Path) -> bool {
    std::process::Command::new("pgrep")
        .args(["-f", dir.to_str().unwrap()])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[tokio::test]
async fn the_demo_shows_the_mesh_and_cleans_up() {
    let out = tokio::time::timeout(Duration::from_secs(60), meshid().arg("demo").output())
        .await
        .expect("the demo finishes")
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "spiffe://cluster.local/ns/shop/sa/frontend",
        "certificate expires",
        "-> 200; the orders app saw: peer=spiffe://cluster.local/ns/shop/sa/frontend scopes=orders:read",
        "-> 403 refused by orders' sidecar",
        r#"error="insufficient_scope""#,
        "orders' sidecar serves it after",
        "frontend calls again -> 200",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let dir = workdir(text.lines().next().unwrap());
    assert!(!dir.exists(), "{} is removed", dir.display());
    assert!(!still_running(&dir), "no process of the demo is left");
}

#[tokio::test]
async fn ctrl_c_stops_the_demo_and_cleans_up() {
    let mut child = meshid().arg("demo").stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next_line().await.unwrap().unwrap();
    let dir = workdir(&first);
    // Interrupt once the CA is being started.
    while let Some(line) = lines.next_line().await.unwrap() {
        if line.starts_with("1. The CA starts") {
            break;
        }
    }
    std::process::Command::new("kill")
        .args(["-INT", &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    let mut rest = String::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        rest.push_str(&line);
        rest.push('\n');
    }
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}: {rest}");
    // Either the interrupt landed mid-way, or the demo was already done: both clean up.
    assert!(
        rest.contains("Interrupted") || rest.contains("Done in"),
        "{rest}"
    );
    assert!(!dir.exists(), "{} is removed", dir.display());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!still_running(&dir), "no process of the demo is left");
}
