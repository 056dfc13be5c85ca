//! `meshid policy graph`: who may call whom with which scopes, as DOT (for Graphviz) or as an
//! SVG drawn here (no Graphviz needed): callers to the left of what they call, one column per
//! step of the call chain, each edge labelled with the scopes the caller may be granted (and its rate limit).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use meshid_proto::directory::Directory;

/// Caller -> callee edges with the scopes granted on each.
fn edges(dir: &Directory) -> Vec<(&str, &str, String)> {
    let mut out = Vec::new();
    for (callee, svc) in dir.services() {
        for (caller, scopes) in &svc.callers {
            let label = if svc.opaque_ports.is_empty() || !scopes.is_empty() {
                scopes
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            } else {
                "tcp".to_owned()
            };
            let label = match svc.rate_limits.get(caller) {
                Some(l) => format!("{label} ({})", l.rate()),
                None => label,
            };
            out.push((caller.as_str(), callee.as_str(), label));
        }
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The graph in Graphviz's DOT language.
pub fn dot(dir: &Directory) -> String {
    let mut out =
        String::from("digraph meshid {\n  rankdir=LR;\n  node [shape=box, style=rounded];\n");
    for (name, svc) in dir.services() {
        let _ = writeln!(
            out,
            "  \"{name}\" [label=\"{name}\\n{}\"];",
            svc.id.to_string().replace('"', "\\\"")
        );
    }
    for (caller, callee, label) in edges(dir) {
        let _ = writeln!(out, "  \"{caller}\" -> \"{callee}\" [label=\"{label}\"];");
    }
    out.push_str("}\n");
    out
}

/// Column of each service: 0 for those nobody calls, else one more than the deepest caller
/// (bounded, so a cycle in the policy cannot loop).
fn columns(dir: &Directory) -> BTreeMap<&str, usize> {
    let names: Vec<&str> = dir.services().keys().map(String::as_str).collect();
    let mut col: BTreeMap<&str, usize> = names.iter().map(|n| (*n, 0)).collect();
    let edges = edges(dir);
    for _ in 0..names.len() {
        let mut changed = false;
        for (caller, callee, _) in &edges {
            let want = col[caller] + 1;
            if caller != callee && col[callee] < want && want < names.len() {
                col.insert(callee, want);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    col
}

const BOX_W: i64 = 260;
const BOX_H: i64 = 54;
const GAP_X: i64 = 180;
const GAP_Y: i64 = 40;
const MARGIN: i64 = 30;

/// The graph as a standalone SVG document.
pub fn svg(dir: &Directory) -> String {
    let col = columns(dir);
    let mut rows: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
    for (name, c) in &col {
        rows.entry(*c).or_default().push(name);
    }
    let mut at: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for (c, names) in &rows {
        for (r, name) in names.iter().enumerate() {
            at.insert(
                name,
                (
                    MARGIN + *c as i64 * (BOX_W + GAP_X),
                    MARGIN + r as i64 * (BOX_H + GAP_Y),
                ),
            );
        }
    }
    let width = MARGIN * 2 + rows.len().max(1) as i64 * (BOX_W + GAP_X) - GAP_X;
    let height = MARGIN * 2
        + rows.values().map(Vec::len).max().unwrap_or(1) as i64 * (BOX_H + GAP_Y)
        - GAP_Y;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" font-family=\"sans-serif\">"
    );
    let _ = writeln!(
        out,
        "  <title>meshid policy: who may call whom ({})</title>",
        escape(dir.trust_domain.as_str())
    );
    out.push_str(
        "  <defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"8\" markerHeight=\"8\" orient=\"auto-start-reverse\"><path d=\"M 0 0 L 10 5 L 0 10 z\" fill=\"#555\"/></marker></defs>\n",
    );
    for (caller, callee, label) in edges(dir) {
        let ((cx, cy), (dx, dy)) = (at[caller], at[callee]);
        let (x1, y1) = (cx + BOX_W, cy + BOX_H / 2);
        let (x2, y2) = (dx, dy + BOX_H / 2);
        let path = if x2 > x1 {
            format!("M {x1} {y1} L {x2} {y2}")
        } else {
            // Back (or same-column) edge: around, below the boxes.
            let below = cy.max(dy) + BOX_H + GAP_Y / 2;
            format!(
                "M {} {} C {} {below} {} {below} {} {}",
                cx + BOX_W / 2,
                cy + BOX_H,
                cx + BOX_W / 2,
                dx + BOX_W / 2,
                dx + BOX_W / 2,
                dy + BOX_H
            )
        };
        let _ = writeln!(
            out,
            "  <g class=\"edge\"><title>{} may call {}</title><path d=\"{path}\" fill=\"none\" stroke=\"#555\" stroke-width=\"1.5\" marker-end=\"url(#arrow)\"/><text x=\"{}\" y=\"{}\" font-size=\"12\" text-anchor=\"middle\" fill=\"#333\">{}</text></g>",
            escape(caller),
            escape(callee),
            (x1 + x2) / 2,
            (y1 + y2) / 2 - 6,
            escape(&label)
        );
    }
    for (name, svc) in dir.services() {
        let (x, y) = at[name.as_str()];
        let _ = writeln!(
            out,
            "  <g class=\"service\"><rect x=\"{x}\" y=\"{y}\" width=\"{BOX_W}\" height=\"{BOX_H}\" rx=\"8\" fill=\"#eef4ff\" stroke=\"#3465a4\"/><text x=\"{}\" y=\"{}\" font-size=\"15\" font-weight=\"bold\" text-anchor=\"middle\">{}</text><text x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"middle\" fill=\"#555\">{}</text></g>",
            x + BOX_W / 2,
            y + 22,
            escape(name),
            x + BOX_W / 2,
            y + 40,
            escape(&svc.id.to_string())
        );
    }
    out.push_str("</svg>\n");
    out
}
