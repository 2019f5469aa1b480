"""The command line as a user runs it: `callspeak serve` and `callspeak dial` as processes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from callspeak.cli import main
from callspeak.testing.processes import wait_until_listening

CALLSPEAK = [sys.executable, "-m", "callspeak.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def served() -> Iterator[int]:
    port = free_port()
    env = {
        **os.environ,
        "CALLSPEAK_PORT": str(port),
        "CALLSPEAK_LOG_LEVEL": "warning",
        "CALLSPEAK_VALIDATE_SIGNATURES": "false",  # local use, as the README shows
    }
    env.pop("DEEPGRAM_API_KEY", None)
    proc = subprocess.Popen([*CALLSPEAK, "serve"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_listening(proc, port, timeout=30)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()


def test_serve_and_dial_write_a_wav_of_the_sentence(served: int, tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    result = subprocess.run(
        [
            *CALLSPEAK,
            "dial",
            f"ws://127.0.0.1:{served}/twilio",
            "--param",
            "say=Your code is 4 7 1 1",
            "--wav",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "time to first audio" in result.stdout and "0 warnings" in result.stdout
    last = result.stdout.splitlines()[-1]
    assert last.startswith(f"wrote {out}: ") and last.endswith(" s of speech"), last
    raw = out.read_bytes()
    assert raw[:4] == b"RIFF" and raw.count(b"RIFF") == 1  # one header: ours, not the voice's
    with wave.open(str(out)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (8000, 1, 2)
        samples = np.frombuffer(wav.readframes(wav.getnframes()), np.int16).astype(np.float64)
    frames = samples[: len(samples) // 160 * 160].reshape(-1, 160)
    loud = np.sqrt((frames**2).mean(axis=1)) > 500
    # About 1.5–2.5 s of speech, not silence-only, and not noise-only either: speech has pauses
    # between words, so a good share of 20 ms frames is quiet while the voiced ones are loud.
    assert 1.2 < loud.sum() * 0.02 < 3.0
    assert 0.1 < loud.mean() < 0.95
    spectrum = np.abs(np.fft.rfft(samples))
    freqs = np.fft.rfftfreq(len(samples), 1 / 8000)
    # Voice energy sits mostly below 1 kHz; white noise would spread evenly to 4 kHz.
    assert spectrum[freqs < 1000].sum() > spectrum[freqs >= 1000].sum()


def test_bad_usage_is_reported_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dial", "ws://x/twilio", "--param", "novalue"]) == 2
    assert "--param takes name=value" in capsys.readouterr().err
    assert main(["serve", "--port", "99999"]) == 2
    assert "invalid setting" in capsys.readouterr().err


def test_demo_refuses_a_notice_its_call_would_never_hear(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The demo dials the stream directly: no TwiML is fetched, so a <Say> notice is never said.
    from callspeak.cli import _build_parser

    with pytest.raises(SystemExit) as refused:
        _build_parser().parse_args(["demo", "--notice", "Connecting."])
    assert refused.value.code == 2
    assert "unrecognized arguments: --notice" in capsys.readouterr().err
    assert _build_parser().parse_args(["serve", "--notice", "Connecting."]).notice == "Connecting."


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from callspeak.cli import _build_parser, _settings_from

    monkeypatch.setenv("CALLSPEAK_GREETING", "from env")
    monkeypatch.setenv("CALLSPEAK_PORT", "6001")
    args = _build_parser().parse_args(["serve", "--port", "7002"])
    settings = _settings_from(args)
    assert settings.greeting == "from env" and settings.port == 7002


def test_log_level_flag_is_taken_in_any_case() -> None:
    from callspeak.cli import _build_parser, _settings_from

    args = _build_parser().parse_args(["serve", "--log-level", "DEBUG", "--log-format", "JSON"])
    settings = _settings_from(args)
    assert (settings.log_level, settings.log_format) == ("debug", "json")


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    """What a failed command printed: one line on stderr (no traceback), nothing on stdout."""
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("public_url", "message"),
    [
        ("https://", "names no host"),
        ("https://example.com:abc", "port from 1 to 65535"),
        ("http://127.0.0.1:5000", "must start with https://"),
    ],
)
def test_serve_refuses_a_public_url_twilio_cannot_use_in_one_line(
    public_url: str,
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "t0ken")
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("the server started"))
    assert main(["serve", "--public-url", public_url]) == 2
    err = one_line_error(capsys)
    assert err.startswith("callspeak: invalid setting: public_url") and message in err


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "CALLSPEAK_DEEPGRAM_WS_URL",
            "http://127.0.0.1:5711",
            "deepgram_ws_url (CALLSPEAK_DEEPGRAM_WS_URL, --deepgram-ws-url) 'http://",
        ),
        (
            "CALLSPEAK_DEEPGRAM_URL",
            "api.deepgram.com",
            "deepgram_url (CALLSPEAK_DEEPGRAM_URL, --deepgram-url) 'api.deepgram.com'",
        ),
    ],
)
def test_serve_refuses_a_deepgram_url_in_one_line(
    variable: str,
    value: str,
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An http:// WebSocket URL was a websockets InvalidURI traceback; a URL without a scheme
    started a server on which every call failed."""
    monkeypatch.setenv("DEEPGRAM_API_KEY", "k")
    monkeypatch.setenv(variable, value)
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("the server started"))
    tts = "deepgram-ws" if variable.endswith("WS_URL") else "deepgram"
    assert main(["serve", "--tts", tts, "--no-validate-signatures", "--port", "0"]) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"callspeak: invalid setting: {message}"), err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--tts", "deepgram"], "the deepgram voice needs DEEPGRAM_API_KEY to be set"),
        (["serve", "--tts", "deepgram-ws"], "needs DEEPGRAM_API_KEY"),
        (["serve", "--piper-model", "/nonexistent/voice.onnx"], "is not a file"),
        (["demo", "--tts", "deepgram"], "needs DEEPGRAM_API_KEY"),
    ],
)
def test_a_voice_that_cannot_be_built_is_refused_in_one_line(
    args: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("DEEPGRAM_API_KEY", raising=False)
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("the server started"))
    serving = [*args, "--no-validate-signatures", "--port", "0"]
    assert main(serving if args[0] == "serve" else args) == 2
    err = one_line_error(capsys)
    assert err.startswith("callspeak: ") and message in err


