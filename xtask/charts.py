"""Charts for BENCHMARKS.md from bg-bench's results.json (run by `cargo xtask bench`)."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

results_path, out_dir = sys.argv[1], sys.argv[2]
r = json.load(open(results_path))["results"]

# Requests/s by switcher, keep-alive and new connections.
net = r["network"]["summary"]
who = ["direct", "bg", "nftables", "haproxy"]
fig, ax = plt.subplots(figsize=(7, 3.6))
width = 0.38
for i, mode in enumerate(["keepalive", "new_connection"]):
    vals = [net[mode][w]["rps"] for w in who]
    bars = ax.bar([x + (i - 0.5) * width for x in range(len(who))], vals, width, label=mode.replace("_", " "))
    for b, w in zip(bars, who):
        ax.annotate(f'{net[mode][w]["ratio_to_direct"]:.2f}x', (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=7)
ax.set_xticks(range(len(who)), who)
ax.set_ylabel("requests/s (wrk, 32 connections)")
ax.set_title("Requests/s by switcher (ratio to direct routing)")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(f"{out_dir}/bench-rps.png", dpi=110)

# ns/packet against flow-table size (established path, single runs), with the floor measured
# the same way.
p = r["packet"]
sizes = [e["table_size"] for e in p["by_table_size"]]
fig, ax = plt.subplots(figsize=(7, 3.6))
ax.plot(sizes, [e["distinct_flows_ns"] for e in p["by_table_size"]], marker="o", label="established, distinct flows")
ax.plot(sizes, [e["one_flow_ns"] for e in p["by_table_size"]], marker="s", label="established, one flow")
ax.axhline(p["floor_single_ns"], color="grey", linestyle="--", label="floor (XDP_PASS, single runs)")
ax.set_xscale("log")
ax.set_ylim(bottom=0)
ax.set_xlabel("flow-table size (entries, filled)")
ax.set_ylabel("ns per packet (BPF_PROG_TEST_RUN)")
ax.set_title("Established-flow cost against flow-table size")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(f"{out_dir}/bench-flowtable.png", dpi=110)
print(f"charts written to {out_dir}")
