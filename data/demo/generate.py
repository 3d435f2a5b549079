#!/usr/bin/env python3
"""Generate the lcasr-rs demo corpus: synthetic English speech with exact word timings.

Every word is synthesised on its own with espeak-ng, resampled to 16 kHz mono with sox,
trimmed to its audible extent, and placed on a timeline with seeded random pauses. The
position of each word clip on that timeline is its exact start/end time. Recordings are
written as 16-bit FLAC (via the `flac` tool) next to a JSON file with the text and timings.

Usage: python3 data/demo/generate.py --out data/demo --seed 1

Requires Python 3 (standard library only) and the command-line tools espeak-ng, sox, flac.
"""

import argparse
import array
import concurrent.futures
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import wave

SAMPLE_RATE = 16000
# espeak-ng amplitude (default 100); a lower level makes the FLAC files about 10% smaller.
AMPLITUDE = 50
# Samples at or below this absolute value count as silence when trimming a word.
SILENCE_THRESHOLD = 32
# Seconds of audio kept on each side of the audible part of a word.
EDGE_MARGIN = 0.005

# ---------------------------------------------------------------------------
# Vocabulary (written for this corpus) and sentence templates.
# ---------------------------------------------------------------------------

NAMES = "anna ben clara david emma frank grace henry ivy jack kate leo mary nick olive peter rose sam tom lucy".split()
PEOPLE = "mother father sister brother uncle aunt friend teacher doctor farmer baker neighbour".split()
ANIMALS = [
    ("dog", "dogs"), ("cat", "cats"), ("horse", "horses"), ("cow", "cows"), ("bird", "birds"),
    ("duck", "ducks"), ("goat", "goats"), ("sheep", "sheep"), ("mouse", "mice"),
    ("rabbit", "rabbits"), ("fox", "foxes"), ("pig", "pigs"), ("owl", "owls"), ("frog", "frogs"),
    ("fish", "fish"),
]
THINGS = (
    "book cup ball box hat coat bag chair table lamp key letter basket boat bicycle bell clock "
    "door window bed spoon bottle map pen kite drum shoe blanket rope ladder"
).split()
FOODS = "bread milk apples cheese soup rice eggs honey cake tea carrots potatoes butter pears plums beans oranges jam".split()
PLACES = (
    "garden kitchen market river forest village school station harbour hill field park library "
    "bakery farm beach bridge road shop valley"
).split()
ADJECTIVES = (
    "big small old new red blue green yellow brown white black warm cold quiet loud clean heavy "
    "bright soft tall little round wet dry"
).split()
MOODS = "happy tired hungry busy calm proud sleepy cheerful".split()
PLACE_ADJECTIVES = "quiet busy green cold warm bright wet dry lovely peaceful".split()
# (base form, past form) of transitive verbs.
VERBS = [
    ("carry", "carried"), ("paint", "painted"), ("open", "opened"), ("mend", "mended"),
    ("clean", "cleaned"), ("find", "found"), ("bring", "brought"), ("take", "took"),
    ("buy", "bought"), ("sell", "sold"), ("fix", "fixed"), ("wash", "washed"), ("hold", "held"),
    ("push", "pushed"), ("pull", "pulled"), ("build", "built"), ("catch", "caught"),
    ("throw", "threw"), ("lift", "lifted"), ("move", "moved"), ("drop", "dropped"),
    ("hide", "hid"), ("keep", "kept"), ("borrow", "borrowed"),
]
ANIMAL_VERBS = [("watch", "watched"), ("follow", "followed"), ("feed", "fed"), ("see", "saw"), ("call", "called")]
MOTIONS = "went ran walked hurried rode travelled came".split()
DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
SEASONS = "spring summer autumn winter".split()
WEATHER = "sunny rainy windy cloudy foggy snowy".split()
NUMBERS = "two three four five six seven eight nine ten eleven twelve".split()
PAST_TIMES = [
    "in the morning", "in the evening", "at night", "after lunch", "before dinner", "yesterday",
    "last week", "at noon", "early today",
]
FUTURE_TIMES = ["tomorrow", "next week", "after school", "this evening", "on saturday", "later today", "soon"]
POSITIONS = "under near behind beside on in".split()
PRONOUNS = [("we", "our"), ("they", "their"), ("she", "her"), ("he", "his")]


