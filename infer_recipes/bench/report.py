"""A benchmark result as Markdown tables (stdout and report.md), results.json, results.csv and PNG plots."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from .roofline import format_machine

CSV_FIELDS = ("engine", "kind", "model", "recipe", "dtype", "device", "batch", "input_len", "output_len", "ttft_s",
              "tpot_s", "e2e_s", "decode_s", "e2e_spread_pct", "prefill_tokens_per_s", "decode_tokens_per_s",
              "output_tokens_per_s", "total_tokens_per_s", "peak_memory_bytes", "decode_bound_tokens_per_s",
              "roofline_fraction", "joules", "tokens_per_joule", "preemptions", "weight_bytes_per_decode_step",
              "kv_bytes_per_token")


def _f(value, spec: str = ".3f", scale: float = 1.0, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value * scale:{spec}}{suffix}"


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:+.1f} %"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def latency_table(rows: list[dict]) -> str:
    header = ["engine", "model", "batch", "input", "output", "TTFT s", "TPOT ms", "latency s", "spread",
              "prefill tok/s", "decode tok/s", "total tok/s", "peak MB", "roofline", "J", "tok/J"]
    body = [[r["engine"], r["model"], str(r["batch"]), str(r["input_len"]), str(r["output_len"]), _f(r["ttft_s"]),
             _f(r["tpot_s"], ".1f", 1e3), _f(r["e2e_s"]), _f(r["e2e_spread_pct"], ".0f", suffix=" %"),
             _f(r["prefill_tokens_per_s"], ".1f"), _f(r["decode_tokens_per_s"], ".1f"),
             _f(r["total_tokens_per_s"], ".1f"), _f(r["peak_memory_bytes"], ".0f", 1e-6),
             _f(r.get("roofline_fraction"), ".0f", 100, " %"), _f(r["joules"], ".1f"), _f(r["tokens_per_joule"], ".2f")]
            for r in rows]
    return _table(header, body)


def sweep_table(comparison: list[dict]) -> str:
    header = ["model", "batch", "input", "original latency s", "optimized latency s", "latency change",
              "original tok/s", "optimized tok/s", "throughput change", "memory change", "speedup"]
    body = [[c["model"], str(c["batch"]), str(c["input_len"]), _f(c["baseline_latency_s"]), _f(c["latency_s"]),
             _pct(c["latency_change_pct"]), _f(c["baseline_tokens_per_s"], ".1f"), _f(c["tokens_per_s"], ".1f"),
             _pct(c["throughput_change_pct"]), _pct(c["memory_change_pct"]), _f(c["speedup"], ".2f", suffix="x")]
            for c in comparison]
    return _table(header, body)


def ablation_tables(ab: dict) -> str:
    def rows(entries: list[dict], chained: bool) -> list[list[str]]:
        out = []
        for e in entries:
            r = [e["step"], e["config"], str(e["batch"] or "n/a"), _f(e["latency_s"]), _f(e["tokens_per_s"], ".1f"),
                 _f(e["memory_bytes"], ".0f", 1e-6), _f(e["vs_off"], ".2f", suffix="x")]
            if chained:
                r.append(_f(e.get("vs_previous"), ".2f", suffix="x"))
            out.append(r)
        return out

    head = ["step", "configuration", "batch", "latency s", "output tok/s", "peak MB", "vs off"]
    return (f"Each switch alone (on top of everything off: `{ab['off']}`):\n\n" + _table(head, rows(ab["alone"], False))
            + "\n\nCumulative (each step adds to the row above; a quantization step replaces the scheme before it and"
            " is compared with the last row without a scheme):"
            "\n\n" + _table(head + ["vs previous"], rows(ab["cumulative"], True)))


def markdown(result: dict) -> str:
    parts = [f"# infer-recipes bench {result['command']}", ""]
    meta = result["meta"]
    parts.append(f"{meta['device_name']} ({meta['device']}, {meta['torch_threads']} threads of {meta['cpu_cores']} "
                 f"cores), torch {meta['torch']}, infer-recipes {meta['infer_recipes']} at {meta['git_commit']}, "
                 f"{meta['date']}. Command: `infer-recipes {' '.join(meta['argv'])}`")
    p = result["prompts"]
    tpc = ", ".join(f"{m}: {v:.3f}" for m, v in p["tokens_per_char"].items())
    parts.append(f"\nPrompts: {p['kind']} ({p['source']}); tokens per character of that text: {tpc}. "
                 f"Output length fixed (end-of-sequence ignored), greedy; median of {result['settings']['runs']} "
                 f"runs after {result['settings']['warmup']} warm-up, "
                 + ("one configuration loaded and measured at a time." if result["command"] == "ablation"
                    else "engines alternating run by run."))
    for note in result["notes"]:
        parts.append(f"\n**Note:** {note}.")
    if result["machine"]:
        parts.append(f"\nRoofline: {format_machine(result['machine'])}. The roofline column is decode tokens/s over "
                     "the bound bandwidth / bytes per step x batch (weights once + each sequence's KV cache).")
    e = result["energy"]
    parts.append("\nEnergy: " + (e["source"] if e["available"] else f"n/a: {e['why']}") + ".")
    if result["command"] == "sweep":
        parts += ["", f"## {result['baseline']} (original) vs ours (optimized)", "", sweep_table(result["comparison"])]
    if result["command"] == "ablation":
        parts += ["", "## Ablation", "", ablation_tables(result["ablation"])]
    parts += ["", "## Every measurement", "", latency_table(result["rows"])]
    if result["skipped"]:
        parts += ["", "Skipped: " + "; ".join(f"{s['engine']}: {s['why']}" for s in result["skipped"])]
    if any(r["preemptions"] for r in result["rows"]):
        parts.append("\n**Warning:** some runs preempted sequences (the KV pool was too small): raise num_blocks.")
    return "\n".join(parts) + "\n"


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in CSV_FIELDS})


def plots(out: Path, result: dict) -> list[str]:
    """throughput vs batch size, latency vs input length, peak memory per engine: PNG files, their names."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed", file=sys.stderr)
        return []
    rows = result["rows"]
    series = sorted({(r["engine"], r["model"]) for r in rows})
    label = (lambda e, m: e) if len({m for _, m in series}) == 1 else (lambda e, m: f"{e} ({m})")
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    if result["command"] == "ablation":
        _ablation_plot(plt, result["ablation"], save)
        mem = [(r["engine"], r["peak_memory_bytes"] / 1e6) for r in rows if r["peak_memory_bytes"]]
        if mem:
            _memory_plot(plt, mem, "", save)
        return written

    batches = sorted({r["batch"] for r in rows})
    _line_panels(plt, rows, series, label, "input_len", "batch", "output_tokens_per_s", "input {} tokens",
                 "batch size", "output tokens/s", batches)
    save(plt.gcf(), "throughput_vs_batch.png")
    _line_panels(plt, rows, series, label, "batch", "input_len", "e2e_s", "batch {}", "input length (tokens)",
                 "latency s (end to end)")
    save(plt.gcf(), "latency_vs_input.png")

    biggest = max(rows, key=lambda r: (r["batch"] * (r["input_len"] + r["output_len"]), r["batch"]), default=None)
    mem = [(label(r["engine"], r["model"]), r["peak_memory_bytes"] / 1e6) for r in rows if biggest
           and (r["batch"], r["input_len"]) == (biggest["batch"], biggest["input_len"]) and r["peak_memory_bytes"]]
    if mem:
        _memory_plot(plt, mem, f" (batch {biggest['batch']}, input {biggest['input_len']})", save)
    return written


