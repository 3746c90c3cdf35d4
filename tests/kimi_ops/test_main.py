"""The command-line contract of `python -m kimi_ops ...`: its `main`, in this process (the
model loads in a second, not a new interpreter's four); `python -m kimi_ops` itself runs in a
subprocess where that is the point (a closed pipe)."""

import json
import subprocess
import sys

import pytest

from tests import goldens

GEN_CASES = list(goldens.load_json("generation.json"))


def kimi(*args, check=True):
    """`python -m kimi_ops ARGS`: (returncode, stdout, stderr) of its `main` here."""
    import contextlib
    import io
    import types

    from kimi_ops.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
    proc = types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


@pytest.fixture(scope="module")
def inputs_dir(tmp_path_factory):
    """A folder with the golden inputs linked in, so messages can use relative paths."""
    folder = tmp_path_factory.mktemp("inputs")
    for f in goldens.INPUTS.iterdir():
        (folder / f.name).symlink_to(f)
    return folder


def test_generate_single_matches_reference(inputs_dir):
    case = "multiturn"
    messages = inputs_dir / "multiturn.json"
    messages.write_text(json.dumps(goldens.prompts()[case]["messages"]))
    out = json.loads(kimi("generate", "--model", goldens.CHECKPOINT, "--messages", messages,
                          "--max-new-tokens", 24).stdout)
    expected = goldens.load_json("generation.json")[case]
    assert out["text_token_ids"] == expected["text_tokens_from_generate_loop"]
    assert out["text"] == expected["decoded_text"]


def test_generate_batch_matches_reference_for_every_case(inputs_dir):
    messages = inputs_dir / "all.json"
    messages.write_text(json.dumps([goldens.prompts()[c]["messages"] for c in GEN_CASES]))
    out = json.loads(kimi("generate", "--model", goldens.CHECKPOINT, "--messages", messages,
                          "--batch", "--max-new-tokens", 24).stdout)
    expected = goldens.load_json("generation.json")
    assert [o["text_token_ids"] for o in out] == [
        expected[c]["text_tokens_from_generate_loop"] for c in GEN_CASES]


def test_audio_tokens_match_reference():
    files = sorted(goldens.INPUTS.iterdir())
    lines = kimi("audio-tokens", "--model", goldens.CHECKPOINT, *files).stdout.splitlines()
    expected = goldens.load_json("audio_tokens.json")
    assert len(lines) == len(files)
    for f, line in zip(files, lines):
        row = json.loads(line)
        assert row["path"] == str(f)
        assert row["tokens"] == expected["inputs"][goldens.stem(f.name)]["vq_codes"], f.name


def test_label_reports_bad_files_and_labels_the_rest(tmp_path):
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio at all" * 10)
    good = goldens.INPUTS / "a01_tone_0p5s_16k.wav"
    long = goldens.INPUTS / "a04_mix_31s_16k.wav"
    proc = kimi("label", "--model", goldens.CHECKPOINT, "--max-new-tokens", 8,
                "--tasks", "asr,caption,emotion,scene", "--language", "en",
                good, junk, tmp_path / "gone.wav", long, check=False)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["path"] for r in rows] == [str(good), str(junk), str(tmp_path / "gone.wav"),
                                         str(long)]
    # the 31 s mix by voice activity: speech, a pause, speech
    for row, seconds, segments in ((rows[0], 0.5, 1), (rows[3], 31.0, 3)):
        assert row["duration_s"] == pytest.approx(seconds) and row["num_segments"] == segments
        assert isinstance(row["transcript"], str) and isinstance(row["caption"], str)
        for task, size in (("emotion", 7), ("scene", 13)):
            assert len(row[f"{task}_scores"]) == size
            assert sum(row[f"{task}_scores"].values()) == pytest.approx(1.0)
            assert row[task] in row[f"{task}_scores"]
        assert row["task_versions"] == {"asr": "asr-1", "caption": "caption-1",
                                        "emotion": "emotion-1", "scene": "scene-1-cochlscene"}
    assert rows[1]["error_kind"] == "undecodable" and "junk.wav" in rows[1]["error"]
    assert rows[2]["error_kind"] == "not_found" and "gone.wav" in rows[2]["error"]
    assert proc.returncode == 1


