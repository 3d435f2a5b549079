#!/usr/bin/env python3
"""Generate the lcasr-rs demo corpus: synthetic English speech with exact word timings.

Every word is synthesised on its own with espeak-ng, resampled to 16 kHz mono with sox,
trimmed to its audible extent, and placed on a timeline with seeded random pauses. The
position of each word clip on that timeline is its exact start/end time. Train recordings are
written as MP3 (via `lame`), held-out recordings as Ogg Vorbis (via `oggenc`), each next to a
JSON file with the text and timings.

Usage: python3 data/demo/generate.py --out data/demo --seed 1

Requires Python 3 (standard library only) and the command-line tools espeak-ng, sox, lame and
oggenc (Debian packages espeak-ng, sox, lame, vorbis-tools).
"""

import argparse
import array
import concurrent.futures
import glob
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import wave

SAMPLE_RATE = 16000
# espeak-ng amplitude (default 100). At half level the speech peaks near -6 dBFS, which
# leaves the lossy encoders headroom.
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
MONTHS = "january february march april may june july august september october november december".split()
COMPARATIVES = "taller older younger faster slower stronger quieter louder happier".split()
MEALS = "breakfast lunch dinner supper".split()
# (base form, past form) of verbs that take no object.
ACTIONS = [
    ("sing", "sang"), ("dance", "danced"), ("swim", "swam"), ("sleep", "slept"), ("laugh", "laughed"),
    ("wait", "waited"), ("play", "played"), ("work", "worked"), ("read", "read"), ("cook", "cooked"),
]


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
    act, act_past = rng.choice(ACTIONS)
    vb2, vp2 = rng.choice([v for v in VERBS if v[0] != vb])
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
        f"{n} is {rng.choice(COMPARATIVES)} than {n2}",
        f"first {pron} {vp} the {t} and then {pron} {vp2} the {t2}",
        f"the {a_sg} jumped over the {adj} {t} and ran to the {pl}",
        f"{n} wants to visit the {pl} in {rng.choice(MONTHS)}",
        f"my {p} lives next to the {pl} with {rng.choice(NUMBERS)} {a_pl}",
        f"how many {a_pl} can you see in the {pl}",
        f"{n} never eats {f} for {rng.choice(MEALS)}",
        f"the {p} said that the {pl} was closed on {rng.choice(DAYS)}",
        f"{n} likes to {act} in the {pl} when it is {rng.choice(WEATHER)}",
        f"the children {act_past} in the {pl} until {rng.choice(MEALS)}",
        f"do you know where {n} put the {adj} {t}",
        f"{n} forgot to {vb2} the {t} so {n2} did it {rng.choice(PAST_TIMES)}",
        f"every {rng.choice(DAYS)} the {p} {act_past} at the {pl}",
        f"the {a_pl} were {rng.choice(MOODS)} because {rng.choice(SEASONS)} had come",
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

# Train voices are every accent in TRAIN_ACCENTS with every variant in TRAIN_VARIANTS ("" is
# the accent's default voice). Held-out accents and variants occur nowhere in train.
TRAIN_ACCENTS = ["en-us", "en-gb", "en-gb-x-rp", "en-029"]
TRAIN_VARIANTS = ["", "+f2", "+f3", "+f4", "+m1", "+m3", "+m5", "+m6", "+m7", "+m8"]
HELDOUT_VOICES = ["en-gb-scotland+f5", "en-us-nyc+m2", "en-gb-x-gbcwmd+f1", "en-gb-x-gbclan+m4",
                  "en-gb-scotland+m2"]


def assign_voices(rng, voices, count):
    """Voices for `count` recordings: every voice once in a seeded order before any repeats."""
    out = []
    while len(out) < count:
        batch = list(voices)
        rng.shuffle(batch)
        out += batch
    return out[:count]


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


def plan_split(rng, name, voices, forbidden, words_per_rec, vocab=None):
    """Decide text, speed and pitch of one recording per entry of `voices`.

    Sentences are added to a recording until it holds at least a randomly drawn number of
    words in `words_per_rec`, scaled by the recording's speed over 160 words/min so that fast
    and slow recordings last about as long. The text never depends on the synthesised audio.
    """
    lo, hi = words_per_rec
    plans = []
    for i, voice in enumerate(voices):
        speed = rng.randint(140, 190)
        target = round(rng.randint(lo, hi) * speed / 160)
        sentences = []
        while sum(len(s.split()) for s in sentences) < target:
            sentences += make_sentences(rng, 1, forbidden, vocab)
            forbidden = forbidden | {sentences[-1]}
        plans.append({
            "id": f"{name}-{i:03d}",
            "sentences": sentences,
            "voice": voice,
            "speed": speed,
            "pitch": rng.randint(30, 70),
            "pause_seed": rng.randrange(2**32),
        })
    return plans


def write_wav(path, samples):
    """Write int16 samples as a 16-bit mono 16 kHz WAV file."""
    data = samples
    if sys.byteorder != "little":
        data = array.array("h", samples)
        data.byteswap()
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(data.tobytes())


