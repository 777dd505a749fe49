#!/usr/bin/env python3
"""Turns docs/bench/results.json into results.md (the comparison table with devgate/peer
ratios and the targets) and three plots: latency.png (downlink latency percentiles at the fixed
rate, devgate vs Mosquitto vs NATS alone), sweep.png (32 B downlink p50/p99 against the offered
rate, up to the first rate each system could not sustain) and rss.png (server RSS vs connected
sessions).

Usage: bench-plot.py RESULTS_JSON OUT_DIR
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def by_payload(rows, payload):
    return next((r for r in rows if r["payload"] == payload), None)


def by_conns(rows, conns):
    return next((r for r in rows if r["conns"] == conns), None)


def fmt(v, unit=""):
    if v is None:
        return "–"
    if isinstance(v, float) and v != int(v) and abs(v) < 100:
        return f"{v:.2f}{unit}"
    return f"{v:,.0f}{unit}"


def ratio(a, b):
    if a is None or b in (None, 0):
        return "–"
    return f"{a / b:.2f}×"


def rows_for(dg, mq):
    """(section, label, devgate value, peer value, unit, better) for the table."""
    out = []
    get = lambda s, f: f(s) if s else None  # noqa: E731
    out.append(("Idle", "gateway RSS per session (slope)", dg["bytes_per_session"],
                get(mq, lambda s: s["bytes_per_session"]), " B", "lower"))
    for p in dg["idle"]:
        m = get(mq, lambda s: next((q for q in s["idle"] if q["sessions"] == p["sessions"]), None))
        out.append(("Idle", f"RSS at {p['sessions']:,} sessions", p["rss"] / 2**20,
                    m["rss"] / 2**20 if m else None, " MiB", "lower"))
    out.append(("Connect", f"storm 0 → {dg['storm']['ok']:,}: logins/s", dg["storm"]["per_s"],
                get(mq, lambda s: s["storm"]["per_s"]), "", "higher"))
    out.append(("Connect", "all reconnected after a crash-restart", dg["reconnect_s"],
                get(mq, lambda s: s["reconnect_s"]), " s", "lower"))
    for t in dg["downlink_max"]:
        m = get(mq, lambda s: by_payload(s["downlink_max"], t["payload"]))
        out.append(("Downlink", f"{t['payload']} B max delivered msgs/s", t["per_s"],
                    m["per_s"] if m else None, "", "higher"))
    for t in dg["downlink_latency"]:
        m = get(mq, lambda s: by_payload(s["downlink_latency"], t["payload"]))
        for q, name in (("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")):
            out.append(("Downlink", f"{t['payload']} B at {t['offered_rate']:,}/s: {name}",
                        t[q], m[q] if m else None, " µs", "lower"))
    for t in dg["fanin"]:
        m = get(mq, lambda s: by_conns(s["fanin"], t["conns"]))
        out.append(("Fan-in", f"{t['conns']} publisher connection(s), msgs/s", t["per_s"],
                    m["per_s"] if m else None, "", "higher"))
    out.append(("Uplink", "msgs/s reaching the service", dg["uplink"]["per_s"],
                get(mq, lambda s: s["uplink"]["per_s"]), "", "higher"))
    out.append(("Uplink", "acknowledged (seq / QoS 1), msgs/s", dg["uplink_acked"]["per_s"],
                get(mq, lambda s: s["uplink_acked"]["per_s"]), "", "higher"))
    for h in dg.get("http", []):
        out.append(("bridge-api", f"HTTP ack={h['ack']} ({h['conns']} conns), req/s", h["per_s"], None, "", "higher"))
        out.append(("bridge-api", f"HTTP ack={h['ack']}: p99", h["p99_us"], None, " µs", "lower"))
    return out


def targets(dg, mq):
    """The issue's bar: (target, measured, met)."""
    t = []
    slope = dg["bytes_per_session"]
    t.append(("≤ 4 KiB RSS per session", f"{slope:,.0f} B", slope <= 4096))
    if mq:
        t.append(("idle within 2× of Mosquitto", f"{slope / max(mq['bytes_per_session'], 1):.1f}×",
                  slope <= 2 * mq["bytes_per_session"]))
    t.append(("≥ 20k logins/s", f"{dg['storm']['per_s']:,.0f}/s", dg["storm"]["per_s"] >= 20_000))
    d32 = by_payload(dg["downlink_max"], 32)
    if d32:
        t.append(("≥ 200k msgs/s downlink (32 B)", f"{d32['per_s']:,.0f}/s", d32["per_s"] >= 200_000))
    l32 = by_payload(dg["downlink_latency"], 32)
    if l32:
        t.append((f"p99 < 2 ms at {l32['offered_rate']:,}/s", f"{l32['p99_us'] / 1000:.2f} ms",
                  l32["p99_us"] < 2000))
    t.append(("≥ 300k msgs/s uplink", f"{dg['uplink']['per_s']:,.0f}/s", dg["uplink"]["per_s"] >= 300_000))
    if mq:
        worse = []
        for section, label, a, b, _unit, better in rows_for(dg, mq):
            if section in ("Downlink", "Fan-in") and a is not None and b is not None:
                if (better == "higher" and a < b) or (better == "lower" and a > b):
                    worse.append(label)
        t.append(("downlink no worse than Mosquitto", "worse on: " + "; ".join(worse) if worse else "better on all",
                  not worse))
    return t