def test_bad_messages_file_is_a_clear_error(tmp_path):
    messages = tmp_path / "m.json"
    messages.write_text(json.dumps([{"role": "narrator", "message_type": "text", "content": "x"}]))
    proc = kimi("generate", "--model", goldens.CHECKPOINT, "--messages", messages, check=False)
    assert proc.returncode == 2
    assert "unknown role 'narrator'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_batch_errors_count_conversations_from_one(tmp_path):
    audio = [{"role": "user", "message_type": "audio", "content": "clip.wav"}]
    text_only = [{"role": "user", "message_type": "text", "content": "no audio here"}]
    cases = {
        "text_only.json": ([audio, audio, text_only], "text_only.json: conversation 3 of 3, "
                           "messages: Kimi-Audio needs at least one audio message"),
        "not_a_list.json": ([audio, {"role": "user"}], "not_a_list.json: conversation 2 of 2: "
                            "with --batch each item must be a message list, got dict"),
    }
    for name, (batch, expected) in cases.items():
        messages = tmp_path / name
        messages.write_text(json.dumps(batch))
        proc = kimi("generate", "--batch", "--model", goldens.CHECKPOINT, "--messages", messages,
                    check=False)
        assert proc.returncode == 2 and proc.stderr == f"error: {tmp_path / expected}\n"
    single = tmp_path / "single.json"
    single.write_text(json.dumps(text_only))
    proc = kimi("generate", "--model", goldens.CHECKPOINT, "--messages", single, check=False)
    assert proc.stderr == f"error: {single}: Kimi-Audio needs at least one audio message\n"


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    proc = kimi("audio-tokens", "--model", tmp_path / "nope", "x.wav", check=False)
    assert proc.returncode == 2 and "checkpoint folder not found" in proc.stderr


def test_a_reader_that_goes_away_ends_python_m_kimi_ops_quietly():
    """`python -m kimi_ops audio-tokens ... | head -1`: exit 141 (SIGPIPE), no traceback."""
    import os

    clip = goldens.INPUTS / "a01_tone_0p5s_16k.wav"
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "kimi_ops", "audio-tokens", "--model",
                               str(goldens.CHECKPOINT), str(clip), str(clip)],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert proc.returncode == 141, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_label_prints_a_batch_of_files_at_a_time(monkeypatch, capsys):
    """With --max-batch-size 1 each file's line is out before the next file is labelled (the
    lines used to come all at once at the end)."""
    import kimi_ops.tasks.runner as runner
    from kimi_ops.__main__ import main

    good = str(goldens.INPUTS / "a01_tone_0p5s_16k.wav")
    printed_before: list[int] = []
    real = runner.label_files
    seen = []

    def label_files(engine, files, *args, **kwargs):
        seen.extend(capsys.readouterr().out.splitlines())
        printed_before.append(len(seen))
        return real(engine, files, *args, **kwargs)

    monkeypatch.setattr(runner, "label_files", label_files)
    assert main(["label", "--model", str(goldens.CHECKPOINT), "--max-new-tokens", "2",
                 "--max-batch-size", "1", good, good, good]) == 0
    seen.extend(capsys.readouterr().out.splitlines())
    assert printed_before == [0, 1, 2] and len(seen) == 3
    assert all(json.loads(line)["path"] == good for line in seen)


def test_make_tiny_checkpoint_never_writes_over_other_files(tmp_path):
    real = tmp_path / "Kimi-Audio-7B-Instruct"
    real.mkdir()
    (real / "model-00001-of-00036.safetensors").write_bytes(b"real weights")
    proc = kimi("make-tiny-checkpoint", real, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "holds other files (not a tiny checkpoint); refusing" in proc.stderr
    assert sorted(p.name for p in real.iterdir()) == ["model-00001-of-00036.safetensors"]
    out = tmp_path / "tiny"
    kimi("make-tiny-checkpoint", out)
    kimi("make-tiny-checkpoint", out, "--seed", 1)  # an earlier tiny checkpoint: rewritten
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    proc = kimi("make-tiny-checkpoint", not_a_folder, check=False)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {not_a_folder}: exists and is not a folder\n"
    proc = kimi("make-tiny-checkpoint", out, "--seed", "-1", check=False)
    assert proc.returncode == 2 and "argument --seed: must be >= 0, got -1" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--text-temperature", "nan"], "error: text_temperature must be finite, got nan"),
    (["--device", "tpu"], "error: device 'tpu' is not a device name (cpu, cuda, cuda:1, ...)"),
])
def test_bad_generation_options_are_one_line_and_exit_2(inputs_dir, args, message):
    messages = inputs_dir.parent / "bad_options.json"
    messages.write_text(json.dumps([
        {"role": "user", "message_type": "audio",
         "content": str(goldens.INPUTS / "a01_tone_0p5s_16k.wav")}]))
    proc = kimi("generate", "--model", goldens.CHECKPOINT, "--messages", messages,
                "--max-new-tokens", 2, *args, check=False)
    assert proc.returncode == 2 and proc.stderr == message + "\n"


def test_make_tiny_checkpoint_takes_its_folder_as_output_too(tmp_path, capsys):
    """`--output DIR`, as the pipeline's commands take their output, or the positional OUT; one
    folder, not two different ones, and not none."""
    from kimi_ops.__main__ import main

    assert main(["make-tiny-checkpoint", "--output", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "config.json").is_file()
    assert main(["make-tiny-checkpoint", str(tmp_path / "b"), "--output",
                 str(tmp_path / "c")]) == 2
    assert main(["make-tiny-checkpoint"]) == 2
    assert "name one folder to write (OUT or --output)" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
