#!/usr/bin/env python3
"""Word-timestamp accuracy of `lcasr transcribe --format json` against the
demo corpus's exact word timings.

Usage: word_timestamps.py <transcript dir> <reference dir>
For every <id>.json transcript in the first folder, the reference <id>.json
(data/demo/*/) gives the true word boundaries. Hypothesis and reference words
are aligned by longest matching runs (difflib); for every correctly recognised
word the start and end errors are collected. Prints the distribution.
Standard library only.
"""
import difflib
import json
import pathlib
import sys


def words(path, start_key="start", end_key="end"):
    data = json.loads(pathlib.Path(path).read_text())
    return [(w["word"].lower(), float(w[start_key]), float(w[end_key])) for w in data["words"]]


def main():
    hyp_dir, ref_dir = map(pathlib.Path, sys.argv[1:3])
    starts, ends = [], []
    matched = total = 0
    for hyp_file in sorted(hyp_dir.glob("*.json")):
        ref = words(ref_dir / hyp_file.name)
        hyp = words(hyp_file)
        total += len(ref)
        sm = difflib.SequenceMatcher(a=[w for w, _, _ in ref], b=[w for w, _, _ in hyp], autojunk=False)
        for block in sm.get_matching_blocks():
            for k in range(block.size):
                r, h = ref[block.a + k], hyp[block.b + k]
                starts.append(abs(h[1] - r[1]))
                ends.append(abs(h[2] - r[2]))
                matched += 1
    if not matched:
        print("no correctly recognised words to compare")
        return
    print(f"{matched} of {total} reference words recognised and aligned")
    for name, errs in (("start", starts), ("end", ends)):
        errs.sort()
        pct = lambda q: errs[min(len(errs) - 1, int(q * len(errs)))] * 1000
        within = sum(e <= 0.1 for e in errs) / len(errs) * 100
        print(
            f"{name}: median {pct(0.5):.0f} ms, 90th percentile {pct(0.9):.0f} ms, "
            f"max {errs[-1] * 1000:.0f} ms; {within:.0f}% within 100 ms"
        )
    both = sum(s <= 0.1 and e <= 0.1 for s, e in zip(starts, ends)) / matched * 100
    print(f"both boundaries within 100 ms: {both:.0f}% of recognised words")


if __name__ == "__main__":
    main()
