"""Summarise py-spy's folded stacks (``http_bench.py --profile``): where a server's time went.

``python backend/bench/folded.py STACKS.txt [FRAME ...]`` prints, for each FRAME (a
substring of a frame's function or file), the share of samples whose stack holds it
(inclusive), then the functions with the most samples of their own. Code run in
SQLAlchemy's greenlet bridge is sampled with stacks of its own (they start at the
bridged function), so inclusive shares count every sample wherever its stack starts.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path
from typing import Final

_FRAME: Final = re.compile(r"(?P<function>.*) \((?P<file>.*?):\d+\)$")


def _name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    file = match["file"].split("site-packages/")[-1].split("/src/")[-1]
    return f"{match['function']} ({file})"


def summarise(path: Path, frames: list[str], top: int) -> str:
    """Return the inclusive share of each of *frames* and the *top* own-sample functions."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        samples = int(count)
        total += samples
        names = [_name(frame) for frame in stack.split(";")]
        own[names[-1]] += samples
        for wanted in frames:
            if any(wanted in name for name in names):
                inclusive[wanted] += samples
    lines = [f"{path.name}: {total} samples", "inclusive:"]
    lines += [f"  {100 * inclusive[frame] / total:5.1f}%  {frame}" for frame in frames]
    lines.append("own:")
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    """Print the summary of one folded-stacks file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("stacks", type=Path)
    parser.add_argument("frames", nargs="*")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    print(summarise(args.stacks, args.frames, args.top))


if __name__ == "__main__":
    main()