def test_a_port_in_use_is_refused_in_one_line_before_the_voice_loads(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    built: list[object] = []
    monkeypatch.setattr("callspeak.server.create_app", lambda *a, **k: built.append(a))
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("the server started"))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--no-validate-signatures", "--port", str(port)]) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"callspeak: cannot listen on 127.0.0.1:{port}: Address already in use")
    assert built == []  # refused before the app (and its voice) was made


def test_a_settings_error_without_a_field_has_no_made_up_prefix(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("the server started"))
    assert main(["serve", "--no-validate-signatures", "--certfile", "/tmp/cert.pem"]) == 2
    err = one_line_error(capsys)
    assert err.startswith("callspeak: invalid setting: certfile and keyfile go together"), err


def test_dial_reports_bad_input_in_one_line_with_a_usage_exit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"ws://127.0.0.1:{free_port()}/twilio"
    assert main(["dial", url, "--header", "novalue"]) == 2
    assert "--header takes name=value, not 'novalue'" in one_line_error(capsys)
    assert main(["dial", url, "--dtmf", "1.5:12x"]) == 2
    assert "'x' is no key Twilio reports" in one_line_error(capsys)
    assert main(["dial", url, "--dtmf", "soon:1"]) == 2
    assert "--dtmf takes SECONDS:DIGITS, not 'soon:1'" in one_line_error(capsys)
    assert main(["dial", url, "--audio", str(tmp_path / "missing.wav")]) == 2
    assert "cannot use --audio" in one_line_error(capsys)
    (tmp_path / "notes.wav").write_text("not audio")
    assert main(["dial", url, "--audio", str(tmp_path / "notes.wav")]) == 2
    assert "not a RIFF/WAVE stream" in one_line_error(capsys)
    assert main(["dial", url.replace("ws://", "http://")]) == 2
    assert "dial takes a ws:// or wss:// URL" in one_line_error(capsys)
    assert main(["dial", url, "--dtmf", "nan:1"]) == 2
    assert "--dtmf takes SECONDS:DIGITS, not 'nan:1'" in one_line_error(capsys)


