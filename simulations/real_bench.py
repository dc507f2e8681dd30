"""`make real-bench`: the paper's table on a real pretrained model (Whisper base) and real speech.

Benchmark orchestration, not product code (run `make real-data` first). Phases, each cached in
--out so a re-run continues where it stopped:

1. parity: full-model WER through ldfleet vs Hugging Face's own `generate` on the same English
   test clips, and ldfleet unpadded vs padded to the 30 s window (the default follows the figure);
2. skip maps (unless --no-skip-maps): an affine stand-in per encoder layer, fitted in closed form
   on the full model's states of --map-clips training clips (common/model/skip_maps.py): the frozen
   encoder then tolerates skipped layers;
3. tables: teacher-forced loss of every layer set of each size the keeps need (k = 3, 4, 5 of 6)
   on training and validation clips (frozen Whisper; see common/whisper_train.py and common/set_fit.py);
4. fit: static and the selector (--selector-from-static: started as static's ranking) on those
   tables, each choosing its set per k (the budget is an input; --no-budget: top-k of one
   ranking); the run goes to OUT/run;
5. eval: WER/CER, mean layers, encoder and end-to-end ms at 6/6..3/6 for full, random, early_exit,
   static, selector on the English test prompts (prompts never trained on) and on the Dutch test
   voice (a speaker never heard in training); rows to OUT/eval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import torch

from ldfleet.common.asr_eval import evaluate_asr, token_budget
from ldfleet.common.data.transcribed import load_speech_items
from ldfleet.common.metrics import score
from ldfleet.common.model.whisper_dynamic import WhisperDynamic
from ldfleet.common.model.skip_maps import SkipMaps
from ldfleet.common.set_fit import FitConfig, LossTable, fit_strategy, table_summary
from ldfleet.common.whisper_train import fit_whisper_skip_maps, loss_table

METHODS = ("full", "random", "early_exit", "static", "selector")


def say(msg: str) -> None:
    print(f"[real-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@torch.inference_mode()
def parity(model: WhisperDynamic, items, batch_size: int, path: Path, unpadded_clips: int) -> dict:
    """WER of HF generate (30 s features from the HF extractor) vs ldfleet padded, on the same clips,
    and ldfleet unpadded vs padded on the first ``unpadded_clips`` of them (decoding loops make
    unpadded slow). Each figure is saved to ``path`` as soon as it is known."""
    from transformers import WhisperFeatureExtractor

    whisper, tok = model.runner.backbone, model.head.tokenizer
    extractor = WhisperFeatureExtractor.from_pretrained(whisper.config._name_or_path)
    out = json.loads(path.read_text()) if path.is_file() else {}
    for name in ("hf_generate", "ldfleet_padded", "ldfleet_unpadded", "ldfleet_padded_same_clips_as_unpadded"):
        subset = items if name in ("hf_generate", "ldfleet_padded") else items[:unpadded_clips]
        refs = [it.text for it in subset]
        if out.get(name, {}).get("references") == refs:
            continue  # measured on these clips by an earlier run
        texts, start = [], time.perf_counter()
        for i in range(0, len(subset), batch_size):
            batch = subset[i : i + batch_size]
            budget = token_budget(max(len(it.waveform) for it in batch) / 16000)
            if name == "hf_generate":
                feats = extractor([it.waveform for it in batch], sampling_rate=16000, return_tensors="pt").input_features
                ids = whisper.generate(feats, language="en", task="transcribe", max_new_tokens=budget)
                texts += [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]
                continue
            model.runner.pad_to_window = name != "ldfleet_unpadded"
            front = model.front_end([it.waveform for it in batch])
            hidden, _ = model.run(front, "full", model.num_layers)
            texts += model.head.predict(hidden, front.frame_mask, max_new_tokens=budget)
        out[name] = {**score("asr", texts, refs), "clips": len(subset), "seconds": time.perf_counter() - start,
                     "predictions": texts, "references": refs}
        say(f"parity {name}: WER {out[name]['wer']:.4f} CER {out[name]['cer']:.4f} on {len(subset)} clips")
        path.write_text(json.dumps(out, indent=2))
    model.runner.pad_to_window = True
    return out


def tables(model: WhisperDynamic, splits: dict[str, list], folder: Path, tag: str, ks) -> dict[str, LossTable]:
    """Layer-set loss tables (``whisper_train.loss_table``) of every set size in ``ks``, one per split,
    each cached as ``folder/tables-SPLIT-N-TAG.pt`` (a rerun with another training size keeps the
    validation table)."""
    out = {}
    for name, items in splits.items():
        path = folder / f"tables-{name}-{len(items)}-{tag}.pt"
        if path.is_file():
            say(f"cached: {path}")
            out[name] = LossTable.from_dict(torch.load(path))
            continue
        start = time.perf_counter()
        out[name] = loss_table(model, items, ks, on_item=lambda i, n: say(f"table {name} {i}/{n}") if i % 4 == 0 else None)
        say(f"table {name}: {len(items)} clips in {time.perf_counter() - start:.0f} s")
        torch.save(out[name].to_dict(), path)
    return out


def skip_maps(model: WhisperDynamic, items, path: Path) -> None:
    """Fit (or load from ``path``) the skip maps and install them on the model."""
    if path.is_file():
        say(f"cached: {path}")
        model.runner.skip_maps = SkipMaps.load(path)
        return
    start = time.perf_counter()
    maps = fit_whisper_skip_maps(model, items, on_batch=lambda i, n: say(f"skip maps batch {i}/{n}"))
    maps.save(path)
    say(f"skip maps: {len(items)} clips in {time.perf_counter() - start:.0f} s")


def eval_set(model: WhisperDynamic, items, keeps, batch_size: int, language: str) -> dict:
    """Every method at every keep < 1 (at 6/6 every method is the full model: its row is copied)."""
    model.head.language = language
    start = time.perf_counter()
    res = evaluate_asr(model, items, METHODS, [k for k in keeps if k < 1.0], batch_size=batch_size,
                       on_batch=lambda i, n: say(f"eval {language} batch {i}/{n}"))
    model.head.language = "en"
    d = res.as_dict(with_predictions=True)
    full = next(r for r in d["rows"] if r["method"] == "full")
    d["rows"] += [{**full, "method": m, "same_as_full": True} for m in METHODS[1:]]
    d["references"] = [it.text for it in items]
    say(f"eval {language}: {len(items)} clips in {time.perf_counter() - start:.0f} s")
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("data/real"))
    ap.add_argument("--out", type=Path, default=Path("runs/real-bench"))
    # Defaults: the README table (about 45 min on 2 CPU cores; a 30 s window per clip is the cost).
    ap.add_argument("--train-clips", type=int, default=96)
    ap.add_argument("--val-clips", type=int, default=48)
    ap.add_argument("--test-clips", type=int, default=48)
    ap.add_argument("--unseen-test-clips", type=int, default=12, help="Dutch test voice (0 = skip)")
    ap.add_argument("--parity-clips", type=int, default=48, help="test clips HF generate is compared on")
    ap.add_argument("--unpadded-clips", type=int, default=2)
    ap.add_argument("--map-clips", type=int, default=24, help="training clips the skip maps are fitted on")
    ap.add_argument("--no-skip-maps", dest="skip_maps", action="store_false",
                    help="frozen encoder only: a skipped layer passes its input through (the figures before skip maps)")
    ap.add_argument("--no-budget", dest="budget", action="store_false",
                    help="static and selector keep top-k of one ranking for every k (nested sets); default: "
                         "each chooses its set per k (the budget is an input)")
    ap.add_argument("--selector-from-static", action="store_true",
                    help="start the selector as the fitted static ranking, learning per-clip corrections to it "
                         "(default: a random start; README, real-speech table, has both). Writes OUT/run and "
                         "OUT/eval.json like the default: give it another --out, with OUT's tables-*.pt and "
                         "skip_maps-*.safetensors copied there to reuse them")
    ap.add_argument("--keeps", default="0.5,0.6667,0.8333")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0]
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    keeps = [float(k) for k in args.keeps.split(",")]
    en = args.data / "asterisk-en"
    model = WhisperDynamic.from_pretrained(str(args.data / "whisper-base"), language="en", pad_to_window=True,
                                           budget=args.budget).eval()
    # A fixed sample spread evenly over each split (every n-th clip).
    sample = lambda items, n: items[:: max(1, len(items) // n)][:n] if n else []  # noqa: E731
    test = sample(load_speech_items(en / "test"), args.test_clips)

    par = parity(model, test[: args.parity_clips], args.batch_size, args.out / "parity.json", args.unpadded_clips)
    say(f"parity: HF generate WER {par['hf_generate']['wer']:.3f}, ldfleet padded {par['ldfleet_padded']['wer']:.3f}, "
        f"unpadded {par['ldfleet_unpadded']['wer']:.3f} -> default: padded to the 30 s window")

    train_items = load_speech_items(en / "train")
    train, val = sample(train_items, args.train_clips), sample(load_speech_items(en / "val"), args.val_clips)
    if args.skip_maps:
        skip_maps(model, sample(train_items, args.map_clips), args.out / f"skip_maps-{args.map_clips}.safetensors")
    # cached per setting, so a rerun with other sizes never reuses a table of other clips
    ks = sorted({model.k_for(keep) for keep in keeps if keep < 1.0})  # every budget the table evaluates
    tag = f"k{''.join(map(str, ks))}" + (f"-maps{args.map_clips}" if args.skip_maps else "")
    made = tables(model, {"train": train, "val": val}, args.out, tag, ks)
    train_table, val_table = made["train"], made["val"]
    summary = {"train": table_summary(train_table), "val": table_summary(val_table)}
    fit = {"static": fit_strategy("static", model, train_table, val_table, FitConfig(), log=say)}
    if args.selector_from_static:
        model.strategy("selector").scorer.start_from(model.strategy("static").scorer.scores.detach())
    fit["selector"] = fit_strategy("selector", model, train_table, val_table, FitConfig(), log=say)
    model.save(args.out / "run", extra={"train": {"clips": len(train), "val_clips": len(val), "fit": fit,
                                                   "tables": summary, "data": str(en)}})
    say(f"run saved to {args.out / 'run'}")

    sets = {"asterisk-en-test": eval_set(model, test, keeps, args.batch_size, "en")}
    if args.unseen_test_clips:
        nl = sample(load_speech_items(args.data / "fillets-nl" / "test"), args.unseen_test_clips)
        sets["fillets-nl-test-unseen-voice"] = eval_set(model, nl, keeps, args.batch_size, "nl")
    result = {
        "rows": sets["asterisk-en-test"]["rows"],
        "layer_usage": sets["asterisk-en-test"]["layer_usage"],
        "sets": sets,
        "parity": {k: {m: x for m, x in v.items() if m not in ("predictions", "references")} for k, v in par.items()},
        "training": {"fit": fit, "tables": summary, "train_clips": len(train), "val_clips": len(val)},
        "conditions": {"threads": torch.get_num_threads(), "pad_to_window": True, "skip_maps": args.skip_maps,
                       "budget_conditioned": args.budget, "selector_from_static": args.selector_from_static,
                       "map_clips": args.map_clips if args.skip_maps else 0,
                       # the timings' conditions, as read: cores, and the 1-minute load average at start and end
                       "cpu_cores": os.cpu_count(), "load_avg_1m": [load_at_start, os.getloadavg()[0]]},
    }
    (args.out / "eval.json").write_text(json.dumps(result, indent=2))
    say(f"wrote {args.out / 'eval.json'}")
    for r in sorted(result["rows"], key=lambda r: (r["method"], -r["keep"])):
        say(f"{r['method']:>10} keep {r['keep']:.2f}: WER {r['wer']:.3f} CER {r['cer']:.3f} layers {r['mean_layers']:.2f} "
            f"enc {r['encoder_ms']:.0f} ms e2e {r['ms_per_example']:.0f} ms sets {r['distinct_layer_sets']}")


if __name__ == "__main__":
    main()
