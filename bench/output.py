"""The benchmark's results: every raw figure as JSON, medians as a Markdown table, and plots.

Every comparison is a ratio of contenders measured in the same run: these machines are
noisy, and absolute times move with whatever else runs.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

from livemig.version import __version__

BASELINE = "seeds"


def machine() -> dict:
    """What a run's figures were measured on and with: the commit, livemig's version, the
    kernel, the CPU, and the machine's load as the run began (the 1, 5, 15-minute averages)."""
    repo = Path(__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"commit": commit + ("+changes" if dirty else ""), "livemig": __version__, "kernel": platform.release(),
            "cpu": cpu, "cpus": os.cpu_count(), "load": list(os.getloadavg())}


def _key(s: dict) -> tuple:
    # runs before containers were benchmarked have no "workload": they were processes; runs
    # before link profiles, no "link": the veth as it is
    return s.get("link", "unshaped"), s.get("workload", "process"), s["mib"], s["dirty_mibps"], s["contender"]


def limits_of(result: dict, link: str) -> dict:
    """The link's measured limits (a run before link profiles has one set, the veth's)."""
    return result.get("limits_by_link", {}).get(link, result["limits"])


def groups(result: dict) -> dict[tuple, list[dict]]:
    """(link, workload, mib, dirty, contender) -> the samples that moved the workload intact."""
    out: dict[tuple, list[dict]] = {}
    for s in result["samples"]:
        out.setdefault(_key(s), [])
        if s["ok"]:
            out[_key(s)].append(s)
    return out


def _stat(samples: list[dict], key: str) -> tuple[float, float, float] | None:
    vals = [s[key] for s in samples if s[key] is not None]
    return (statistics.median(vals), min(vals), max(vals)) if vals else None


def _ms(v: tuple | None) -> str:
    if v is None:
        return "-"
    med, lo, hi = (x * 1000 for x in v)
    return f"{med:.0f} ({lo:.0f}-{hi:.0f})" if hi - lo >= 1 else f"{med:.0f}"


def _s(v: tuple | None) -> str:
    return "-" if v is None else f"{v[0]:.2f}"


def _mib(v: tuple | None) -> str:
    return "-" if v is None else f"{v[0] / 2**20:.1f}"


def _fetch(v: tuple | None, ssh_mibps: float) -> str:
    return "-" if v is None else f"{v[0]:.0f} ({v[0] / ssh_mibps:.0%})"


def summary(result: dict) -> list[dict]:
    """One row per scenario and contender: medians, min and max, and the ratio to the baseline."""
    rows = []
    g = groups(result)
    for (link, workload, mib, dirty, name), samples in g.items():
        base = _stat(g.get((link, workload, mib, dirty, BASELINE), []), "downtime_app")
        app = _stat(samples, "downtime_app")
        # (a sample of that key, failed ones too, says: runs before the axis have none, and were of one)
        procs = next((s.get("procs", 1) for s in result["samples"] if _key(s) == (link, workload, mib, dirty, name)), 1)
        lim = limits_of(result, link)
        floor = lim.get("criu_floor_by_procs", {}).get(str(procs), lim["criu_floor"]) + mib / lim["tcp_mibps"]
        rows.append({
            "link": link, "workload": workload, "procs": procs, "mib": mib, "dirty_mibps": dirty, "contender": name,
            "runs": len(samples),
            "failed": sum(1 for s in result["samples"] if _key(s) == (link, workload, mib, dirty, name)
                          and not s["ok"]),
            "downtime_app": app, "downtime_tool": _stat(samples, "downtime_tool"), "total": _stat(samples, "total"),
            "bytes_wire": _stat(samples, "bytes_wire"), "cpu_seconds": _stat(samples, "cpu_seconds"),
            "peak_rss_bytes": _stat(samples, "peak_rss_bytes"),
            # scp's rate is one on the wire (random bytes): the fetch's is compared on the wire too,
            # its pages compressing about 2:1 (the page bytes a second are kept beside it)
            "fetch_mibps": _stat([{"r": x["fetch_wire_bytes"] / 2**20 / x["fetch_seconds"]} for x in samples
                                  if x.get("fetch_seconds") and x.get("fetch_wire_bytes")], "r"),
            "fetch_page_mibps": _stat([{"r": x["fetch_bytes"] / 2**20 / x["fetch_seconds"]} for x in samples
                                       if x.get("fetch_seconds")], "r"),
            "less_downtime_than_seeds": (base[0] / app[0]) if base and app and app[0] > 0 else None,
            "stopcopy_floor": floor,
        })
    return rows


