"""Label tasks: prompt layouts, parsers, closed-set scores, one front-end pass, user tasks."""

import math
import zlib

import numpy as np
import pytest
import torch

from kimi_ops.audio import load_audio
from kimi_ops.engine.scoring import score_continuations
from kimi_ops.tasks import TASKS, ChoiceTask, GenerativeTask, get_task, register_task
from kimi_ops.tasks.base import compression_ratio
from kimi_ops.tasks.runner import label_files, merge_segments
from kimi_ops.tasks.text_cleanup import clean_text, is_looping
from tests import goldens

CLIP = goldens.INPUTS / "a06_speech_2p37s_16k.flac"


@pytest.fixture(scope="module")
def clip_encoding(engine):
    return engine.frontend.encode([load_audio(CLIP)])[0]


def expected_streams(instruction_ids, codes, sp, offset):
    """The reference layout (spec 5.1) for [user text, user audio], written out by hand."""
    n, q = len(codes), len(instruction_ids)
    audio = ([sp.user_msg_start] + [sp.text_blank] * q + [sp.media_begin]
             + [c + offset for c in codes] + [sp.media_end, sp.speech_ct, sp.msg_end,
                                              sp.assistant_msg_start])
    text = [sp.text_blank] + instruction_ids + [sp.text_blank] * (n + 5)
    mask = [False] * (q + 2) + [True] * n + [False] * 4
    return audio, text, mask


@pytest.mark.parametrize("spec", ["asr", "asr:en", "asr:zh", "caption", "emotion", "scene",
                                  "scene:tut2017", "sound_event", "sound_event:nonspeech7k"])
def test_task_prompt_streams_follow_reference_layout(engine, clip_encoding, spec):
    task = get_task(spec)
    prompt = engine.build_prompts([task.messages(clip_encoding)])[0]
    instruction = task.instruction if isinstance(task, GenerativeTask) else task.prompt_text
    audio, text, mask = expected_streams(engine.tokenizer.encode(instruction),
                                         clip_encoding.tokens.tolist(), engine.tokenizer.special,
                                         engine.config.kimia_token_offset)
    assert (prompt.audio_ids, prompt.text_ids, prompt.continuous_mask) == (audio, text, mask)


def test_choice_prompts_use_the_evaluation_format():
    assert get_task("emotion").prompt_text == (
        "Identify the predominant emotion in this speech.\nOptions:\n(A) neutral\n(B) joy\n"
        "(C) sadness\n(D) anger\n(E) surprise\n(F) fear\n(G) disgust\n.Answer with the option's "
        "letter from the given choices directly and only give the best option.")
    scene = get_task("scene:tut2017")
    assert len(scene.labels) == 15 and "(C) cafe or restaurant" in scene.prompt_text
    assert len(get_task("scene").labels) == 13
    assert get_task("sound_event").labels[3] == "Throat clearing"
    assert len(get_task("sound_event:nonspeech7k").labels) == 7


def test_task_options_are_validated():
    with pytest.raises(ValueError, match="unknown task"):
        get_task("mood")
    with pytest.raises(ValueError, match="label set"):
        get_task("scene:office")
    with pytest.raises(ValueError, match="language"):
        get_task("asr:fr")
    with pytest.raises(ValueError, match="question"):
        get_task("question")


@pytest.mark.parametrize("raw, cleaned", [
    ("", ""),
    ("<|im_kimia_text_blank|>", ""),
    ("  hello <|reserved_token_4|>world [EOS] ", "hello world"),
    ("你好 ， 世界 。", "你好， 世界。"),
    ("broken \ufffd\ufffd utf8\x02", "broken utf8"),
    ("unclosed <|im_media_begin tag", "unclosed <|im_media_begin tag"),
])
def test_clean_text(raw, cleaned):
    assert clean_text(raw) == cleaned


def test_loop_detection():
    assert is_looping([5, 6, 7] * 5)
    assert is_looping([1, 2] + [9] * 12)
    assert not is_looping([])
    assert not is_looping(list(range(40)))
    assert not is_looping([4, 4, 4])  # too short to call a loop


