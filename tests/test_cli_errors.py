"""Bad input on the CLI: one line naming the problem and the fix, exit code 2, never a traceback."""
import pytest
from click.testing import CliRunner

from hasten.cli import main
from hasten.models.loading import default_gguf_path


def run(*args, input=None):
    result = CliRunner().invoke(main, list(args), input=input)
    # a first load in this session's cold cache also says, on a line of its own, what it caches
    lines = [l for l in result.output.splitlines() if l.strip() and not l.startswith(("hasten: reading", "hasten: compiling"))]
    return result, lines


def assert_one_line_error(result, lines, *needles):
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("hasten: error:"), result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0]


def test_missing_model_path():
    assert_one_line_error(*run("generate", "hi", "--model", "/nonexistent/model.gguf"), "does not exist")


def test_truncated_gguf(tmp_path):
    path = tmp_path / "truncated.gguf"
    path.write_bytes(default_gguf_path().read_bytes()[:3_000_000])
    assert_one_line_error(*run("generate", "hi", "--model", str(path)), "not a readable GGUF", "re-download")


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(b"this is not a gguf file at all" * 100)
    assert_one_line_error(*run("generate", "hi", "--model", str(path)), "not a readable GGUF")


def test_directory_without_checkpoint(tmp_path):
    assert_one_line_error(*run("generate", "hi", "--model", str(tmp_path)), "config.json")


def test_unsupported_architecture(tmp_path):
    import torch
    from safetensors.torch import save_file
    from transformers import GPT2Config
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    save_file({"wte.weight": torch.zeros(4, 8)}, tmp_path / "model.safetensors")
    assert_one_line_error(*run("generate", "hi", "--model", str(tmp_path)), "'gpt2' is not supported", "llama")


def test_unknown_method():
    assert_one_line_error(*run("generate", "hi", "--method", "warp-drive"), "unknown method 'warp-drive'")


@pytest.mark.parametrize("method,needle", [("prompt-lookup|", "unknown method ''"),
                                           ("prompt-lookup|teal:0.5", "teal changes the model and cannot be composed"),
                                           ("recycling|baseline", "baseline proposes nothing")])
def test_bad_fallback_method(method, needle):
    assert_one_line_error(*run("generate", "hi", "--method", method), needle)


def test_unknown_method_parameter():
    assert_one_line_error(*run("generate", "hi", "--method", "baseline:k=3"), "has no parameter 'k'")


@pytest.mark.parametrize("method,needle", [("prompt-lookup:n=0", "prompt-lookup needs n ≥ 1"),
                                           ("recycling:k=abc", "recycling: a parameter has the wrong type (k=abc)"),
                                           ("eagle:width=0", "eagle needs k ≥ 1, 0 < threshold < 1, width ≥ 1"),
                                           ("prompt-lookup|eagle:threshold=1.5", "0 < threshold < 1")])
def test_bad_method_parameter_value(method, needle):
    assert_one_line_error(*run("generate", "hi", "--method", method), needle)


def test_eagle_without_a_trained_head(tmp_path, monkeypatch):
    from hasten.decoding.drafters import eagle
    monkeypatch.setattr(eagle, "head_path", lambda engine: tmp_path / "no-head.pt")
    assert_one_line_error(*run("generate", "hi", "--method", "prompt-lookup|eagle"), "hasten train-head")


@pytest.mark.parametrize("args,needle", [(("-n", "0"), "max_new_tokens"), (("-t", "-0.5"), "temperature"),
                                         (("--top-p", "0"), "top_p")])
def test_bad_generation_options(args, needle):
    assert_one_line_error(*run("generate", "hi", *args), needle)


@pytest.mark.integration
def test_prompt_longer_than_context():
    assert_one_line_error(*run("generate", "word " * 9000, "-n", "4"), "context", "shorten the prompt")


@pytest.mark.integration
def test_generate_streams_text_and_statistics():
    result = CliRunner().invoke(main, ["generate", "The capital of France is", "-n", "8"])
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output
    assert "tokens/s" in result.output and "mean accepted 1.00" in result.output


@pytest.mark.parametrize("args,needle", [
    (("calibrate", "--corpus", "/nonexistent/texts"), "no such file or folder"),
    (("calibrate", "--methods", "prompt-lookup"), "not a sparse (lossy) method"),
    (("calibrate", "--methods", "teal:1.5"), "sparsity must be a number in [0, 1)"),
    (("generate", "hi", "--method", "cats:abc"), "sparsity must be a number"),
    (("generate", "hi", "--method", "teal:0.5,alloc=magic"), "alloc must be"),
])
def test_bad_sparsity_input(args, needle):
    assert_one_line_error(*run(*args), needle)


@pytest.mark.parametrize("command", [("generate", "hi", "--method", "teal:0.5"), ("bench", "--methods", "baseline,teal:0.5")])
def test_a_missing_corpus_is_one_line(command):
    assert_one_line_error(*run(*command, "--corpus", "/nonexistent/corpus"), "no such file or folder")


@pytest.mark.parametrize("args,needle", [
    (("bench", "-n", "0"), "'--max-new-tokens' / '-n': 0 is not in the range x>=1"),
    (("bench", "--rounds", "0"), "'--rounds': 0 is not in the range x>=1"),
    (("generate", "hi", "--threads", "0"), "'--threads': 0 is not in the range x>=1"),
    (("generate", "hi", "-n", "abc"), "'abc' is not a valid integer"),
    (("tune", "--budget", "3"), "'--budget': 3 is not in the range x>=10"),
    (("generate", "hi", "--no-such-option"), "No such option '--no-such-option'"),
    (("report",), "Missing argument 'RESULT_JSON'"),
    (("no-such-command",), "No such command 'no-such-command'"),
])
def test_click_validation_is_one_line(args, needle):
    """Values click itself rejects read like hasten's own errors, naming the command's --help."""
    result, lines = run(*args)
    assert_one_line_error(result, lines, needle)
    command = "" if args[0] == "no-such-command" else f" {args[0]}"
    assert lines[0].endswith(f"(see `hasten{command} --help`)")
    assert "Usage:" not in result.output


@pytest.mark.parametrize("args,says", [
    (["--json-schema", '{"type": "foo"}'], "--json-schema: Invalid type: foo"),
    (["--json-schema", "nope"], "neither a file nor valid JSON"),
    (["--regex", "["], "--regex:"),
    (["--regex", "a", "--json-schema", "{}"], "pass one of them"),
])
def test_structured_output_options_are_checked_before_loading(args, says):
    r = CliRunner().invoke(main, ["generate", "hi", *args])
    assert r.exit_code == 2 and says in r.output and "Traceback" not in r.output
    assert r.output.count("\n") == 1

@pytest.mark.parametrize("command", ["generate", "bench", "serve"])
def test_bad_kv_policy(command):
    args = [command, "hi"] if command == "generate" else [command]
    assert_one_line_error(*run(*args, "--kv-policy", "window:0,sinks:4"), "--kv-policy", "window must be an integer")