# Train split: variable-bitrate MP3, 8-24 kbps, 16 kHz mono. LAME's default low-pass for this
# rate (about 5.8 kHz) is switched off so the whole 0-8 kHz band the features use survives.
# LAME stores its encoder delay and padding in the file, which the decoder trims (gapless).
MP3_ARGS = ["-m", "m", "--resample", "16", "-V", "5", "-b", "8", "-B", "24", "--lowpass", "8"]
# Held-out split: Ogg Vorbis at quality 0 (about 18 kbps for this audio). The stream serial
# number is fixed so that the output is reproducible.
OGG_QUALITY = "0"


def encode(path, samples, tmpdir, serial):
    """Encode int16 samples to `path`: MP3 for `.mp3`, Ogg Vorbis for `.ogg`."""
    wav_path = os.path.join(tmpdir, "tmp.wav")
    write_wav(wav_path, samples)
    if path.endswith(".mp3"):
        cmd = ["lame", "--quiet", *MP3_ARGS, wav_path, path]
    elif path.endswith(".ogg"):
        cmd = ["oggenc", "--quiet", "-q", OGG_QUALITY, "--serial", str(serial), "-o", path, wav_path]
    else:
        raise ValueError(f"no encoder for {path}")
    subprocess.run(cmd, check=True)


def remove_stale(directory, split):
    """Delete earlier generated files of `split` (any audio format) from `directory`."""
    for ext in ("flac", "mp3", "ogg", "json"):
        for path in glob.glob(os.path.join(directory, f"{split}-[0-9][0-9][0-9].{ext}")):
            os.remove(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (e.g. data/demo)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--train", type=int, default=60, help="number of train recordings")
    ap.add_argument("--heldout", type=int, default=5, help="number of heldout recordings")
    ap.add_argument("--words", default="44,49",
                    help="min,max words per recording at 160 words/min (scaled by speed)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    for tool in ("espeak-ng", "sox", "lame", "oggenc"):
        if shutil.which(tool) is None:
            sys.exit(f"missing tool: {tool}")

    rng = random.Random(args.seed)
    wpr = tuple(int(x) for x in args.words.split(","))
    train_voices = assign_voices(rng, [a + v for a in TRAIN_ACCENTS for v in TRAIN_VARIANTS], args.train)
    train = plan_split(rng, "train", train_voices, set(), wpr)
    train_sents = {s for p in train for s in p["sentences"]}
    train_vocab = {w for s in train_sents for w in s.split()}
    # Held-out sentences are new, but every held-out word also occurs in train.
    heldout_voices = assign_voices(rng, HELDOUT_VOICES, args.heldout)
    heldout = plan_split(rng, "heldout", heldout_voices, train_sents, wpr, train_vocab)

    # Synthesise every distinct (word, voice, speed, pitch) once.
    keys = sorted({(w, p["voice"], p["speed"], p["pitch"])
                   for p in train + heldout for s in p["sentences"] for w in s.split()})
    clips = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as ex:
        for key, clip in zip(keys, ex.map(lambda k: synth_word(*k), keys)):
            clips[key] = clip

    with tempfile.TemporaryDirectory() as tmpdir:
        for split, plans, ext in (("train", train, "mp3"), ("heldout", heldout, "ogg")):
            d = os.path.join(args.out, split)
            os.makedirs(d, exist_ok=True)
            remove_stale(d, split)
            transcripts, seconds, size = [], 0.0, 0
            for i, p in enumerate(plans):
                audio, words = build_recording(random.Random(p["pause_seed"]), p["sentences"],
                                               p["voice"], p["speed"], p["pitch"], clips)
                text = " ".join(p["sentences"])
                meta = {"text": text, "voice": p["voice"], "speed": p["speed"], "pitch": p["pitch"],
                        "duration": round(len(audio) / SAMPLE_RATE, 5), "words": words}
                if not 20.0 <= meta["duration"] <= 120.0:
                    sys.exit(f"{p['id']}: duration {meta['duration']:.1f} s outside 20..120 s")
                audio_path = os.path.join(d, f"{p['id']}.{ext}")
                encode(audio_path, audio, tmpdir, serial=i + 1)
                with open(os.path.join(d, p["id"] + ".json"), "w", encoding="utf-8") as fh:
                    json.dump(meta, fh, indent=1)
                    fh.write("\n")
                transcripts.append(text)
                seconds += meta["duration"]
                size += os.path.getsize(audio_path)
                print(f"{split}/{p['id']}: {meta['duration']:.1f} s, {len(words)} words, {p['voice']}")
            with open(os.path.join(d, "transcripts.txt"), "w", encoding="utf-8") as fh:
                fh.write("\n".join(transcripts) + "\n")
            print(f"{split}: {len(plans)} recordings, {seconds:.1f} s, {size} bytes of {ext}")


if __name__ == "__main__":
    main()
