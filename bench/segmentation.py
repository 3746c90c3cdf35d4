"""Segmentation: how much speech reaches the model, and how much noise, for each segmenter.

Recordings with known speech intervals (`bench/speech.py`: espeak-ng speech in steady noise at
20, 10 and 0 dB SNR, between music-like tones, and between stretches of digital silence) are cut
by both segmenters (`kimi_ops.audio.segmenters.cut`: "vad" and "energy"). For each it prints:

  speech recall   speech time inside segments sent to the model / all speech time
  noise sent      non-speech time farther than 0.5 s from any speech that is sent to the model /
                  all such time (the margin forgives padding at the edges of speech)
  model s / s     seconds sent to the model per second of audio
  VAD CPU s/h     CPU seconds the segmenter spends per audio hour (this process, one thread)

The targets (issue 20) are speech recall >= 0.95 and noise sent <= 0.20 on this material.

    python bench/segmentation.py [--recordings 3] [--seconds 60] [--out bench_output]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine import machine  # noqa: E402
from speech import RATE, Mixture, fitted  # noqa: E402

from kimi_ops.audio.segmenters import SEGMENTERS, cut  # noqa: E402

MARGIN_S = 0.5  # non-speech this close to speech is not counted as noise sent
TARGETS = {"speech_recall": 0.95, "noise_sent": 0.20}


def conditions(seconds: float) -> dict[str, dict]:
    """The material: name -> (layout, mixture keywords). Each holds speech and non-speech."""
    talk = [("pause", 4.0), ("speech", 4.0), ("pause", 6.0), ("speech", 6.0), ("pause", 9.0),
            ("speech", 3.0), ("pause", 5.0)]
    return {
        "speech in noise, SNR 20 dB": {"layout": talk, "snr_db": 20.0},
        "speech in noise, SNR 10 dB": {"layout": talk, "snr_db": 10.0},
        "speech in noise, SNR 0 dB": {"layout": talk, "snr_db": 0.0},
        "speech between tones": {"layout": [("tones", 6.0), ("speech", 5.0), ("tones", 8.0),
                                            ("speech", 5.0), ("tones", 6.0)], "snr_db": 20.0},
        "speech between silences": {"layout": [("silence", 5.0), ("speech", 5.0),
                                               ("silence", 10.0), ("speech", 5.0),
                                               ("silence", 5.0)], "snr_db": 20.0},
    }


def interval_mask(n: int, intervals) -> np.ndarray:
    mask = np.zeros(n, bool)
    for a, b in intervals:
        mask[a:b] = True
    return mask


def sent_counts(samples: int, sent, speech, margin_s: float = MARGIN_S) -> dict[str, int]:
    """Sample counts of a recording of `samples` whose `sent` intervals go to the model and whose
    `speech` intervals hold speech: speech, speech sent, non-speech farther than `margin_s` from
    any speech ("far") and of it sent, and all sent."""
    sent, talk = interval_mask(samples, sent), interval_mask(samples, speech)
    margin = int(margin_s * RATE)
    far = ~interval_mask(samples, [(max(0, a - margin), b + margin) for a, b in speech])
    return {"speech": int(talk.sum()), "speech_sent": int((sent & talk).sum()),
            "far": int(far.sum()), "far_sent": int((sent & far).sum()), "sent": int(sent.sum())}


def sent_shares(samples: int, sent, speech, margin_s: float = MARGIN_S) -> tuple[float, float]:
    """(speech recall, noise sent) of one recording: the shares of its speech and of its far
    non-speech (`sent_counts`) that are sent."""
    counts = sent_counts(samples, sent, speech, margin_s)
    return counts["speech_sent"] / counts["speech"], counts["far_sent"] / counts["far"]


def measure(mix: Mixture, segmenter: str) -> dict:
    """The numbers of one recording cut by one segmenter (sample counts, CPU seconds)."""
    started = time.process_time()
    segments = cut(mix.wave, segmenter)
    cpu_s = time.process_time() - started
    return {"samples": len(mix.wave), "cpu_s": cpu_s, "segments": len(segments),
            **sent_counts(len(mix.wave), [(s.start, s.end) for s in segments if not s.silent],
                          mix.speech)}


def summary(parts: list[dict]) -> dict:
    total = {k: sum(p[k] for p in parts) for k in parts[0]}
    hours = total["samples"] / RATE / 3600
    return {"speech_recall": total["speech_sent"] / max(total["speech"], 1),
            "noise_sent": total["far_sent"] / max(total["far"], 1),
            "model_s_per_s": total["sent"] / total["samples"],
            "cpu_s_per_audio_hour": total["cpu_s"] / hours,
            "audio_s": total["samples"] / RATE, "segments": total["segments"]}


def run(recordings: int = 3, seconds: float = 60.0) -> dict:
    torch.set_num_threads(1)
    cut(np.zeros(RATE, np.float32), "vad")  # load the VAD model before timing
    rows, overall = [], {s: [] for s in SEGMENTERS}
    for name, condition in conditions(seconds).items():
        mixes = [fitted(condition["layout"], seconds, snr_db=condition["snr_db"], seed=seed)
                 for seed in range(recordings)]
        for segmenter in SEGMENTERS:
            parts = [measure(mix, segmenter) for mix in mixes]
            overall[segmenter] += parts
            rows.append({"material": name, "segmenter": segmenter, **summary(parts)})
    for segmenter, parts in overall.items():
        rows.append({"material": "all", "segmenter": segmenter, **summary(parts)})
    return {"recordings_per_material": recordings, "seconds_each": seconds, "rows": rows,
            "margin_s": MARGIN_S, "targets": TARGETS}


def print_table(result: dict) -> None:
    print(f"\nsegmentation: {result['recordings_per_material']} recordings of "
          f"{result['seconds_each']:g} s per material; noise sent counts non-speech farther "
          f"than {result['margin_s']} s from speech")
    print(f"{'material':<28}{'segmenter':>10}{'speech recall':>15}{'noise sent':>12}"
          f"{'model s/s':>11}{'CPU s/h':>10}{'segments':>10}")
    for r in result["rows"]:
        print(f"{r['material']:<28}{r['segmenter']:>10}{r['speech_recall']:>15.3f}"
              f"{r['noise_sent']:>12.3f}{r['model_s_per_s']:>11.3f}"
              f"{r['cpu_s_per_audio_hour']:>10.1f}{r['segments']:>10}")
    print(f"targets: speech recall >= {TARGETS['speech_recall']}, noise sent <= "
          f"{TARGETS['noise_sent']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recordings", type=int, default=3, help="per material")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each recording")
    parser.add_argument("--out", default="bench_output")
    args = parser.parse_args()
    result = run(args.recordings, args.seconds)
    result["machine"] = machine()
    print_table(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "segmentation.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'segmentation.json'}")


if __name__ == "__main__":
    main()