def test_asr_parser_flags():
    class Result:
        text_token_ids = [3, 4] * 10
        finish_reason = "length"

    fields = get_task("asr").parse("<|im_kimia_text_blank|> a b a b", Result())
    assert fields == {"transcript": "a b a b", "transcript_truncated": True,
                      "transcript_looped": True}
    Result.finish_reason, Result.text_token_ids = "stop", []
    assert get_task("asr").parse("", Result()) == {
        "transcript": "", "transcript_truncated": False, "transcript_looped": False}


def slow_logprob(engine, prompt, option):
    """One full forward per option, no cache: the continuation fed as decode steps would be."""
    sp = engine.tokenizer.special
    audio = prompt.audio_ids + [sp.text_blank] * (len(option) - 1)
    text = prompt.text_ids + option[:-1]
    mask = prompt.continuous_mask + [False] * (len(option) - 1)
    n = len(audio)
    with torch.inference_mode():
        out = engine.model(torch.tensor([audio]), torch.tensor([text]), torch.arange(n)[None],
                           torch.ones(1, n, dtype=torch.bool), None, torch.tensor([mask]),
                           prompt.features, with_mimo=False, last_only=False)
    logprobs = torch.log_softmax(out.text_logits[0].double(), dim=-1)
    return sum(logprobs[len(prompt) - 1 + k, t].item() for k, t in enumerate(option))


def test_option_scores_match_slow_computation(engine, clip_encoding):
    tasks = [get_task("emotion"), get_task("scene")]
    conversations = [t.messages(clip_encoding) for t in tasks]
    conversations.append(get_task("emotion").messages(str(goldens.INPUTS / "a02_chirp_3s_16k.wav")))
    labels = [list(tasks[0].labels), list(tasks[1].labels), list(tasks[0].labels)]
    scores = engine.score_options(conversations, labels, append_eos=True)  # multi-token options
    prompts = engine.build_prompts(conversations)
    eos = engine.tokenizer.special.text_eos
    for prompt, opts, sc in zip(prompts, labels, scores):
        assert math.isclose(sum(sc.probs), 1.0, abs_tol=1e-9)
        slow = [slow_logprob(engine, prompt, engine.tokenizer.encode(o) + [eos]) for o in opts]
        slow_probs = torch.softmax(torch.tensor(slow), dim=0).tolist()
        np.testing.assert_allclose(sc.probs, slow_probs, atol=1e-4)
        np.testing.assert_allclose(sc.logprobs, slow, atol=1e-3, rtol=1e-5)
        assert sc.best == opts[int(np.argmax(slow))]


def test_scoring_chunks_do_not_change_scores(engine, clip_encoding):
    task = get_task("scene")
    prompts = engine.build_prompts([task.messages(clip_encoding)] * 3)
    options = [[engine.tokenizer.encode(a) for a in task.answers()]] * 3
    sp = engine.tokenizer.special
    whole = score_continuations(engine.model, prompts, options, sp, max_rows=256)
    chunked = score_continuations(engine.model, prompts, options, sp, max_rows=13)
    np.testing.assert_allclose(whole, chunked, atol=1e-5)


def test_front_end_runs_once_per_segment_whatever_the_tasks(engine, monkeypatch):
    calls = []
    real_encode = engine.frontend.encode

    def counting_encode(wavs):
        calls.append(len(wavs))
        return real_encode(wavs)

    monkeypatch.setattr(engine.frontend, "encode", counting_encode)
    files = [goldens.INPUTS / "a01_tone_0p5s_16k.wav", goldens.INPUTS / "a04_mix_31s_16k.wav"]
    tasks = [get_task(t) for t in ("asr", "caption", "emotion", "scene", "sound_event")]
    rows = label_files(engine, files, tasks, max_new_tokens=4)
    # one call for five tasks: the tone is one (silent) segment; the 31 s mix, speech, a pause
    # and speech by voice activity
    assert calls == [4]
    assert [r["num_segments"] for r in rows] == [1, 3]
    assert rows[0]["speech_ratio"] == 0.0 and 0.5 < rows[1]["speech_ratio"] < 1.0
    for row in rows:
        for task in ("emotion", "scene", "sound_event"):
            assert math.isclose(sum(row[f"{task}_scores"].values()), 1.0, abs_tol=1e-6)
            assert row[task] == max(row[f"{task}_scores"], key=row[f"{task}_scores"].get)
        assert set(row["task_versions"]) == {"asr", "caption", "emotion", "scene", "sound_event"}