def _template(rng):
    """Return one sentence (lower-case words separated by spaces) from a random template."""
    n, n2 = rng.sample(NAMES, 2)
    p = rng.choice(PEOPLE)
    a_sg, a_pl = rng.choice(ANIMALS)
    t, t2 = rng.sample(THINGS, 2)
    f, f2 = rng.sample(FOODS, 2)
    pl = rng.choice(PLACES)
    adj = rng.choice(ADJECTIVES)
    vb, vp = rng.choice(VERBS)
    avb, avp = rng.choice(ANIMAL_VERBS)
    pron, poss = rng.choice(PRONOUNS)
    choices = [
        f"{n} {vp} the {adj} {t} {rng.choice(PAST_TIMES)}",
        f"the {adj} {a_sg} {rng.choice(MOTIONS)} to the {pl}",
        f"my {p} bought some {f} at the {pl}",
        f"there were {rng.choice(NUMBERS)} {a_pl} near the {pl}",
        f"on {rng.choice(DAYS)} {pron} made a {t} for {poss} {p}",
        f"it was {rng.choice(WEATHER)} at the {pl} so {n} stayed at home",
        f"{n} and {n2} {rng.choice(MOTIONS)} to the {pl} {rng.choice(PAST_TIMES)}",
        f"the {p} will {vb} the {t} {rng.choice(FUTURE_TIMES)}",
        f"{n} likes {f} with {f2}",
        f"in {rng.choice(SEASONS)} the {pl} is very {rng.choice(PLACE_ADJECTIVES)}",
        f"the {t} was {rng.choice(POSITIONS)} the {t2}",
        f"{pron} {avp} the {a_sg} by the {pl}",
        f"{n} was {rng.choice(MOODS)} because the {t} was {adj}",
        f"please {vb} the {t} and put it in the {t2}",
        f"{n} gave {rng.choice(NUMBERS)} {rng.choice(['small', 'big', 'old', 'new'])} {t + 'es' if t == 'box' else t + 's'} to {n2}",
        f"the {p} has a {adj} book about a {a_sg}",
        f"{n} could not {vb} the {t} because it was too {rng.choice(['heavy', 'big', 'small', 'high', 'far'])}",
        f"after the rain the {a_pl} came out of the {pl}",
    ]
    return rng.choice(choices)


def make_sentences(rng, count, forbidden, vocab=None):
    """Draw `count` distinct sentences not in `forbidden`, using only `vocab` words if given."""
    out, seen = [], set(forbidden)
    while len(out) < count:
        s = _template(rng)
        if s not in seen and (vocab is None or set(s.split()) <= vocab):
            seen.add(s)
            out.append(s)
    return out


# ---------------------------------------------------------------------------
# Voices per split (espeak-ng language voice + variant). The two sets share nothing.
# ---------------------------------------------------------------------------

TRAIN_VOICES = ["en-us", "en-gb", "en-us+f3", "en-us+m3", "en-gb-x-rp+f2", "en-gb+m5", "en-029+f4", "en-us+m7"]
HELDOUT_VOICES = ["en-gb-scotland+f5", "en-us-nyc+m2", "en-gb-x-gbcwmd+f1", "en-gb-x-gbclan+m4"]


def synth_word(word, voice, speed, pitch):
    """Synthesise one word; return 16 kHz mono int16 samples trimmed to the audible part."""
    cmd = (
        f"espeak-ng -v {voice} -a {AMPLITUDE} -s {speed} -p {pitch} --stdout {word} | "
        f"sox -q -t wav - -t raw -e signed -b 16 -c 1 -r {SAMPLE_RATE} -D -"
    )
    raw = subprocess.run(cmd, shell=True, check=True, capture_output=True).stdout
    samples = array.array("h")
    samples.frombytes(raw[: len(raw) - len(raw) % 2])
    if sys.byteorder != "little":
        samples.byteswap()
    return trim(samples)


def trim(samples, threshold=SILENCE_THRESHOLD, margin=EDGE_MARGIN):
    """Cut leading/trailing samples quieter than `threshold`, keeping `margin` seconds of edge."""
    loud = [i for i, x in enumerate(samples) if abs(x) > threshold]
    if not loud:
        raise RuntimeError("espeak-ng produced silence")
    pad = int(margin * SAMPLE_RATE)
    lo = max(0, loud[0] - pad)
    hi = min(len(samples), loud[-1] + 1 + pad)
    return samples[lo:hi]


def build_recording(rng, sentences, voice, speed, pitch, clips):
    """Lay the word clips of `sentences` on a timeline; return (samples, word timings)."""
    audio = array.array("h", [0] * int(rng.uniform(0.2, 0.5) * SAMPLE_RATE))
    words = []
    for si, sentence in enumerate(sentences):
        if si > 0:
            audio.extend([0] * int(rng.uniform(0.30, 0.60) * SAMPLE_RATE))
        for wi, word in enumerate(sentence.split()):
            if wi > 0:
                audio.extend([0] * int(rng.uniform(0.05, 0.25) * SAMPLE_RATE))
            clip = clips[(word, voice, speed, pitch)]
            start = len(audio)
            audio.extend(clip)
            words.append({"word": word, "start": round(start / SAMPLE_RATE, 5),
                          "end": round(len(audio) / SAMPLE_RATE, 5)})
    audio.extend([0] * int(rng.uniform(0.2, 0.5) * SAMPLE_RATE))
    return audio, words