def _link_line(result: dict, link: str) -> str:
    lim = limits_of(result, link)
    return ((f"Link {link}: " if "limits_by_link" in result else "Link between the lab hosts: ")
            + f"ssh (scp) {lim['ssh_mibps']:.0f} MiB/s, plain TCP {lim['tcp_mibps']:.0f} MiB/s"
            + (f", a round trip over ssh {lim['rtt_ms']:.1f} ms" if lim.get("rtt_ms") else "")
            + f"; CRIU's dump + restore of an empty process: {lim['criu_floor'] * 1000:.0f} ms.")


def table(result: dict) -> str:
    links = result.get("links", ["unshaped"])
    shaped = links != ["unshaped"]
    lines = [" ".join(_link_line(result, link) for link in links) + " "
             + (f"Every contender capped at {result['max_bandwidth'] / 2**20:g} MiB/s (livemig --max-bandwidth, "
                "scp -l). " if result.get("max_bandwidth") else "")
             + "Times are medians (min-max) over the repetitions; ms unless marked.", "",
             (("| link " if shaped else "") + "| workload | MiB | dirty MiB/s | contender | downtime seen by the app | "
              "downtime (tool) | total s | MiB on the wire | CPU s (source) | peak RSS MiB | less downtime than seeds | "
              "stop-and-copy floor | post-copy fetch, MiB/s on the wire (of scp's) |"),
             ("| --- " if shaped else "") + "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: | ---: |"]
    for r in summary(result):
        ratio = r["less_downtime_than_seeds"]
        lim = limits_of(result, r["link"])
        lines.append(
            (f"| {r['link']} " if shaped else "") + f"| {r['workload']} | {r['mib']} | {r['dirty_mibps']:g} | {r['contender']}"
            + (f" ({r['failed']} failed)" if r["failed"] else "") + " | "
            f"{_ms(r['downtime_app'])} | {_ms(r['downtime_tool'])} | {_s(r['total'])} | {_mib(r['bytes_wire'])} | "
            f"{_s(r['cpu_seconds'])} | {_mib(r['peak_rss_bytes'])} | "
            f"{'-' if ratio is None else f'x{ratio:.1f}'} | {r['stopcopy_floor'] * 1000:.0f} | "
            f"{_fetch(r['fetch_mibps'], lim['ssh_mibps'])} |")
    return "\n".join(lines)


def write_json(result: dict, stem: Path) -> Path:
    path = stem.with_suffix(".json")
    path.write_text(json.dumps({**result, "summary": summary(result)}, indent=1))
    return path


def write(result: dict, stem: Path) -> list[Path]:
    paths = [write_json(result, stem), stem.with_suffix(".md")]
    paths[1].write_text(table(result) + "\n")
    paths += plots(result, stem)
    return paths


def _named(contender: str) -> str:
    """A contender as a plot's legend names it: the baseline for what it is."""
    return ("the seeds' procedure: criu dump, tar, scp, criu restore (the baseline)"
            if contender == BASELINE else contender)


