"""The report of a simulated fleet run: Markdown + HTML + PNG plots + JSON, from the registry.

``build_report(RUN)`` (also ``ldfleet report RUN``) reads the run folder (``run.json``, the scenario,
``fleet.json``, checkpoints) and the registry, evaluates the final model centrally on the corpus's
held-out speakers, and writes ``RUN/report/``:

* ``accuracy_per_round.png``: fleet accuracy (devices' local test clips) and mean layers per class per round;
* ``accuracy_vs_keep.png``: held-out accuracy vs keep ratio for the federated selector, random dropping,
  early exit (and the selector before federated training);
* a speech-recognition run (``task: asr``) reports WER (and CER) instead of accuracy everywhere:
  ``wer_per_round.png``, ``wer_vs_keep.png``, WER per class at its keep ratio, ``*_wer`` keys in JSON;
* ``layer_usage.png``: share of inputs running each layer, per device class (last round);
* ``report.md`` / ``report.html``: tables of classes (at their budget, selector vs random), devices
  (budget, applied policy version, accuracy, mean layers, latency), rounds, traffic and timings;
* ``summary.json``: the same numbers for scripts.
"""

from __future__ import annotations

import html
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from rich.console import Console

from ldfleet.common.metrics import metric_label

REPORT_DIR = "report"
METHODS = ("selector", "random", "early_exit")


def _load_run(run_dir: Path) -> tuple[dict, Any, Any]:
    import yaml

    from ldfleet.common.learning import MANIFEST_FILE, FleetManifest
    from ldfleet.simulations.scenario import parse_scenario
    from ldfleet.simulations.run_folder import RUN_FILE, SCENARIO_COPY

    if not (run_dir / RUN_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} is not a simulation run (no {RUN_FILE})")
    info = json.loads((run_dir / RUN_FILE).read_text())
    scn = parse_scenario(yaml.safe_load((run_dir / SCENARIO_COPY).read_text()), str(run_dir / SCENARIO_COPY), base_dir=run_dir)
    manifest = FleetManifest.load(run_dir / MANIFEST_FILE)
    return info, scn, manifest


def _wmean(pairs: list[tuple[float, float]]) -> float | None:
    tot = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / tot if tot > 0 else None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def central_evaluation(manifest, scn, final_arrays: dict | None, keeps: list[float]) -> dict[str, Any]:
    """Held-out test split: final model (warm + global selector) for every method and keep; rows carry
    ``accuracy`` (kws) or ``wer`` and ``cer`` (asr)."""
    import numpy as np
    import torch

    from ldfleet.client.learning import load_pool_splits
    from ldfleet.common.evaluate import evaluate
    from ldfleet.common.model.checkpoint import load_model

    test = load_pool_splits(manifest.data_dir, manifest.split_seed, manifest.task)["test"]
    warm = load_model(manifest.model_dir)
    before = evaluate(warm, test, ["selector"], keeps)
    model = load_model(manifest.model_dir)
    if final_arrays:
        model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in final_arrays.items()}, strict=False)
    after = evaluate(model, test, list(METHODS), keeps)
    rows = [r.as_dict() for r in after.rows] + [{**r.as_dict(), "method": "selector_before_fl"} for r in before.rows]
    return {"examples": len(test), "num_layers": model.num_layers, "rows": rows,
            "layer_usage": {str(k): v for k, v in after.layer_usage.get("selector", {}).items()}}


def base_traffic() -> dict[str, int]:
    """Selector + head vs full model of a base-size WavLM (768 x 12), counted without allocating it."""
    import torch

    from ldfleet.common.model.backbone import backbone_from_config, build_config
    from ldfleet.common.model.dynamic import DynamicModel
    from ldfleet.common.model.heads import with_head
    from ldfleet.server.app import NPY_HEADER_BYTES, full_model_bytes, state_bytes

    with torch.device("meta"):
        model = DynamicModel(*with_head(backbone_from_config(build_config("wavlm", "base"))))
    return {"selector_head_bytes": state_bytes(model.trainable_state("selector")), "full_model_bytes": full_model_bytes(model),
            "npy_header_bytes": NPY_HEADER_BYTES}


