//! `meshid policy check` on the real binary: the shop policy is clean; a policy the CA refuses
//! gets the CA's own message, with its line, and exit 1; a policy the CA accepts but a
//! reviewer should look at gets its warnings, with their lines, and exit 2.

use std::path::{Path, PathBuf};

use crate::support::meshid;

fn shop() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/base/policy.yaml")
}

async fn check(file: &Path, extra: &[&str]) -> (Option<i32>, String, String) {
    let out = meshid()
        .args(["policy", "check"])
        .arg(file)
        .args(extra)
        .output()
        .await
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_shop_policy_is_clean() {
    let (code, stdout, stderr) = check(&shop(), &["--trust-domain", "cluster.local"]).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.ends_with("policy.yaml: ok: 3 services, 4 routes, 3 caller grants\n"),
        "{stdout}"
    );
}

#[tokio::test]
async fn a_policy_the_ca_refuses_gets_the_cas_message_and_exit_1() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("policy.yaml");
    let text = std::fs::read_to_string(shop())
        .unwrap()
        .replace("frontend: [orders:read]", "frontnd: [orders:read]");
    std::fs::write(&file, &text).unwrap();
    let (code, stdout, stderr) = check(&file, &[]).await;
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    let message = "service orders: caller \"frontnd\" is not a service of this policy";
    assert!(
        stderr.contains(&format!("policy.yaml:13: error: {message}")),
        "{stderr}"
    );
    // The CA, given the same file, refuses to start with the same message and line.
    let mut ca = meshid()
        .args(["ca", "serve", "--data-dir"])
        .arg(tmp.path().join("ca"))
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .args(["--admin-addr", "127.0.0.1:0", "--policy"])
        .arg(&file)
        .output()
        .await
        .unwrap();
    assert!(!ca.status.success());
    let ca_err = String::from_utf8_lossy(&std::mem::take(&mut ca.stderr)).into_owned();
    assert!(ca_err.contains(&format!("line 13: {message}")), "{ca_err}");
    // Not a file at all, and another trust domain than asked for.
    let (code, _, stderr) = check(&tmp.path().join("missing.yaml"), &[]).await;
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("missing.yaml: error: reading it"),
        "{stderr}"
    );
    let (code, _, stderr) = check(&shop(), &["--trust-domain", "example.org"]).await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("not this CA's"), "{stderr}");
}

#[tokio::test]
async fn a_policy_with_unusable_parts_gets_warnings_with_lines_and_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("policy.yaml");
    let text = std::fs::read_to_string(shop())
        .unwrap()
        // billing may no longer be granted orders:write: the scope and the POST route are dead.
        .replace(
            "billing:  [orders:read, orders:write]",
            "billing:  [orders:read]",
        )
        // and a rule after GET /orders that it always matches first.
        .replace(
            "      - { path: /healthz }",
            "      - { path: /healthz }\n      - { method: GET, path: /orders/export, scope: orders:read }",
        );
    std::fs::write(&file, &text).unwrap();
    let (code, stdout, stderr) = check(&file, &[]).await;
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[..3],
        [
            format!(
                "{}:7: warning: scope orders:write of orders is granted to no caller: nobody can use it",
                file.display()
            ),
            format!(
                "{}:10: warning: route POST /orders of orders needs orders:write, which no caller is granted: no call can reach it",
                file.display()
            ),
            format!(
                "{}:12: warning: route GET /orders/export of orders is never used: route GET /orders (line 9) matches every request it would, first",
                file.display()
            ),
        ],
        "{stdout}"
    );
    assert!(lines[3].contains("accepted with 3 warning(s)"), "{stdout}");
}

async fn diff(old: &Path, new: &Path) -> std::process::Output {
    meshid()
        .args(["policy", "diff"])
        .arg(old)
        .arg(new)
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn policy_diff_names_what_a_change_grants_and_revokes() {
    let tmp = tempfile::tempdir().unwrap();
    let new = tmp.path().join("new.yaml");
    let mut text = std::fs::read_to_string(shop())
        .unwrap()
        .replace(
            "billing:  [orders:read, orders:write]",
            "billing:  [orders:read]",
        )
        .replace(
            "frontend: [orders:read]",
            "frontend: [orders:read]\n      reports:  [orders:read]",
        );
    text.push_str("  reports:\n    id: spiffe://cluster.local/ns/shop/sa/reports\n");
    std::fs::write(&new, &text).unwrap();
    let out = diff(&shop(), &new).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert_eq!(
        stdout,
        "orders:\n  - billing may no longer be granted orders:write\n  + reports may call orders, granted orders:read\n\
         reports:\n  + new service, id spiffe://cluster.local/ns/shop/sa/reports\n\
         2 granted, 1 revoked, 0 changed\n"
    );
    // The same file: no change, exit 0; a broken file: its error with its line, exit 1.
    let out = diff(&shop(), &shop()).await;
    assert_eq!(out.status.code(), Some(0));
    std::fs::write(
        &new,
        text.replace("id: spiffe://cluster.local/ns/shop/sa/reports", "id: nope"),
    )
    .unwrap();
    let out = diff(&shop(), &new).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("new.yaml:") && stderr.contains("error: service reports: id"),
        "{stderr}"
    );
}