def write_table(res, out_dir):
    dg = next(s for s in res["systems"] if s["name"] == "devgate")
    mq = next((s for s in res["systems"] if s["name"] == "mosquitto"), None)
    m = res["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['memory'] / 2**30:.0f} GiB, Linux {m['kernel']}, "
        f"open files {m['nofile']}; {m['nats_server']}; {m['mosquitto']}. Suite wall time {res['total_s']:.0f} s.",
        "",
        "| | metric | devgate | Mosquitto | devgate / Mosquitto |",
        "|---|---|---:|---:|---:|",
    ]
    for section, label, a, b, unit, better in rows_for(dg, mq):
        lines.append(f"| {section} | {label} ({better} is better) | {fmt(a, unit)} | {fmt(b, unit)} | {ratio(a, b)} |")
    lines += ["", "NATS alone (publisher → subscriber over loopback, the floor the gateway hop adds to):", "",
              "| payload | max msgs/s | p50 | p99 | p99.9 (at the fixed rate) |", "|---:|---:|---:|---:|---:|"]
    for t in res["nats_floor"]["max"]:
        l = by_payload(res["nats_floor"]["latency"], t["payload"])
        lines.append(f"| {t['payload']} B | {fmt(t['per_s'])} | {fmt(l['p50_us'], ' µs')} | "
                     f"{fmt(l['p99_us'], ' µs')} | {fmt(l['p999_us'], ' µs')} |")
    spread = res["nats_floor"].get("spread", [])
    if spread:
        n = res["nats_floor"]["spread_subjects"]
        lines += ["", f"NATS alone in the downlink's shape: full speed to {n:,} subjects picked at random, one "
                      "subscription each on one subscriber connection (nats-server's subject cache cannot hold "
                      "them), against devgate delivering to as many devices:", "",
                  "| payload | publisher connections | NATS alone, msgs/s | devgate, msgs/s | devgate / NATS alone |",
                  "|---:|---:|---:|---:|---:|"]
        for t in spread:
            runs = dg["downlink_max"] if t["conns"] == 1 else dg["fanin"]
            d = next((x for x in runs if x["payload"] == t["payload"] and x["conns"] == t["conns"]), None)
            dv = d["per_s"] if d else None
            lines.append(f"| {t['payload']} B | {t['conns']} | {fmt(t['per_s'])} | {fmt(dv)} | {ratio(dv, t['per_s'])} |")
    sweeps = [(s["name"], s.get("latency_sweep", [])) for s in res["systems"]]
    if any(rows for _, rows in sweeps):
        lines += ["", "Latency sweep, 32 B downlink (each system up to the first rate it did not sustain, "
                      "i.e. delivered under 95 % of the offered rate):", "",
                  "| system | offered msgs/s | delivered msgs/s | p50 | p99 | p99.9 | server CPU per message |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, rows in sweeps:
            for t in rows:
                cpu = f"{1e6 * t['server_cpu'] / t['per_s']:.1f} µs" if t["per_s"] else "–"
                lines.append(f"| {name} | {fmt(t['offered_rate'])} | {fmt(t['per_s'])} | {fmt(t['p50_us'], ' µs')} | "
                             f"{fmt(t['p99_us'], ' µs')} | {fmt(t['p999_us'], ' µs')} | {cpu} |")
        lines.append("")
        for name, rows in sweeps:
            # The highest rate before the first one that misses: a later rate that happens to
            # pass after a miss does not count.
            under = []
            for t in rows:
                if t["p99_us"] >= 2000 or t["per_s"] < 0.95 * t["offered_rate"]:
                    break
                under.append(t["offered_rate"])
            lines.append(f"- {name}: p99 under 2 ms up to {max(under):,} msgs/s offered" if under
                         else f"- {name}: p99 under 2 ms at none of the swept rates")
    lines += ["", "Targets:", "", "| target | measured | met |", "|---|---:|:---:|"]
    for name, measured, met in targets(dg, mq):
        lines.append(f"| {name} | {measured} | {'yes' if met else '**no**'} |")
    so = res.get("scale_out")
    if so:
        lines += ["", f"devgate beyond one process: {so['gateways']} gateways behind one NATS, "
                      f"{so['sessions']:,} sessions, devices addressed by id only:", "",
                  "| metric | value |", "|---|---:|",
                  f"| storm 0 → {so['sessions']:,}, all gateways at once: logins/s | {fmt(so['storm']['per_s'])} |",
                  f"| RSS per session (all gateways) | {fmt(so['bytes_per_session'], ' B')} |"]
        l = so["downlink_latency"]
        lines.append(f"| 32 B at {l['offered_rate']:,}/s: p50 / p99 / p99.9 | {fmt(l['p50_us'], ' µs')} / "
                     f"{fmt(l['p99_us'], ' µs')} / {fmt(l['p999_us'], ' µs')} |")
        for t in so["downlink_max"]:
            cpu = f"{1e6 * t['server_cpu'] / t['per_s']:.1f} µs of gateway CPU each" if t["per_s"] else "–"
            lines.append(f"| 32 B max delivered, {t['conns']} publisher(s): msgs/s | {fmt(t['per_s'])} ({cpu}) |")
    if res.get("probes"):
        lines += ["", "Memory probes (each in a fresh process):", ""]
        for p in res["probes"]:
            k = p.get("kernel_bytes_each")
            extra = f", kernel TCP memory {k:,.0f} B each (not in RSS)" if k else ""
            lines.append(f"- {p['what']}: {p['bytes_each']:,.0f} B each over {p['n']:,}{extra}; "
                         f"size_of::<async_nats::Message>() = {p['message_size']} B")
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")


def plot_latency(res, out_dir):
    series = []
    for s in res["systems"]:
        series.append((s["name"], s["downlink_latency"]))
    series.append(("NATS alone", res["nats_floor"]["latency"]))
    payloads = sorted({t["payload"] for _, rows in series for t in rows})
    fig, axes = plt.subplots(1, len(payloads), figsize=(5.5 * len(payloads), 4.2), squeeze=False)
    for ax, payload in zip(axes[0], payloads):
        qs = [("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")]
        width = 0.8 / len(series)
        for i, (name, rows) in enumerate(series):
            t = by_payload(rows, payload)
            if not t:
                continue
            xs = [j + i * width for j in range(len(qs))]
            vals = [max(t[q] / 1000, 1e-3) for q, _ in qs]
            bars = ax.bar(xs, vals, width, label=name)
            for b, v in zip(bars, vals):
                ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
        rate = next((t["offered_rate"] for _, rows in series for t in rows if t["payload"] == payload), None)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(3)], [n for _, n in qs])
        ax.set_yscale("log")
        ax.set_ylabel("ms (log)")
        ax.set_title(f"Downlink latency, {payload} B at {rate:,} msgs/s")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "latency.png", dpi=110)