def test_label_files_from_the_package_takes_task_names_and_every_kind_of_source(engine):
    """`from kimi_ops import label_files`: task names (with their parameters) label as the task
    objects do; a path, its bytes and its samples give the same fields; a missing file is an
    error row, in its place."""
    import soundfile as sf

    from kimi_ops import label_files as exported

    assert exported is label_files
    samples, rate = sf.read(CLIP, dtype="float32")
    missing = goldens.INPUTS / "nope.wav"
    rows = exported(engine, [CLIP, CLIP.read_bytes(), (samples, rate), missing],
                    ["asr", "emotion"], max_new_tokens=4, language="en")
    (by_object,) = label_files(engine, [CLIP], [get_task("asr", language="en"),
                                                 get_task("emotion")], max_new_tokens=4)
    def same(row, expected):  # scores and signals: batches of other sizes round apart
        scores = row.pop("emotion_scores")
        assert scores == pytest.approx(expected.pop("emotion_scores"), abs=1e-6)
        for name in get_task("asr").signals[:2]:
            assert row.pop(name) == pytest.approx(expected.pop(name),
                                                  abs=goldens.fp32_logprob_tolerance())
        assert row == expected

    assert by_object["path"] == str(CLIP)
    same(dict(rows[0]), dict(by_object))
    for row in rows[1:3]:
        same(dict(row), {**by_object, "path": None})
    assert list(by_object["emotion_scores"]) == list(get_task("emotion").labels)
    assert by_object["task_versions"] == {"asr": get_task("asr", language="en").version,
                                          "emotion": get_task("emotion").version}
    assert rows[3]["path"] == str(missing) and rows[3]["error_kind"] == "not_found"
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        exported(engine, [CLIP], ["asr", "nope"])


def test_long_file_transcripts_join_and_scores_and_signals_average_by_duration():
    """Signals over a file: means weighted by duration and the minimum, over the segments
    that have a value (a silent one has none); the share of speech over all but errors."""
    task = ChoiceTask(name="tone", version="1", question="q", labels=("low", "high"))
    asr = get_task("asr")
    parts = [{"tone_scores": {"low": 0.9, "high": 0.1}, "transcript": "first",
              "transcript_truncated": False, "transcript_looped": False,
              "transcript_avg_logprob": -0.5, "transcript_min_logprob": -2.0,
              "transcript_compression_ratio": 1.0, "speech_ratio": 1.0},
             {"tone_scores": {"low": 0.0, "high": 1.0}, "transcript": "second",
              "transcript_truncated": True, "transcript_looped": False,
              "transcript_avg_logprob": -1.5, "transcript_min_logprob": -3.0,
              "transcript_compression_ratio": 2.0, "speech_ratio": 0.6},
             {"tone_scores": {"low": 0.5, "high": 0.5}, **asr.empty_fields(),
              "speech_ratio": 0.0, "status": "silent"},
             {"tone_scores": {"low": 0.5, "high": 0.5}, **asr.empty_fields(),
              "speech_ratio": 1.0, "status": "error"}]
    merged = merge_segments(parts, [300, 100, 100, 500], [task, asr])
    assert merged["transcript"] == "first second"
    assert merged["transcript_truncated"] is True and merged["transcript_looped"] is False
    assert merged["transcript_avg_logprob"] == pytest.approx((-0.5 * 300 - 1.5 * 100) / 400)
    assert merged["transcript_min_logprob"] == -3.0
    assert merged["transcript_compression_ratio"] == pytest.approx((300 + 2 * 100) / 400)
    assert merged["speech_ratio"] == pytest.approx((300 + 0.6 * 100) / 500)
    two = merge_segments(parts[:2], [300, 100], [task, asr])
    assert two["tone_scores"] == pytest.approx({"low": 0.675, "high": 0.325})
    assert two["tone"] == "low"
    silent = merge_segments(parts[2:3], [100], [asr])
    assert [silent[n] for n in asr.signals] == [None, None, None]
    assert merge_segments([{}], [0], [asr])["speech_ratio"] is None  # no segmenter value