@pytest.mark.parametrize("flag", ["--audio-at", "--duration", "--quiet"])
@pytest.mark.parametrize("value", ["nan", "inf", "-1", "soon"])
def test_dial_refuses_seconds_that_are_not_a_time_before_calling(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """nan and inf parsed as floats and failed with a traceback once the call was under way;
    -1 started the caller's audio a second into the file."""
    url = f"ws://127.0.0.1:{free_port()}/twilio"  # nothing listens: the refusal comes first
    with pytest.raises(SystemExit) as exited:
        main(["dial", url, f"{flag}={value}"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err and repr(value) in err and "Traceback" not in err


def test_dial_reports_an_unreachable_server_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"ws://127.0.0.1:{free_port()}/twilio"  # nothing listens there
    assert main(["dial", url]) == 1
    assert f"callspeak: the call to {url} failed:" in one_line_error(capsys)


def test_dial_reports_a_wav_it_cannot_write_after_the_call(served: int, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *CALLSPEAK,
            "dial",
            f"ws://127.0.0.1:{served}/twilio",
            "--param",
            "say=Hi.",
            "--wav",
            str(tmp_path / "no" / "such" / "dir.wav"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "time to first audio" in result.stdout  # the call itself went through
    # (Under PYTHONASYNCIODEBUG, as make test runs, asyncio's slow-callback lines come first.)
    assert "callspeak: cannot write --wav" in result.stderr
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr
    assert "No such file or directory" in result.stderr


def _tls_files(directory: Path) -> dict[str, Path]:
    """A certificate and its key, another certificate's key, junk and an encrypted key."""
    from callspeak.testing.certificates import self_signed_certificate

    (directory / "a").mkdir()
    (directory / "b").mkdir()
    cert, key = self_signed_certificate(directory / "a")
    _, other_key = self_signed_certificate(directory / "b")
    junk = directory / "junk.pem"
    junk.write_text("not a PEM file\n")
    encrypted = directory / "encrypted.pem"
    subprocess.run(
        [
            "openssl",
            "pkey",
            "-in",
            str(key),
            "-aes256",
            "-passout",
            "pass:x",
            "-out",
            str(encrypted),
        ],
        check=True,
        capture_output=True,
    )
    return {"cert": cert, "key": key, "other_key": other_key, "junk": junk, "encrypted": encrypted}


@pytest.mark.parametrize(
    ("cert", "key", "message"),
    [
        ("/nonexistent/cert.pem", "key", "cannot read TLS file '/nonexistent/cert.pem': No such "
         "file or directory (CALLSPEAK_CERTFILE / --certfile)"),
        ("cert", "/nonexistent/key.pem", "cannot read TLS file '/nonexistent/key.pem': No such "
         "file or directory (CALLSPEAK_KEYFILE / --keyfile)"),
        ("junk", "key", "holds no PEM certificate (CALLSPEAK_CERTFILE / --certfile)"),
        ("key", "cert", "holds no PEM certificate (CALLSPEAK_CERTFILE / --certfile)"),
        ("cert", "junk", "holds no PEM private key (CALLSPEAK_KEYFILE / --keyfile)"),
        ("cert", "other_key", "is not the key of the certificate"),
        ("cert", "encrypted", "is encrypted and callspeak cannot ask for its pass phrase"),
    ],
)  # fmt: skip
def test_tls_files_that_cannot_serve_are_refused_in_one_line_before_the_voice_loads(
    cert: str,
    key: str,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A missing file was a 31-line FileNotFoundError traceback from uvicorn once the voice had
    loaded; a junk one ``ssl.SSLError: PEM lib``."""
    files = _tls_files(tmp_path)
    built: list[object] = []
    monkeypatch.setattr("callspeak.server.create_app", lambda *a, **k: built.append(a))
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("the server started"))
    monkeypatch.setenv("CALLSPEAK_CERTFILE", str(files.get(cert, cert)))
    monkeypatch.setenv("CALLSPEAK_KEYFILE", str(files.get(key, key)))
    assert main(["serve", "--no-validate-signatures", "--port", "0"]) == 2
    err = one_line_error(capsys)
    assert err.startswith("callspeak: ") and message in err, err
    assert built == []
    # The same pair through the flags, and a good pair passes the check.
    monkeypatch.setattr("callspeak.cli.uvicorn_options", lambda settings, app: {})
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: None)
    assert main(["serve", "--no-validate-signatures", "--port", "0", "--certfile",
                 str(files["cert"]), "--keyfile", str(files["key"])]) == 0  # fmt: skip
    assert len(built) == 1


def test_demo_dials_its_own_server_without_tls_whatever_the_environment_says(
    tmp_path: Path,
) -> None:
    """The demo took CALLSPEAK_CERTFILE / CALLSPEAK_KEYFILE from the environment (it has no
    flags for them) and crashed starting its loopback server, or dialled an https:// URL."""
    env = {**os.environ, "CALLSPEAK_CERTFILE": "/nonexistent/cert.pem"}
    env["CALLSPEAK_KEYFILE"] = "/nonexistent/key.pem"
    env.pop("DEEPGRAM_API_KEY", None)
    out = tmp_path / "demo.wav"
    result = subprocess.run(
        [*CALLSPEAK, "demo", "--say", "Hi.", "--wav", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and out.is_file()


def test_serve_refuses_a_piper_model_without_its_config_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from callspeak.tts.piper import bundled_voice_paths

    model = tmp_path / "joe.onnx"
    shutil.copy(bundled_voice_paths()[0], model)
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("the server started"))
    serving = ["serve", "--piper-model", str(model), "--no-validate-signatures", "--port", "0"]
    assert main(serving) == 2  # (port 0: the default, 5000, may be another program's)
    err = one_line_error(capsys)
    assert err.startswith(f"callspeak: piper_model {str(model)!r} has no 'joe.onnx.json'"), err


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_a_voice_that_cannot_start_is_refused_in_one_line(command: str, tmp_path: Path) -> None:
    """A model ONNX Runtime cannot load failed in the server's start-up: uvicorn logged the
    lifespan traceback and exited 3."""
    from callspeak.tts.piper import bundled_voice_paths

    model, config = bundled_voice_paths()
    corrupt = tmp_path / "joe.onnx"
    corrupt.write_bytes(model.read_bytes()[:1000])
    shutil.copy(config, f"{corrupt}.json")
    env = {**os.environ, "CALLSPEAK_PORT": str(free_port())}
    env.pop("DEEPGRAM_API_KEY", None)
    extra = ["--no-validate-signatures"] if command == "serve" else []
    result = subprocess.run(
        [*CALLSPEAK, command, "--piper-model", str(corrupt), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "startup failed" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"callspeak: the voice cannot start: cannot load Piper voice {corrupt}")
    assert last.endswith("(--piper-model / CALLSPEAK_PIPER_MODEL)")


@pytest.mark.parametrize("where", ["no/such/dir/x.wav", "."])
def test_demo_refuses_a_wav_it_cannot_write_before_the_call(
    where: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """It played the whole call, then crashed with a FileNotFoundError traceback."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("callspeak.server.create_app", lambda *a, **k: pytest.fail("app made"))
    assert main(["demo", "--wav", where]) == 2
    err = one_line_error(capsys)
    expected = "there is no directory 'no/such/dir'" if "/" in where else "it is a directory"
    assert err == f"callspeak: cannot write --wav {where}: {expected}\n", err


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--piper-cache-mb", "inf"], {}),
        (["--idle-timeout", "nan"], {}),
        ([], {"CALLSPEAK_PIPER_CACHE_MB": "inf"}),
        ([], {"CALLSPEAK_IDLE_TIMEOUT": "inf"}),
    ],
)
def test_serve_refuses_infinite_numbers_in_one_line(
    args: list[str],
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--piper-cache-mb inf was an OverflowError traceback; CALLSPEAK_IDLE_TIMEOUT=inf was
    taken, and streams never closed when idle."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("the server started"))
    assert main(["serve", "--no-validate-signatures", "--port", "0", *args]) == 2
    err = one_line_error(capsys)
    field = (
        "piper_cache_mb (CALLSPEAK_PIPER_CACHE_MB, --piper-cache-mb)"
        if "cache" in str([args, env]).lower()
        else "idle_timeout (CALLSPEAK_IDLE_TIMEOUT, --idle-timeout)"
    )
    assert err == f"callspeak: invalid setting: {field}: Input should be a finite number\n", err


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"CALLSPEAK_DEEPGRAM_MAX_CONCURRENT": "-1"}, "deepgram_max_concurrent (CALLSPEAK_DEEP"),
        ({"CALLSPEAK_MAX_CALLS": "abc"}, "max_calls (CALLSPEAK_MAX_CALLS, --max-calls): "),
    ],
)
def test_a_bad_setting_is_named_as_the_user_set_it(
    env: dict[str, str],
    named: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """ "deepgram_max_concurrent: Input should be…" left a user to work out which variable (or
    flag) that is; the field's name is kept, for the docs' settings table."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("the server started"))
    assert main(["serve", "--no-validate-signatures", "--port", "0"]) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"callspeak: invalid setting: {named}"), err


def test_a_setting_read_from_another_variable_is_named_by_it() -> None:
    from callspeak.cli import _setting_names

    assert _setting_names("deepgram_api_key") == "deepgram_api_key (DEEPGRAM_API_KEY)"
    assert _setting_names("twilio_auth_token") == "twilio_auth_token (TWILIO_AUTH_TOKEN)"
    assert _setting_names("media.payload") == "media.payload"  # no setting: as it was


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_a_misspelt_setting_is_warned_of_once_with_the_name_it_may_mean(
    command: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """CALLSPEAK_MAXCALLS=3 was silently ignored: the server ran with 100."""
    from callspeak.config import ConfigError

    def no_app(*args: object, **kwargs: object) -> None:
        raise ConfigError("(stopped here: the warnings come before the app is made)")

    monkeypatch.setenv("CALLSPEAK_MAXCALLS", "3")
    monkeypatch.setenv("CALLSPEAK_SERVER", "http://127.0.0.1:5000")  # the API client's: known
    monkeypatch.setenv("CALLSPEAK_NOPE", "secret-value")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("callspeak.server.create_app", no_app)
    extra = ["--no-validate-signatures", "--port", "0"] if command == "serve" else []
    assert main([command, *extra]) == 2
    err = capsys.readouterr().err
    assert err.endswith("callspeak: (stopped here: the warnings come before the app is made)\n")
    warnings = [line for line in err.splitlines() if "is not a callspeak setting" in line]
    assert len(warnings) == 2, err
    assert warnings[0].endswith(
        "CALLSPEAK_MAXCALLS is not a callspeak setting and is ignored: did you mean "
        "CALLSPEAK_MAX_CALLS?"
    )
    assert "WARNING" in warnings[0] and "CALLSPEAK_NOPE" in warnings[1]
    assert "secret-value" not in err


@pytest.mark.parametrize(
    "url",
    ["ws://127.0.0.1:99999/twilio", "ws://[::1/twilio", "ws://127.0.0.1:abc/twilio"],
)
def test_dial_refuses_a_url_with_a_bad_port_or_host_in_one_line(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """websockets' parse_uri lets urlsplit's ValueError through for these (not InvalidURI):
    a traceback."""
    assert main(["dial", url]) == 2
    assert "dial takes a ws:// or wss:// URL" in one_line_error(capsys)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_serve_writes_the_log_lines_still_queued_when_sigterm_ends_it() -> None:
    """uvicorn re-raises SIGTERM once it has shut down, with the handler it found, the default:
    the process died there, before main()'s flush_logs() or the exit's, and every line still
    queued for the writer thread — the shutdown's own among them — was lost whenever the log
    reader was behind. (Ctrl-C was spared: it ends in KeyboardInterrupt, and main flushes.)"""
    import signal

    import httpx

    port = free_port()
    env = {
        **os.environ,
        "CALLSPEAK_PORT": str(port),
        "CALLSPEAK_VALIDATE_SIGNATURES": "false",
        "CALLSPEAK_TTS": "piper",
    }
    env.pop("DEEPGRAM_API_KEY", None)
    proc = subprocess.Popen(
        [*CALLSPEAK, "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    try:
        wait_until_listening(proc, port, timeout=30)
        # Nothing reads stderr yet: past the pipe's 64 KiB the writer thread waits, and the
        # access lines of these requests queue behind it — a log reader that is behind.
        requests = 1000
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(requests):
                assert client.get("/healthz").status_code == 200
        proc.send_signal(signal.SIGTERM)
        lines = []
        for line in proc.stderr:  # the reader catches up now, a line a millisecond
            lines.append(line)
            time.sleep(0.001)
        err = "".join(lines)
        assert proc.wait(20) == -signal.SIGTERM  # still ended by the signal, as uvicorn has it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stderr.close()
    assert err.count('"GET /healthz HTTP/1.1" 200') == requests
    assert "Finished server process" in err.splitlines()[-1]