/// The status `meshid policy explain` predicts (from its `decision:` line) and its exit code.
async fn explained(file: &Path, caller: &str, method: &str, path: &str) -> (u16, Option<i32>) {
    let out = meshid()
        .args(["policy", "explain"])
        .arg(file)
        .args([
            "--caller", caller, "--callee", "orders", "--method", method, path,
        ])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let decision = stdout
        .lines()
        .find_map(|l| l.strip_prefix("decision: "))
        .unwrap_or_else(|| panic!("no decision: {stdout}"));
    let status = decision
        .split_once('(')
        .and_then(|(_, rest)| rest.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {decision:?}"));
    (status, out.status.code())
}

#[tokio::test]
async fn explain_agrees_with_the_real_sidecar_on_every_call_of_a_table() {
    let shop = crate::mesh::shop(&[]).await;
    let file = shop.ca.work.join("policy.yaml");
    std::fs::write(&file, crate::mesh::POLICY).unwrap();
    let table = [
        ("frontend", "GET", "/orders"),
        ("frontend", "GET", "/orders/7"),
        ("frontend", "POST", "/orders"),
        ("frontend", "DELETE", "/orders"),
        ("frontend", "GET", "/healthz"),
        ("frontend", "GET", "/admin"),
        ("frontend", "GET", "/orders/../healthz"),
        ("frontend", "GET", "/healthz/..%2f..%2forders"),
        ("reports", "GET", "/orders"),
        ("reports", "GET", "/healthz"),
    ];
    for (caller, method, path) in table {
        let sidecar = if caller == "frontend" {
            &shop.frontend
        } else {
            &shop.reports
        };
        let (predicted, code) = explained(&file, caller, method, path).await;
        let proxy = sidecar.outbound;
        let url = format!("http://orders{path}");
        let method_owned = method.to_owned();
        let real = tokio::task::spawn_blocking(move || {
            crate::mesh::via_proxy(proxy, &method_owned, &url, &[])
        })
        .await
        .unwrap();
        assert_eq!(
            predicted, real.status,
            "{caller} {method} {path}: explain says {predicted}, the sidecar answered {real:?}"
        );
        assert_eq!(code, Some(if predicted == 200 { 0 } else { 2 }));
    }
}

#[tokio::test]
async fn policy_graph_draws_an_svg_that_parses_and_names_every_service_and_grant() {
    let out = meshid()
        .args(["policy", "graph"])
        .arg(shop())
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let tmp = tempfile::tempdir().unwrap();
    let svg = tmp.path().join("shop.svg");
    std::fs::write(&svg, &out.stdout).unwrap();
    // An XML parser that is not ours reads it as SVG.
    const READ: &str = "\
import json, sys, xml.etree.ElementTree as E
root = E.parse(sys.argv[1]).getroot()
ns = '{http://www.w3.org/2000/svg}'
print(json.dumps({
  'tag': root.tag,
  'width': root.get('width'),
  'texts': [t.text for t in root.iter(ns + 'text')],
  'titles': [t.text for t in root.iter(ns + 'title')],
}))
";
    let parsed = std::process::Command::new(crate::support::python())
        .args(["-c", READ])
        .arg(&svg)
        .output()
        .unwrap();
    assert!(
        parsed.status.success(),
        "{}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&parsed.stdout).unwrap();
    assert_eq!(v["tag"], "{http://www.w3.org/2000/svg}svg");
    assert!(v["width"].as_str().unwrap().parse::<u32>().unwrap() > 0);
    let texts: Vec<&str> = v["texts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    for name in [
        "orders",
        "billing",
        "frontend",
        "spiffe://cluster.local/ns/shop/sa/orders",
    ] {
        assert!(texts.contains(&name), "{name} not drawn: {texts:?}");
    }
    assert!(texts.contains(&"orders:read orders:write"), "{texts:?}");
    let titles: Vec<&str> = v["titles"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    for edge in [
        "frontend may call orders",
        "billing may call orders",
        "orders may call billing",
    ] {
        assert!(titles.contains(&edge), "{edge}: {titles:?}");
    }
    // DOT for those who have Graphviz.
    let out = meshid()
        .args(["policy", "graph", "--format", "dot"])
        .arg(shop())
        .output()
        .await
        .unwrap();
    let dot = String::from_utf8_lossy(&out.stdout);
    assert!(dot.starts_with("digraph meshid {"), "{dot}");
    assert!(
        dot.contains("\"frontend\" -> \"orders\" [label=\"orders:read\"];"),
        "{dot}"
    );
}

#[tokio::test]
async fn shell_completions_complete_meshid_commands_in_a_real_bash() {
    let exe = env!("CARGO_BIN_EXE_meshid");
    let script = format!(
        "source <('{exe}' completions bash)
COMP_WORDS=(meshid ca rot); COMP_CWORD=2; _meshid meshid rot ca; echo \"${{COMPREPLY[@]}}\"
COMP_WORDS=(meshid policy ''); COMP_CWORD=2; _meshid meshid '' policy; echo \"${{COMPREPLY[@]}}\""
    );
    let out = std::process::Command::new("bash")
        .args(["-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.first(),
        Some(&"rotate"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for sub in ["check", "diff", "explain", "graph"] {
        assert!(lines[1].split(' ').any(|w| w == sub), "{stdout}");
    }
    for shell in ["zsh", "fish"] {
        let out = meshid()
            .args(["completions", shell])
            .output()
            .await
            .unwrap();
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains("rotate"));
    }
    let out = meshid()
        .args(["completions", "tcsh"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("possible values"));
}