def test_signals_are_named_after_the_first_text_field_and_read_from_the_generation():
    from kimi_ops.engine.generate import GenerationResult

    assert get_task("asr").signals == ("transcript_avg_logprob", "transcript_min_logprob",
                                       "transcript_compression_ratio")
    assert get_task("caption").signals[0] == "caption_avg_logprob"
    assert get_task("question", question="Who?").signals[2] == "answer_compression_ratio"
    assert get_task("asr").fields[-3:] == get_task("asr").signals
    result = GenerationResult(text_token_ids=[1, 2], audio_token_ids=[], finish_reason="stop",
                              prompt_tokens=9, steps=3, text="<|im_kimia_text_blank|> a b",
                              text_logprobs=[-0.5, -1.0, -0.1])
    fields = get_task("asr").segment_fields(result)
    assert fields["transcript"] == "a b"
    assert fields["transcript_avg_logprob"] == pytest.approx(-1.6 / 3)
    assert fields["transcript_min_logprob"] == -1.0
    assert fields["transcript_compression_ratio"] == compression_ratio("a b")
    empty = GenerationResult([], [], "length", 9, 0, text="")  # no step: no log-prob, no text
    assert [get_task("asr").segment_fields(empty)[n] for n in get_task("asr").signals] == [
        None, None, None]
    assert [get_task("asr").empty_fields()[n] for n in get_task("asr").signals] == [
        None, None, None]


def test_compression_ratio_is_whispers_repetition_signal():
    """UTF-8 bytes over zlib-compressed bytes: ordinary text stays under Whisper's 2.4, a loop
    goes far above it; an empty text has none."""
    plain = "The quick brown fox jumps over the lazy dog near the riverbank at dawn."
    looped = "thank you for watching " * 20
    assert 0 < compression_ratio(plain) < 2.4 < compression_ratio(looped)
    assert compression_ratio("你好，世界") == pytest.approx(15 / len(zlib.compress(
        "你好，世界".encode())))  # bytes, not characters
    assert compression_ratio("") is None


def test_user_registered_tasks_work_end_to_end(engine):
    register_task("speaker_count", lambda: ChoiceTask(
        name="speaker_count", version="sc-1", question="How many people speak?",
        labels=("none", "one", "several"), answer_style="label"), replace=True)
    register_task("shout", lambda: GenerativeTask(
        name="shout", version="sh-1", instruction="Repeat what is said, loudly.",
        parse=lambda text, result: {"shout": clean_text(text).upper()}, text_fields=("shout",)),
        replace=True)
    try:
        tasks = [get_task("speaker_count"), get_task("shout")]
        rows = label_files(engine, [CLIP, goldens.INPUTS / "nope.wav"], tasks, max_new_tokens=6)
        assert rows[0]["speaker_count"] in ("none", "one", "several")
        assert math.isclose(sum(rows[0]["speaker_count_scores"].values()), 1.0, abs_tol=1e-6)
        assert rows[0]["shout"] == rows[0]["shout"].upper()
        assert rows[0]["task_versions"] == {"speaker_count": "sc-1", "shout": "sh-1"}
        assert rows[1]["error_kind"] == "not_found"
        with pytest.raises(ValueError, match="already registered"):
            register_task("asr", lambda: None)
    finally:
        TASKS.pop("speaker_count", None)
        TASKS.pop("shout", None)


def test_silent_segments_skip_asr_but_keep_closed_set_scores(engine, monkeypatch):
    from kimi_ops.tasks.runner import label_waveforms

    sent = []
    real = engine.generate_batch

    def counting(conversations, **kwargs):
        sent.append(len(conversations))
        return real(conversations, **kwargs)

    monkeypatch.setattr(engine, "generate_batch", counting)
    silence = np.zeros(16000 * 3, dtype=np.float32)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000 * 2) / 16000)).astype(np.float32)
    tasks = [get_task("asr"), get_task("emotion")]
    # by voice activity a tone is no speech either: nothing goes to ASR
    label_waveforms(engine, [silence, tone], tasks, max_new_tokens=4)
    assert sent == []
    # by loudness the tone is not silent: only the tone goes to ASR
    rows = label_waveforms(engine, [silence, tone], tasks, max_new_tokens=4, segmenter="energy")
    assert sent == [1]
    assert rows[0]["transcript"] == "" and rows[0]["transcript_truncated"] is False
    assert rows[0]["transcript_avg_logprob"] is None  # no model call, no signal
    assert rows[1]["transcript_min_logprob"] <= rows[1]["transcript_avg_logprob"] <= 0
    assert math.isclose(sum(rows[0]["emotion_scores"].values()), 1.0, abs_tol=1e-6)
