"""Bar chart (SVG, no dependencies) of shared/bench RESULT lines: requests/s and p99 per target.

usage: chart.py RESULTS_FILE > chart.svg
"""
import re
import sys

rows = []
for line in open(sys.argv[1]):
    if line.startswith("RESULT "):
        kv = dict(re.findall(r"(\w+)=(\S+)", line))
        # "direct" (no proxies) is an order of magnitude apart; it stays in the text results.
        if kv["target"] != "direct":
            rows.append((kv["target"], kv["mode"], float(kv["rps"]), float(kv["p99_ms"])))

modes = sorted({m for _, m, _, _ in rows}, key=lambda m: (m != "keepalive", m))
targets = [t for t in dict.fromkeys(t for t, _, _, _ in rows)]
colors = {"meshid": "#2b8a3e", "nginx-pair": "#1864ab", "haproxy-pair": "#e67700", "direct": "#868e96"}
W, bar, gap, top = 760, 26, 8, 40
panel_h = len(targets) * (bar + gap) + 40
H = top + 2 * len(modes) * panel_h + 20
out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="13">',
       '<rect width="100%" height="100%" fill="white"/>',
       f'<text x="10" y="24" font-size="16" font-weight="bold">meshid sidecar pair vs nginx and HAProxy mTLS pairs (one run, same machine)</text>']
y = top
for metric, idx, unit, better in [("requests/s", 2, "", "higher is better"), ("p99 latency", 3, " ms", "lower is better")]:
    for mode in modes:
        vals = {t: r[idx] for r in rows for t in [r[0]] if r[1] == mode}
        peak = max(vals.values()) if vals else 1
        out.append(f'<text x="10" y="{y + 16}" font-weight="bold">{metric}, {mode} ({better})</text>')
        yy = y + 26
        for t in targets:
            if t not in vals:
                continue
            w = int((W - 260) * vals[t] / peak)
            out.append(f'<text x="10" y="{yy + 18}">{t}</text>')
            out.append(f'<rect x="120" y="{yy}" width="{w}" height="{bar}" fill="{colors.get(t, "#5f3dc4")}"/>')
            out.append(f'<text x="{126 + w}" y="{yy + 18}">{vals[t]:,.1f}{unit}</text>')
            yy += bar + gap
        y += panel_h
out.append("</svg>")
print("\n".join(out))
