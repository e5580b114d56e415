"""The ``infinillm`` command, run as a real process."""

import json
import re
import subprocess
import sys

import pytest

from infinillm.cli import main
from infinillm.testing import make_tiny_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("cli") / "m"))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infinillm.cli", *args], capture_output=True, text=True, timeout=120)


def test_generate_streams_a_completion(tmp_path):
    make_tiny_model(tmp_path / "m")
    r = run("generate", "hello", "--model", str(tmp_path / "m"), "--max-tokens", "5", "--device", "cpu",
            "--kv-capacity-tokens", "1024", "--max-model-len", "512")
    assert r.returncode == 0, r.stderr
    assert "tokens, finish_reason=" in r.stderr


def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path):
    r = run("generate", "hello", "--model", str(tmp_path / "missing"))
    assert r.returncode == 2
    assert "error: model=" in r.stderr and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr


def test_an_error_inside_the_runtime_is_printed_as_an_error_not_a_traceback(tmp_path):
    # The empty prompt is refused by generate(), inside the open runtime.
    make_tiny_model(tmp_path / "m")
    r = run("generate", "", "--raw", "--model", str(tmp_path / "m"), "--device", "cpu",
            "--kv-capacity-tokens", "1024", "--max-model-len", "512")
    assert r.returncode == 2
    assert "error: prompt='' is invalid: must be a non-empty string" in r.stderr
    assert "Traceback" not in r.stderr