def plots(result: dict, stem: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = result.get("links", ["unshaped"])[0]       # the plots are of the first link profile run
    every = [r for r in summary(result) if r["link"] == first]
    rows = [r for r in every if r["workload"] == "process"]
    dirty = sorted({r["dirty_mibps"] for r in rows})
    fig, axes = plt.subplots(1, len(dirty), figsize=(max(7, 5 * len(dirty)), 5), squeeze=False)
    for ax, rate in zip(axes[0], dirty):
        for name in result["contenders"]:
            pts = sorted((r["mib"], *r["downtime_app"]) for r in rows
                         if r["contender"] == name and r["dirty_mibps"] == rate and r["downtime_app"])
            if pts:     # the median, and the repetitions' min to max
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], capsize=3, marker="o", label=_named(name),
                            yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]])
            boxed = [(r["mib"], r["downtime_app"][0]) for r in every if r["workload"] == "runc"
                     and r["contender"] == name and r["dirty_mibps"] == rate and r["downtime_app"]]
            if boxed:    # the same contender's colour, unjoined: a container at one size or two
                ax.plot([p[0] for p in boxed], [p[1] for p in boxed], linestyle="none", marker="s",
                        markerfacecolor="none", color=ax.lines[-1].get_color() if pts else None,
                        label=f"{_named(name)}, runc container")
        floor = sorted({(r["mib"], r["stopcopy_floor"]) for r in rows if r["dirty_mibps"] == rate})
        ax.plot([p[0] for p in floor], [p[1] for p in floor], linestyle=":", marker="_", color="grey",
                label="stop-and-copy floor (CRIU + TCP)")
        # the sizes run, in MiB, not powers of two
        _downtime_axes(ax, sorted({r["mib"] for r in every}), "workload memory, MiB", f"dirtying {rate:g} MiB/s")
    downtime = _legend_and_save(fig, axes, plt, stem.parent / f"{stem.name}-downtime.png")

    livemig = [s for s in result["samples"] if s["ok"] and s["rounds"] and s.get("link", "unshaped") == first]
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = []
    for i, s in enumerate(livemig):
        bottom = 0.0
        for n, b in enumerate(s["rounds"]):
            ax.bar(i, b / 2**20, bottom=bottom, color=f"C{n}", label=f"round {n + 1}" if i == 0 or n >= 1 else None)
            bottom += b / 2**20
        labels.append(f"{s['contender'].replace('livemig ', '')}\n{s['mib']} MiB {s['dirty_mibps']:g}/s"
                      + ("" if s.get("workload", "process") == "process" else f" {s['workload']}"))
    ax.set_xticks(range(len(labels)), labels, fontsize="x-small", rotation=90)
    ax.set_ylabel("MiB on the wire, per round (final dump last)")
    ax.set_title("livemig: bytes on the wire per round")
    handles, names = ax.get_legend_handles_labels()
    ax.legend(dict(zip(names, handles)).values(), dict(zip(names, handles)).keys(), fontsize="small")
    fig.tight_layout()
    rounds = stem.parent / f"{stem.name}-rounds.png"
    fig.savefig(rounds, dpi=100)
    plt.close(fig)
    return [downtime, rounds, *_by_procs(result, every, stem, plt)]


def _by_procs(result: dict, every: list[dict], stem: Path, plt) -> list[Path]:
    """Downtime against the number of processes holding the same memory (--procs), one panel per
    size and dirty rate, with each panel's CRIU floor for a tree of that many (no memory)."""
    trees = [r for r in every if r["workload"] != "runc"]
    panels = sorted({(r["mib"], r["dirty_mibps"]) for r in trees if r["procs"] > 1})
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(max(7, 5 * len(panels)), 5), squeeze=False)
    for ax, (mib, rate) in zip(axes[0], panels):
        rows = [r for r in trees if r["mib"] == mib and r["dirty_mibps"] == rate]
        for name in result["contenders"]:
            pts = sorted((r["procs"], *r["downtime_app"]) for r in rows if r["contender"] == name and r["downtime_app"])
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], capsize=3, marker="o", label=_named(name),
                            yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]])
        floor = sorted({(r["procs"], r["stopcopy_floor"] - mib / limits_of(result, r["link"])["tcp_mibps"]) for r in rows})
        ax.plot([p[0] for p in floor], [p[1] for p in floor], linestyle=":", marker="_", color="grey",
                label="CRIU's dump + restore of a tree that many, no memory")
        _downtime_axes(ax, sorted({r["procs"] for r in rows}), f"processes holding {mib} MiB between them",
                       f"{mib} MiB, dirtying {rate:g} MiB/s in all")
    return [_legend_and_save(fig, axes, plt, stem.parent / f"{stem.name}-procs.png")]


def _downtime_axes(ax, xs: list, xlabel: str, title: str) -> None:
    """Both axes logarithmic, the x ticks at the values run."""
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("downtime seen by the app, s")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)


def _legend_and_save(fig, axes, plt, path: Path) -> Path:
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize="small")
    fig.tight_layout(rect=(0, 0.15, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