def plot_sweep(res, out_dir):
    series = [(s["name"], s.get("latency_sweep", [])) for s in res["systems"]]
    if not any(rows for _, rows in series):
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, rows in series:
        xs = [t["offered_rate"] for t in rows]
        for q, style in (("p50_us", "-o"), ("p99_us", "--s")):
            ax.plot(xs, [max(t[q] / 1000, 1e-3) for t in rows], style, label=f"{name} {q[:-3]}")
    ax.axhline(2, color="grey", linestyle=":", label="2 ms")
    ax.set_yscale("log")
    finish(fig, ax, "offered msgs/s (32 B, random devices)", "ms (log)",
           "Downlink latency vs offered rate", out_dir / "sweep.png")


def plot_rss(res, out_dir):
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for s in res["systems"]:
        xs = [p["sessions"] for p in s["idle"]]
        ys = [p["rss"] / 2**20 for p in s["idle"]]
        ax.plot(xs, ys, marker="o", label=f"{s['name']} ({s['bytes_per_session']:,.0f} B/session)")
    limit = [p["sessions"] for p in res["systems"][0]["idle"]]
    base = res["systems"][0]["idle"][0]["rss"] / 2**20
    ax.plot(limit, [base + n * 4096 / 2**20 for n in limit], "--", color="grey", label="target: 4 KiB/session")
    finish(fig, ax, "connected idle sessions", "server RSS (MiB)", "Server memory vs sessions",
           out_dir / "rss.png")


def finish(fig, ax, xlabel, ylabel, title, path):
    """Labels, legend and grid of a one-axis plot, saved as `path`."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    res = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(res, out_dir)
    plot_latency(res, out_dir)
    plot_sweep(res, out_dir)
    plot_rss(res, out_dir)


if __name__ == "__main__":
    main()