def _plots(out: Path, per_round: dict, classes: list[str], central: dict, usage: dict[str, list[float]], num_layers: int,
           metric: str = "accuracy") -> dict[str, str]:
    """PNG plots; ``metric`` is the task's score (``accuracy`` for kws, ``wer`` for asr)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    # accuracy and mean layers per class per round
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for c in classes:
        pts = sorted((r, v) for r, v in per_round.get(c, {}).items())
        if pts:
            axes[0].plot([r for r, _ in pts], [100 * v[metric] for _, v in pts], marker="o", label=c)
            axes[1].plot([r for r, _ in pts], [v["mean_layers"] for _, v in pts], marker="o", label=c)
    name = metric_label(metric)
    axes[0].set(xlabel="round", ylabel=f"{name} on local test clips (%)", title=f"{name[0].upper() + name[1:]} per class per round")
    axes[1].set(xlabel="round", ylabel="mean encoder layers run", title="Mean layers per class per round", ylim=(0, num_layers + 0.5))
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    files["per_round"] = f"{metric}_per_round.png"
    fig.savefig(out / files["per_round"], dpi=110)
    plt.close(fig)
    # accuracy vs keep on held-out speakers
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    styles = {"selector": ("o-", "selector (federated)"), "random": ("s--", "random dropping"),
              "early_exit": ("^-.", "early exit"), "selector_before_fl": ("x:", "selector before FL")}
    for method, (style, label) in styles.items():
        pts = sorted((r["keep"], r[metric]) for r in central["rows"] if r["method"] == method and r.get(metric) is not None)
        if pts:
            ax.plot([k for k, _ in pts], [100 * a for _, a in pts], style, label=label)
    ax.set(xlabel="keep ratio (k / L)", ylabel=f"{name}, held-out speakers (%)", title=f"Final {name} vs budget")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    files["vs_keep"] = f"{metric}_vs_keep.png"
    fig.savefig(out / files["vs_keep"], dpi=110)
    plt.close(fig)
    # layer usage heatmap
    rows = [c for c in classes if c in usage]
    if rows:
        fig, ax = plt.subplots(figsize=(1.2 + 0.6 * num_layers, 0.9 + 0.5 * len(rows)))
        im = ax.imshow([usage[c] for c in rows], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xticks(range(num_layers), [f"L{i}" for i in range(num_layers)])
        for i, c in enumerate(rows):
            for j, v in enumerate(usage[c]):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
        ax.set_title("Share of inputs running each layer (last round, local test clips)")
        fig.colorbar(im, ax=ax, fraction=0.03)
        fig.tight_layout()
        fig.savefig(out / "layer_usage.png", dpi=110)
        plt.close(fig)
        files["layer_usage"] = "layer_usage.png"
    return files


def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def build_report(run_dir: str | Path, db_url: str | None = None, console: Console | None = None,
                 central: bool = True) -> dict[str, Any]:
    """Write ``RUN/report/`` and return the JSON summary."""
    from ldfleet.server.checkpoints import checkpoint_rounds, load_checkpoint
    from ldfleet.server.registry.store import Registry
    from ldfleet.server.telemetry import usage as inference_usage
    from ldfleet.server.rounds import EVAL, TRAIN, device_status, metric_rows, rounds

    run_dir = Path(run_dir)
    info, scn, manifest = _load_run(run_dir)
    out = run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    classes = [c.name for c in scn.classes]
    metric = scn.metric
    with Registry(db_url or info["db_url"]) as reg:
        round_rows = rounds(reg, info["run_id"])
        metrics = metric_rows(reg, info["run_id"])
        status = device_status(reg)
        active = {k: (p.budget_text(), p.version) for k, p in reg.active_policies().items()}
        served = inference_usage(reg)
    finished = [r for r in round_rows if r.status == "finished"]
    last_round = max((r.number for r in finished), default=0)
    ckpts = [r for r in checkpoint_rounds(run_dir) if r <= last_round]
    final_arrays = load_checkpoint(run_dir, max(ckpts)) if ckpts else None

    # ---- per class per round (fleet, local test clips) --------------------------------------
    per_round: dict[str, dict[int, dict[str, float]]] = defaultdict(dict)
    for r in finished:
        for cls, m in ((r.summary or {}).get("eval") or {}).items():
            if m.get(metric) is not None:
                per_round[cls][r.number] = {metric: m[metric], "mean_layers": m["mean_layers"], "devices": m["devices"]}
    usage: dict[str, list[float]] = {}
    last_eval = [m for m in metrics if m.phase == EVAL and m.round == last_round and m.layer_usage]
    for cls in classes:
        rows = [m for m in last_eval if m.device_class == cls]
        if rows:
            L = len(rows[0].layer_usage or [])
            tot = sum(m.num_examples or 0 for m in rows) or 1
            usage[cls] = [sum((m.layer_usage or [0] * L)[i] * (m.num_examples or 0) for m in rows) / tot for i in range(L)]

    # ---- devices ---------------------------------------------------------------------------------
    device_rows = []
    device_json = []
    budgets = {c.name: c.budget.text() for c in scn.classes}
    for dev in manifest.devices:
        mine = [m for m in metrics if m.device_id == dev.device_id]
        evals = [m for m in mine if m.phase == EVAL]
        last = max(evals, key=lambda m: m.round) if evals else None
        trains = [m for m in mine if m.phase == TRAIN]
        fails = [m for m in mine if m.phase.endswith("-failed")]
        st = status.get(dev.device_id, {})
        override = active.get(f"device:{dev.device_id}")
        cls_policy = active.get(f"class:{dev.device_class}")
        budget = override[0] + " (device)" if override else (cls_policy[0] if cls_policy else budgets.get(dev.device_class, "-"))
        rec = {
            "device_id": dev.device_id, "device_class": dev.device_class, "budget": budget,
            "applied_policy_version": st.get("applied_version"), "desired_policy_version": st.get("desired_version"),
            "k": st.get("effective_k"), "accuracy": last.accuracy if last else None,
            **({"wer": last.wer if last else None, "cer": last.cer if last else None} if metric == "wer" else {}),
            "mean_layers": last.mean_kept_layers if last else None, "latency_ms": last.latency_ms if last else None,
            "expected_latency_ms": st.get("expected_latency_ms"), "rounds_trained": len(trains), "failures": len(fails),
            "train_clips": len(dev.train_indices), "test_clips": len(dev.test_indices),
            "policy_version_last_round": last.policy_version if last else None,
        }
        device_json.append(rec)
        device_rows.append([
            rec["device_id"], rec["device_class"], budget, f"v{rec['applied_policy_version']}", rec["k"] or "-",
            _pct(rec[metric]), f"{rec['mean_layers']:.2f}" if rec["mean_layers"] is not None else "-",
            f"{rec['latency_ms']:.1f}" if rec["latency_ms"] is not None else "-",
            f"{rec['expected_latency_ms']:.1f}" if rec["expected_latency_ms"] is not None else "-",
            rec["rounds_trained"], rec["failures"],
        ])

    # ---- central evaluation: selector vs random vs early exit -----------------------------------
    num_layers = int(json.loads((Path(manifest.model_dir) / "model.json").read_text())["backbone_config"]["num_hidden_layers"])
    class_k: dict[str, int] = {}
    for cls in classes:
        ks = [d["k"] for d in device_json if d["device_class"] == cls and d["k"]]
        if ks:
            class_k[cls] = int(round(statistics.median(ks)))
    keeps = sorted(set(scn.report_keeps) | {k / num_layers for k in class_k.values()})
    cen = central_evaluation(manifest, scn, final_arrays, keeps) if central else {"rows": [], "examples": 0, "layer_usage": {}}

    def central_acc(method: str, k: int, key: str = metric) -> float | None:
        for r in cen["rows"]:
            if r["method"] == method and r["k"] == k:
                return r.get(key)
        return None

    # kws keeps its keys (accuracy); asr names the metric in every key, so a WER never reads as an accuracy
    sfx = "" if metric == "accuracy" else f"_{metric}"

    class_rows, class_json = [], []
    for cls in classes:
        k = class_k.get(cls)
        pr = per_round.get(cls, {})
        fleet_last = pr.get(last_round, {})
        rec = {
            "device_class": cls, "budget": active.get(f"class:{cls}", (budgets[cls], 0))[0], "k": k,
            "keep_ratio": k / num_layers if k else None,
            **{f"heldout_{m}{sfx}": central_acc(m, k) if k else None for m in (*METHODS, "selector_before_fl")},
            f"fleet_{metric}_last_round": fleet_last.get(metric), "fleet_mean_layers_last_round": fleet_last.get("mean_layers"),
        }
        if metric == "wer":
            rec["heldout_selector_cer"] = central_acc("selector", k, "cer") if k else None
        class_json.append(rec)
        class_rows.append([
            cls, rec["budget"], f"{k}/{num_layers}" if k else "-", f"{rec['keep_ratio']:.3f}" if k else "-",
            *[_pct(rec[f"heldout_{m}{sfx}"]) for m in (*METHODS, "selector_before_fl")],
            *([_pct(rec["heldout_selector_cer"])] if metric == "wer" else []), _pct(rec[f"fleet_{metric}_last_round"]),
            f"{rec['fleet_mean_layers_last_round']:.2f}" if rec["fleet_mean_layers_last_round"] is not None else "-",
        ])

    # ---- rounds, traffic, timings ----------------------------------------------------------------
    round_table, round_json = [], []
    sent_all, recv_all, full_bytes = [], [], 0
    for r in round_rows:
        s = r.summary or {}
        tr = s.get("traffic") or {}
        sent = list((tr.get("sent_bytes") or {}).values())
        recv = list((tr.get("received_bytes") or {}).values())
        sent_all += sent
        recv_all += recv
        full_bytes = tr.get("full_model_bytes") or full_bytes
        wall = (r.finished_at - r.started_at).total_seconds() if r.finished_at and r.started_at else None
        failed = s.get("failed") or []
        ev = (s.get("eval") or {}).get("(all)", {})
        versions = sorted(set((s.get("policy_versions") or {}).values()))
        round_json.append({"round": r.number, "status": r.status, "wall_s": wall, "sampled": len(s.get("sampled") or []),
                           "offline": len(s.get("offline") or []), "failed": failed, f"eval_{metric}": ev.get(metric),
                           "eval_mean_layers": ev.get("mean_layers"), "policy_versions": s.get("policy_versions"),
                           "k": s.get("k")})
        round_table.append([
            r.number, r.status, f"{wall:.1f}" if wall is not None else "-", len(s.get("sampled") or []),
            len(s.get("offline") or []),
            "; ".join(f"{f['device_id']} ({f['phase']}: {f['reason'][:60]})" for f in failed) or "-",
            _pct(ev.get(metric)), f"{ev['mean_layers']:.2f}" if ev.get("mean_layers") is not None else "-",
            ",".join(f"v{v}" for v in versions) or "-",
        ])
    walls = [x["wall_s"] for x in round_json if x["wall_s"] is not None and x["status"] == "finished"]
    sent_pc = statistics.mean(sent_all) if sent_all else 0
    recv_pc = statistics.mean(recv_all) if recv_all else 0
    base = base_traffic()
    traffic = {
        "sent_bytes_per_client_round": sent_pc, "received_bytes_per_client_round": recv_pc,
        "full_model_bytes_same_backbone": full_bytes,
        "ratio_same_backbone": (full_bytes / recv_pc) if recv_pc else None,
        "base_selector_head_bytes": base["selector_head_bytes"], "base_full_model_bytes": base["full_model_bytes"],
        "ratio_base": base["full_model_bytes"] / base["selector_head_bytes"],
        "total_bytes_sent": sum(sent_all), "total_bytes_received": sum(recv_all),
    }
    timings = info.get("timings", {})
    summary = {
        "run_id": info["run_id"], "scenario": scn.name, "task": scn.task, "metric": metric, "status": info.get("status"),
        "devices": scn.num_devices,
        "classes": class_json, "rounds_finished": len(finished), "rounds_planned": scn.rounds,
        "wall_s_per_round": {"mean": statistics.mean(walls) if walls else None, "median": statistics.median(walls) if walls else None,
                             "max": max(walls) if walls else None, "min": min(walls) if walls else None},
        "peak_rss_mb": info.get("peak_rss_mb"), "timings_s": timings, "traffic": traffic,
        "heldout": {"examples": cen["examples"], "rows": cen["rows"]}, "devices_table": device_json, "rounds": round_json,
        "layer_usage_by_class": usage, "num_layers": num_layers, "inference_usage": served,
    }
    files = _plots(out, per_round, classes, cen, usage, num_layers, metric)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))

    # ---- Markdown / HTML -------------------------------------------------------------------------
    heldout_table = []
    for keep in keeps:
        k = max(1, min(num_layers, round(keep * num_layers)))
        heldout_table.append([f"{keep:.3f}", k] + [_pct(central_acc(m, k)) for m in (*METHODS, "selector_before_fl")])
    name = metric_label(metric)
    heading = name[0].upper() + name[1:]  # "WER", "Accuracy"
    sections: list[tuple[str, str, list[str] | None, list[list[Any]] | None, str | None]] = [
        ("Classes at their budget" + (": WER per class and keep ratio" if metric == "wer" else ""),
         "Held-out = the corpus test split (speakers no device has), final model; fleet = devices' local test clips, last round."
         + (" WER and CER: word / character edits over reference words / characters (jiwer), lower is better." if metric == "wer" else ""),
         ["class", "budget", "k", "keep ratio", f"held-out selector {name}", f"held-out random {name}", f"held-out early exit {name}",
          f"selector before FL {name}", *(["held-out selector CER"] if metric == "wer" else []), f"fleet {name}",
          "fleet mean layers"], class_rows, None),
        (f"{heading} vs keep ratio (held-out speakers)", f"{cen['examples']} clips.",
         ["keep", "k", "selector", "random", "early exit", "selector before FL"], heldout_table, files.get("vs_keep")),
        (f"{heading} and layers per class per round", "", None, None, files.get("per_round")),
        ("Layer usage by device class", "", None, None, files.get("layer_usage")),
        ("Devices", "Latency: measured here per example (cached front end + kept layers + head); "
         "expected: the device's advertised profile under its policy.",
         ["device", "class", "budget", "applied policy", "k", name, "mean layers", "latency ms", "expected ms",
          "rounds trained", "failures"], device_rows, None),
        ("Rounds", "", ["round", "status", "wall s", "sampled", "offline", "failures", name, "mean layers",
                        "policy versions used"], round_table, None),
        ("Traffic per client per round", "Payload bytes of the arrays (Flower Array = .npy: header + data).",
         ["what", "bytes"], [
             ["sent to a client (global selector + head)", _fmt_bytes(sent_pc)],
             ["received from a client (its selector + head)", _fmt_bytes(recv_pc)],
             ["full-model FedAvg, same backbone", _fmt_bytes(full_bytes)],
             ["ratio, same backbone", f"{traffic['ratio_same_backbone']:.0f}x" if traffic["ratio_same_backbone"] else "-"],
             ["base-size WavLM (768x12): selector + head", _fmt_bytes(base["selector_head_bytes"])],
             ["base-size WavLM: full model", _fmt_bytes(base["full_model_bytes"])],
             ["ratio, base size", f"{traffic['ratio_base']:.0f}x"],
         ], None),
        ("Timings", f"peak memory (this process and its children, Ray included): {info.get('peak_rss_mb', 0):.0f} MB; "
         f"wall time per round: median {summary['wall_s_per_round']['median'] or 0:.1f} s, mean "
         f"{summary['wall_s_per_round']['mean'] or 0:.1f} s, min {summary['wall_s_per_round']['min'] or 0:.1f} s, max "
         f"{summary['wall_s_per_round']['max'] or 0:.1f} s (simulated stragglers cost no wall time; a real round waits at most its timeout); "
         f"{info.get('cores', '?')} cores, torch threads {info.get('torch_threads', '?')}.",
         ["phase", "seconds"], [[k, f"{v:.1f}"] for k, v in timings.items()], None),
    ]
    if served:
        sections.append(("Served requests (inference telemetry)",
                         "Per device over the stored per-minute roll-ups; layer usage = share of requests running each layer.",
                         ["device", "requests", "mean layers", "deadline misses", "governor interventions", "worst p99 ms",
                          "layer usage"],
                         [[d, v["requests"], f"{v['mean_layers']:.2f}", v["deadline_misses"], v["interventions"],
                           "-" if v["p99_ms"] is None else f"{v['p99_ms']:.1f}", " ".join(f"{u:.2f}" for u in v["usage"])]
                          for d, v in sorted(served.items())], None))
    title = f"ldfleet simulation report: {scn.name} ({info['run_id']})"
    intro = (f"{scn.num_devices} devices in {len(classes)} classes, {len(finished)}/{scn.rounds} rounds finished, "
             f"status {info.get('status')}. {scn.description}")
    md = [f"# {title}", "", intro, ""]
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}img{max-width:100%}</style>",
            f"</head><body><h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>"]
    for name, note, headers, rows, image in sections:
        md += [f"## {name}", ""]
        page.append(f"<h2>{html.escape(name)}</h2>")
        if note:
            md += [note, ""]
            page.append(f"<p>{html.escape(note)}</p>")
        if headers and rows is not None:
            md += [_md_table(headers, rows), ""]
            page.append(_html_table(headers, rows))
        if image:
            md += [f"![{name}]({image})", ""]
            page.append(f"<img src='{image}' alt='{html.escape(name)}'>")
    page.append("</body></html>")
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text("\n".join(page))
    if console is not None:
        console.print(f"report: {out / 'report.md'} (+ report.html, summary.json, {len(files)} plots)")
    return summary


