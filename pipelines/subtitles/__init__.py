"""Subtitles (SRT and WebVTT) of transcribed recordings.

  formats  cue layout and timing, SRT and WebVTT text: pure functions
"""

from pipelines.subtitles.formats import Cue, split_cue, to_srt, to_webvtt

__all__ = ["Cue", "split_cue", "to_srt", "to_webvtt"]
