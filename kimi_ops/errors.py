"""The small exception family of kimi_ops.

Everything a caller can get wrong (a file, a message list, a checkpoint) raises a subclass of
`KimiError` whose message names the offending thing and the reason. `kind` is a stable,
machine-readable string that later stages write into error rows.
"""

from __future__ import annotations


class KimiError(Exception):
    """Base class: a clear, per-input failure (never a bug in kimi_ops itself).

    `decided_by_content`: the input's own bytes decide the failure, so the same input fails the
    same way every time (a rerun need not try it again until it changes)."""

    kind = "error"
    decided_by_content = False


class AudioError(KimiError):
    """An audio input that cannot be used. `source` names the file (or '<bytes>', '<waveform>')."""

    kind = "audio_error"
    decided_by_content = True

    def __init__(self, source: str, reason: str, kind: str | None = None):
        self.source = source
        self.reason = reason
        if kind is not None:
            self.kind = kind
        super().__init__(f"{source}: {reason}")


class AudioNotFoundError(AudioError):
    kind = "not_found"
    decided_by_content = False  # a file may appear


class AudioDecodeError(AudioError):
    kind = "undecodable"


class EmptyAudioError(AudioError):
    kind = "empty_audio"


class NonFiniteAudioError(AudioError):
    kind = "non_finite"


class UnsupportedSampleRateError(AudioDecodeError):
    """A sample rate outside the range decode accepts (a crafted or corrupt header)."""

    kind = "bad_sample_rate"


class AudioTooLongError(AudioError):
    """Longer than the decode's duration limit: refused from the header, before decoding."""

    kind = "too_long"
    decided_by_content = False  # the job's duration limit decides

    def __init__(self, source: str, reason: str, seconds: float, limit: float):
        super().__init__(source, reason)
        self.seconds, self.limit = seconds, limit  # the audio's duration, the limit it broke


class PromptError(KimiError):
    """A message list the model cannot take (unknown role or type, no audio, bad content)."""

    kind = "bad_prompt"


class InvalidArgumentError(KimiError, ValueError):
    """A call argument out of range or of the wrong type (a sampling setting, a device, a
    dtype); also a ValueError, as such mistakes usually are."""

    kind = "bad_argument"


class CheckpointError(KimiError):
    """A checkpoint that is missing, incomplete or has tensors of the wrong shape."""

    kind = "bad_checkpoint"


# Every kind kimi_ops raises for a per-input failure; error rows carry one of these (or one of
# the storage layer's kinds). Stable: renaming one is a breaking change of the output contract.
AUDIO_ERROR_KINDS = frozenset({
    AudioError.kind, AudioNotFoundError.kind, AudioDecodeError.kind, EmptyAudioError.kind,
    NonFiniteAudioError.kind, UnsupportedSampleRateError.kind, AudioTooLongError.kind,
})


def _subclasses(cls: type) -> list[type]:
    return [cls] + [s for sub in cls.__subclasses__() for s in _subclasses(sub)]


def content_error_kinds() -> frozenset[str]:
    """The kinds of the failures an input's bytes decide (`KimiError.decided_by_content`):
    `undecodable`, `empty_audio`, `non_finite`, `bad_sample_rate`, `audio_error`."""
    return frozenset(c.kind for c in _subclasses(KimiError) if c.decided_by_content)