def test_keys_writes_a_pair(tmp_path):
    r = run("keys", str(tmp_path), "--name", "node")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "node.key").exists() and (tmp_path / "node.key_secret").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kv-capacity-tokens", "0"], "error: CacheConfig.kv_capacity_tokens=0 is invalid: must be in [16, "),
        (["--max-model-len", "0"], "error: ModelConfig.max_model_len=0 is invalid: must be in [2, 2147483648]"),
        (["--max-tokens", "0"], "error: SamplingParams.max_tokens=0 is invalid: must be None or an integer >= 1"),
    ],
)
def test_zero_options_are_checked_not_dropped(tiny_folder, capsys, args, message):
    options = {"--kv-capacity-tokens": "1024", "--max-model-len": "512"}
    for flag, value in zip(args[::2], args[1::2]):
        options[flag] = value
    argv = ["generate", "hi", "--model", tiny_folder, "--device", "cpu", *[x for kv in options.items() for x in kv]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("model.safetensors", "is not a readable safetensors file"),
        ("config.json", "config.json must hold a JSON object, not a list"),
        ("tokenizer.json", "cannot be read by tokenizers"),
    ],
)
def test_a_broken_model_file_is_an_error_naming_the_file(tmp_path, capsys, broken, message):
    folder = make_tiny_model(tmp_path / "m")
    (folder / broken).write_text({"model.safetensors": "", "config.json": "[{}]", "tokenizer.json": "{not json"}[broken])
    assert main(["generate", "hi", "--model", str(folder), "--device", "cpu", "--kv-capacity-tokens", "1024",
                 "--max-model-len", "512"]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and str(folder / broken) in err and message.split(" ", 1)[-1] in err
    assert "Traceback" not in err


def test_help_lists_every_command_and_each_command_shows_its_defaults(capsys):
    r = run("--help")  # the installed command itself, once
    assert r.returncode == 0
    for command in ("chat", "generate", "worker", "sim", "bench", "keys"):
        assert command in r.stdout
    for command in ("chat", "generate", "worker", "sim", "bench", "keys"):  # in this process: no torch start-up each
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0, command
        text = capsys.readouterr().out
        options = len(re.findall(r"^  -", text, re.M)) - 1  # (-h, --help)
        assert options > 0 and " ".join(text.split()).count("(default:") >= options, command  # each explained


def test_an_unknown_command_is_refused_with_the_list():
    r = run("serve")
    assert r.returncode == 2
    assert "invalid choice: 'serve'" in r.stderr and "Traceback" not in r.stderr


def test_chat_reads_turns_and_commands_from_a_pipe(tiny_folder, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("The lighthouse stands on a rock. " * 40, encoding="utf-8")
    r = subprocess.run(
        [sys.executable, "-m", "infinillm.cli", "chat", "--model", tiny_folder, "--device", "cpu", "--instances", "2",
         "--kv-capacity-tokens", "512", "--max-tokens", "4", "--document", str(doc)],
        input="first question\n/stats\n\nsecond question\n/reset\nthird\n", capture_output=True, text=True, timeout=180,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "[document doc.txt:" in out
    assert out.count("> ") == 3  # three turns echoed; commands and the blank line are not turns
    assert len(re.findall(r"\[4 tokens, .* tokens/s, first token after .* s, \d+ in context, length; KV on instance", out)) == 3
    assert re.search(r"\[2 instances; prefix cache hit rate", out)
    assert len(re.findall(r"^\s+[01]\s+\d+\s+\d+\s+\d+\s+\d+\s+\d+\s+32  ", out, re.M)) == 2  # a row per instance
    assert "[the conversation starts again from the document]" in out


def test_chat_errors_are_one_line(tiny_folder, tmp_path):
    r = run("chat", "--model", str(tmp_path / "nothing.gguf"))
    assert r.returncode == 2 and "error: model=" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "infinillm.cli", "chat", "--model", tiny_folder, "--device", "cpu",
                        "--instances", "1", "--kv-capacity-tokens", "256", "--document", str(tmp_path / "missing.txt")],
                       input="", capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "error: --document=" in r.stderr and "cannot be read" in r.stderr
    assert "Traceback" not in r.stderr


def test_chat_reports_a_port_in_use(tiny_folder, tmp_path):
    import socket

    from infinillm.transport.keys import generate_keypair

    generate_keypair(str(tmp_path / "keys"), "infinillm")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run("chat", "--model", tiny_folder, "--device", "cpu", "--instances", "1", "--kv-capacity-tokens", "256",
                "--join-address", f"tcp://127.0.0.1:{port}", "--keys", str(tmp_path / "keys"))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Address already in use" in r.stderr and "Traceback" not in r.stderr


def test_bench_measures_throughput_as_json(tiny_folder):
    r = run("bench", "--model", tiny_folder, "--device", "cpu", "--requests", "3", "--prompt-tokens", "20",
            "--max-tokens", "5", "--kv-capacity-tokens", "1024", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["requests"] == 3 and result["output_tokens_per_s"] > 0
    assert result["ttft_s"]["p90"] >= result["ttft_s"]["median"] > 0
    r = run("bench", "--model", tiny_folder, "--requests", "0")
    assert r.returncode == 2 and "--requests=0 must be at least 1" in r.stderr


def test_chat_keeps_its_history_past_a_turn_that_cannot_fit_and_reads_any_bytes(tiny_folder):
    lines = b"first\n" + b"x" * 3000 + b"\nsecond \xff\xfe junk\n"
    r = subprocess.run(
        [sys.executable, "-m", "infinillm.cli", "chat", "--model", tiny_folder, "--device", "cpu", "--instances", "1",
         "--kv-capacity-tokens", "1024", "--max-tokens", "4"],
        input=lines, capture_output=True, timeout=180,
    )
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert "[error: prompt=" in out and "max_model_len=1024" in out  # the long turn alone cannot fit
    contexts = [int(n) for n in re.findall(r"(\d+) in context", out)]
    assert len(contexts) == 2 and contexts[1] > contexts[0] + 4  # the first turn is still in the second's context


def test_bench_and_chat_refuse_bad_values_in_one_line(tiny_folder):
    r = run("bench", "--model", tiny_folder, "--device", "cpu", "--kv-capacity-tokens", "512", "--prompt-tokens", "600")
    assert r.returncode == 2 and "error: prompt=" in r.stderr and "Traceback" not in r.stderr
    r = run("chat", "--model", tiny_folder, "--instances", "0")
    assert r.returncode == 2 and "--instances=0 must be at least 1" in r.stderr
    r = run("chat", "--model", tiny_folder, "--max-tokens", "0")
    assert r.returncode == 2 and "error: " in r.stderr and "max_tokens" in r.stderr and "Traceback" not in r.stderr