def plan_split(rng, name, n_rec, voices, forbidden, words_per_rec, vocab=None):
    """Decide text, voice, speed and pitch of each recording of one split.

    Sentences are added to a recording until it holds at least a randomly drawn number of
    words in `words_per_rec`; at espeak-ng's slowest-per-word rates this keeps every recording
    above 20 s, and the text never depends on the synthesised audio.
    """
    lo, hi = words_per_rec
    plans = []
    for i in range(n_rec):
        target = rng.randint(lo, hi)
        sentences = []
        while sum(len(s.split()) for s in sentences) < target:
            sentences += make_sentences(rng, 1, forbidden, vocab)
            forbidden = forbidden | {sentences[-1]}
        plans.append({
            "id": f"{name}-{i:03d}",
            "sentences": sentences,
            "voice": voices[i % len(voices)],
            "speed": rng.randint(140, 190),
            "pitch": rng.randint(30, 70),
            "pause_seed": rng.randrange(2**32),
        })
    return plans


def write_flac(path, samples, tmpdir):
    """Write int16 samples as 16-bit mono FLAC through a temporary WAV file."""
    wav_path = os.path.join(tmpdir, "tmp.wav")
    data = samples
    if sys.byteorder != "little":
        data = array.array("h", samples)
        data.byteswap()
    with wave.open(wav_path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(data.tobytes())
    subprocess.run(["flac", "--best", "--silent", "--force", "--no-seektable",
                    "-o", path, wav_path], check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (e.g. data/demo)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--train", type=int, default=12, help="number of train recordings")
    ap.add_argument("--heldout", type=int, default=4, help="number of heldout recordings")
    ap.add_argument("--words", default="42,46", help="min,max words per recording")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    for tool in ("espeak-ng", "sox", "flac"):
        if shutil.which(tool) is None:
            sys.exit(f"missing tool: {tool}")

    rng = random.Random(args.seed)
    wpr = tuple(int(x) for x in args.words.split(","))
    train = plan_split(rng, "train", args.train, TRAIN_VOICES, set(), wpr)
    train_sents = {s for p in train for s in p["sentences"]}
    train_vocab = {w for s in train_sents for w in s.split()}
    # Held-out sentences are new, but every held-out word also occurs in train.
    heldout = plan_split(rng, "heldout", args.heldout, HELDOUT_VOICES, train_sents, wpr, train_vocab)

    # Synthesise every distinct (word, voice, speed, pitch) once.
    keys = sorted({(w, p["voice"], p["speed"], p["pitch"])
                   for p in train + heldout for s in p["sentences"] for w in s.split()})
    clips = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as ex:
        for key, clip in zip(keys, ex.map(lambda k: synth_word(*k), keys)):
            clips[key] = clip

    with tempfile.TemporaryDirectory() as tmpdir:
        for split, plans in (("train", train), ("heldout", heldout)):
            d = os.path.join(args.out, split)
            os.makedirs(d, exist_ok=True)
            transcripts = []
            for p in plans:
                audio, words = build_recording(random.Random(p["pause_seed"]), p["sentences"],
                                               p["voice"], p["speed"], p["pitch"], clips)
                text = " ".join(p["sentences"])
                meta = {"text": text, "voice": p["voice"], "speed": p["speed"], "pitch": p["pitch"],
                        "duration": round(len(audio) / SAMPLE_RATE, 5), "words": words}
                write_flac(os.path.join(d, p["id"] + ".flac"), audio, tmpdir)
                with open(os.path.join(d, p["id"] + ".json"), "w", encoding="utf-8") as fh:
                    json.dump(meta, fh, indent=1)
                    fh.write("\n")
                transcripts.append(text)
                if not 20.0 <= meta["duration"] <= 120.0:
                    sys.exit(f"{p['id']}: duration {meta['duration']:.1f} s outside 20..120 s")
                print(f"{split}/{p['id']}: {meta['duration']:.1f} s, {len(words)} words, {p['voice']}")
            with open(os.path.join(d, "transcripts.txt"), "w", encoding="utf-8") as fh:
                fh.write("\n".join(transcripts) + "\n")


if __name__ == "__main__":
    main()