def _line_panels(plt, rows: list[dict], series, label, panel: str, x: str, y: str, title: str, xlabel: str,
                 ylabel: str, log2_ticks: list[int] | None = None) -> None:
    """One panel per value of `panel`, a line of y against x per engine; log2_ticks: a log-2 x axis with these
    ticks."""
    values = sorted({r[panel] for r in rows})
    _, axes = plt.subplots(1, len(values), figsize=(5 * len(values), 4), squeeze=False)
    for ax, v in zip(axes[0], values):
        for e, m in series:
            pts = sorted((r[x], r[y]) for r in rows if (r["engine"], r["model"], r[panel]) == (e, m, v))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label(e, m))
        ax.set(title=title.format(v), xlabel=xlabel, ylabel=ylabel)
        if log2_ticks:
            ax.set_xscale("log", base=2)
            ax.set_xticks(log2_ticks, [str(t) for t in log2_ticks])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)


def _memory_plot(plt, mem: list[tuple[str, float]], where: str, save) -> None:
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(mem)), 4))
    ax.bar(range(len(mem)), [v for _, v in mem])
    ax.set_xticks(range(len(mem)), [n for n, _ in mem], rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="peak memory MB", title="peak memory per engine" + where)
    save(fig, "memory.png")


def _ablation_plot(plt, ab: dict, save) -> None:
    """Output tokens/s of each step alone and of the cumulative chain, against everything off."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "alone", "each switch alone (on top of off)"),
                           (axes[1], "cumulative", "cumulative (left to right)")):
        entries = [e for e in ab[key] if e["tokens_per_s"]]
        ax.bar(range(len(entries)), [e["tokens_per_s"] for e in entries])
        for i, e in enumerate(entries):
            ax.text(i, e["tokens_per_s"], f"{e['vs_off']:.1f}x", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(entries)), [e["step"] for e in entries], rotation=30, ha="right", fontsize=8)
        ax.set(title=title, ylabel="output tokens/s")
        ax.grid(alpha=0.3, axis="y")
    save(fig, "ablation.png")


def write(out_dir: str | Path, result: dict) -> list[str]:
    """results.json, results.csv, report.md and the plots; -> the file names written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {**result, "files": []}
    images = plots(out, result)
    report = markdown(result) + "".join(f"\n![{name}]({name})\n" for name in images)
    (out / "report.md").write_text(report, encoding="utf-8")
    write_csv(out / "results.csv", result["rows"])
    result["files"] = ["results.json", "results.csv", "report.md", *images]
    (out / "results.json").write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
    return result["files"]
