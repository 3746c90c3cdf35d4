"""Subtitle formats from timed transcript segments: SRT and WebVTT, pure functions (no I/O).

    to_srt([(0.0, 2.5, "hello there"), (2.5, 31.0, "a long segment ...")])  -> str
    to_webvtt(same cues)                                                    -> str

Input cues are `(start_s, end_s, text)` in playback order, typically one per transcribed segment
(up to 30 s of speech). Layout, shared by both formats (`layout`):

  * Text is normalised: whitespace runs (newlines included) become one space, ends stripped.
    A cue whose text is then empty is skipped (silent segments, empty transcripts).
  * Text is wrapped into lines of at most `LINE_CHARS` (42) characters, balanced: the fewest
    lines greedy word wrapping can reach, then the smallest line width that still gives that
    many lines, so a segment's lines have similar lengths instead of a long run and a stub.
    Words break at spaces; CJK characters (no spaces between words) may break between any two
    characters, except that punctuation stays on the line of the character before it; a single
    word longer than a line is cut.
  * Lines are grouped two by two into output cues, so a cue shows at most 2 lines, at most
    2 * 42 + 1 = 85 characters (the "~84 characters" of the usual subtitle guidelines).
  * Times inside a segment are interpolated in proportion to character offsets in the
    normalised text of length L: an output cue whose first character is at offset `a` starts
    at `start + (end - start) * a / L`; it ends where the next cue of the segment starts (the
    separating space counts to the earlier cue), the last one at the segment's `end`. So the
    pieces of a segment tile it exactly, without gaps or overlap, and the time is spread at a
    constant character rate over the segment (speech rate is not known per word).

Formats: SRT numbers cues from 1, times `HH:MM:SS,mmm`, no escaping. WebVTT starts with the
`WEBVTT` header, times `HH:MM:SS.mmm`, and cue text escapes `&`, `<` and `>` as `&amp;`,
`&lt;`, `&gt;` (so `-->`, which would end a WebVTT cue's text, becomes `--&gt;`). Hours are not
capped at 99. Times round to the millisecond; a negative time is clamped to 0 and an end before
its start is moved to the start.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import NamedTuple

LINE_CHARS = 42
LINES_PER_CUE = 2


class Cue(NamedTuple):
    start_s: float
    end_s: float
    text: str  # lines joined with "\n"


class _Token(NamedTuple):
    sep: str  # what joins it to the previous token on the same line: " " or ""
    text: str
    offset: int  # of its first character in the normalised text


_CJK = re.compile(r"[\u2e80-\u2fdf\u3040-\u30ff\u3100-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
                  r"\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002fa1f]")


def normalize_text(text: str | None) -> str:
    return " ".join((text or "").split())


def _is_punct(char: str) -> bool:
    return unicodedata.category(char)[0] == "P"


def _tokens(text: str, line_chars: int) -> list[_Token]:
    """Breakable units of normalised `text`, each with its separator and offset."""
    tokens: list[_Token] = []
    pos = 0
    for word in text.split(" "):
        sep = " " if tokens else ""
        start = pos
        pos += len(word) + 1
        # cut CJK runs into characters (punctuation stays with the character before it)
        pieces: list[tuple[int, str]] = []
        for i, char in enumerate(word):
            glued = bool(pieces) and (
                not (_CJK.match(char) or _CJK.match(word[i - 1]))  # a run of non-CJK
                or _is_punct(char)  # punctuation stays with what it follows
                or unicodedata.category(word[i - 1]) in ("Ps", "Pi"))  # "(" with what follows
            if glued:
                pieces[-1] = (pieces[-1][0], pieces[-1][1] + char)
            else:
                pieces.append((start + i, char))
        for j, (offset, piece) in enumerate(pieces):
            # a piece longer than a line is cut into line-sized parts
            for k in range(0, len(piece), line_chars):
                tokens.append(_Token(sep if (j == 0 and k == 0) else "", piece[k:k + line_chars],
                                     offset + k))
    return tokens


def _wrap(tokens: Sequence[_Token], width: int) -> list[list[_Token]]:
    """Greedy wrap: as many tokens per line as fit in `width` characters."""
    lines: list[list[_Token]] = []
    length = 0
    for token in tokens:
        extra = len(token.sep) + len(token.text)
        if lines and length + extra <= width:
            lines[-1].append(token)
            length += extra
        else:
            lines.append([token])
            length = len(token.text)
    return lines


def wrap_balanced(text: str, line_chars: int = LINE_CHARS) -> list[list[_Token]]:
    """The fewest lines of <= `line_chars` characters, as even as greedy wrapping makes them."""
    tokens = _tokens(text, line_chars)
    if not tokens:
        return []
    fewest = len(_wrap(tokens, line_chars))
    lo = max(math.ceil(len(text) / fewest), max(len(t.text) for t in tokens))
    for width in range(min(lo, line_chars), line_chars + 1):  # greedy line count falls with width
        lines = _wrap(tokens, width)
        if len(lines) <= fewest:
            return lines
    return _wrap(tokens, line_chars)


def split_cue(start_s: float, end_s: float, text: str | None, line_chars: int = LINE_CHARS,
              lines_per_cue: int = LINES_PER_CUE) -> list[Cue]:
    """One segment -> its output cues (layout and timing rules in the module docstring)."""
    norm = normalize_text(text)
    lines = wrap_balanced(norm, line_chars)
    if not lines:
        return []
    groups = [lines[i:i + lines_per_cue] for i in range(0, len(lines), lines_per_cue)]
    offsets = [group[0][0].offset for group in groups] + [len(norm)]
    offsets[0] = 0
    duration = end_s - start_s
    cues = []
    for g, group in enumerate(groups):
        body = "\n".join("".join(t.sep + t.text for t in line).lstrip() for line in group)
        t0 = start_s + duration * offsets[g] / len(norm)
        t1 = end_s if g == len(groups) - 1 else start_s + duration * offsets[g + 1] / len(norm)
        cues.append(Cue(t0, t1, body))
    return cues


def layout(cues: Iterable[tuple[float, float, str | None]]) -> list[Cue]:
    """Segment-level cues -> display cues (empty text skipped, long text split)."""
    out: list[Cue] = []
    for start_s, end_s, text in cues:
        out.extend(split_cue(float(start_s), float(end_s), text))
    return out


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000.0))


def format_timestamp(seconds: float, decimal: str) -> str:
    """`HH:MM:SS<decimal>mmm`, rounded to the millisecond; hours may exceed 99."""
    ms = _ms(seconds)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms:03d}"


def _times(cue: Cue, decimal: str) -> str:
    start = format_timestamp(cue.start_s, decimal)
    end = format_timestamp(max(cue.end_s, cue.start_s), decimal)
    return f"{start} --> {end}"


def to_srt(cues: Iterable[tuple[float, float, str | None]]) -> str:
    """SubRip: numbered blocks `N\\nHH:MM:SS,mmm --> HH:MM:SS,mmm\\ntext\\n`, blank-line separated.
    No cues -> the empty string."""
    blocks = [f"{n}\n{_times(cue, ',')}\n{cue.text}\n"
              for n, cue in enumerate(layout(cues), start=1)]
    return "\n".join(blocks)


def escape_webvtt(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_webvtt(cues: Iterable[tuple[float, float, str | None]]) -> str:
    """WebVTT: `WEBVTT` header, then `HH:MM:SS.mmm --> HH:MM:SS.mmm\\ntext\\n` blocks separated
    by blank lines; cue text escaped (`-->` can never appear in it)."""
    blocks = ["WEBVTT\n"] + [f"{_times(cue, '.')}\n{escape_webvtt(cue.text)}\n"
                             for cue in layout(cues)]
    return "\n".join(blocks)


# the files every recording's subtitles are: file suffix -> the text it holds
FORMATS = {".srt": to_srt, ".vtt": to_webvtt}
