"""The trainer's command line: documented flags, and one clear line (exit 2, no traceback) per bad input."""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.cli import _data_source, build_parser, main

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ["--method", "--task", "--data", "--eval", "--base", "--out", "--rank", "--alpha", "--rslora", "--dropout",
         "--targets", "--bottleneck-size", "--activation", "--placement", "--virtual-tokens", "--prefix-projection",
         "--prompt-init-text", "--epochs", "--max-steps", "--batch-size", "--grad-accum", "--lr", "--warmup-steps",
         "--max-grad-norm", "--eval-every", "--early-stopping-patience", "--seed", "--max-length", "--resume",
         "--teacher-adapter", "--teacher-model", "--distill-alpha", "--distill-temperature", "--metrics-log",
         "--upload", "--name", "--server", "--api-key"]


def test_help_documents_every_option():
    text = subprocess.run([sys.executable, "-m", "trainer", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60).stdout
    missing = [f for f in FLAGS if f not in text]
    assert not missing
    for action in build_parser()._actions:
        assert action.help, action.option_strings


def test_every_config_field_is_one_flag_and_maps_back():
    """The flags are derived from TrainConfig's knobs: every field has one, its default is the field's,
    and config_from_args maps a parse back to the same TrainConfig."""
    from trainer.cli import config_from_args
    from trainer.config import DataSource, TrainConfig

    p = build_parser()
    dests = {a.dest: a for a in p._actions}
    fields = dataclasses.fields(TrainConfig)
    assert {f.name for f in fields} <= dests.keys()
    for f in fields:
        if f.default is not dataclasses.MISSING:
            assert dests[f.name].default == f.default, f.name
    assert {a.dest for a in p._actions if a.required} == {"method", "data", "out"}
    a = p.parse_args(["--method", "ia3", "--data", "a.jsonl:0.5", "--data", "b.jsonl", "--out", "o", "--base", "b",
                      "--rank", "4", "--targets", "q_proj, v_proj", "--resume", "--eval", "e.jsonl", "--rslora",
                      "--distill-temperature", "3"])
    want = TrainConfig(method="ia3", data=(DataSource(Path("a.jsonl"), 0.5), DataSource(Path("b.jsonl"), 1.0)),
                       out=Path("o"), base=Path("b"), rank=4, targets=("q_proj", "v_proj"), resume="latest",
                       eval_path=Path("e.jsonl"), rslora=True, distill_temperature=3.0)
    assert config_from_args(a) == want


def test_data_weights_parse():
    assert (_data_source("a.jsonl:0.7").path, _data_source("a.jsonl:0.7").weight) == (Path("a.jsonl"), 0.7)
    assert (_data_source("dir:x/b.jsonl").path, _data_source("b.jsonl").weight) == (Path("dir:x/b.jsonl"), 1.0)


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _run(tiny_model_dir, tmp_path, *args) -> list[str]:
    return ["--base", str(tiny_model_dir), "--out", str(tmp_path / "out"), "--quiet", "--threads", "1", *args]


GOOD_LM = {"prompt": "ab=", "completion": "ba"}
GOOD_CLS = {"text": "hello", "label": "x"}


@pytest.mark.parametrize("lines, task, message", [
    ([GOOD_LM, GOOD_LM, '{"prompt": "a=", "completion": '], "lm", r"train.jsonl:3: not valid JSON"),
    ([GOOD_LM, "[1, 2]"], "lm", r"train.jsonl:2: expected a JSON object"),
    ([GOOD_LM, {"prompt": "a="}], "lm", r"train.jsonl:2: an lm example needs"),
    ([GOOD_LM, {"prompt": "a=", "completion": 5}], "lm", r"train.jsonl:2: \"completion\" must be a string"),
    (["", "  "], "lm", r"train.jsonl: no examples"),
    ([GOOD_CLS, {"text": "a", "label": None}], "cls", r"train.jsonl:2: \"label\" must be a string or an integer"),
    ([GOOD_CLS, GOOD_CLS], "cls", r"at least two labels"),
])
def test_bad_training_data_is_one_clear_line(tiny_model_dir, tmp_path, capsys, lines, task, message):
    data = _write(tmp_path / "train.jsonl", lines)
    code = main(["--method", "lora", "--task", task, "--data", str(data), "--eval-fraction", "0",
                 *_run(tiny_model_dir, tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("lorafleet train: error: ")
    assert re.search(message, err), err


def test_unknown_label_in_the_eval_file(tiny_model_dir, tmp_path, capsys):
    data = _write(tmp_path / "train.jsonl", [GOOD_CLS, {"text": "bye", "label": "y"}])
    ev = _write(tmp_path / "eval.jsonl", [GOOD_CLS, {"text": "hm", "label": "z"}])
    code = main(["--method", "lora", "--task", "cls", "--data", str(data), "--eval", str(ev),
                 *_run(tiny_model_dir, tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and f"{ev}:2: unknown label 'z'; the labels are: x, y" in err


def test_completion_cut_off_by_max_length(tiny_model_dir, tmp_path, capsys):
    data = _write(tmp_path / "train.jsonl", [{"prompt": "a long prompt=", "completion": "x"}])
    code = main(["--method", "lora", "--data", str(data), "--max-length", "5", *_run(tiny_model_dir, tmp_path)])
    assert code == 2 and "train.jsonl:1: no completion token is left within --max-length 5" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--data", "missing.jsonl"], "missing.jsonl: no such file"),
    (["--targets", "q_proj,lm_head"], "--targets: unknown module(s) lm_head"),
    (["--upload"], "--upload needs --name"),
    (["--upload", "--name", "Bad Name"], "invalid --name"),
    (["--batch-size", "2", "--grad-accum", "4"], "--batch-size 2 is smaller than --grad-accum 4"),
    (["--teacher-model", "/nonexistent"], "/nonexistent: not a Hugging Face model directory"),
    (["--chat"], "has no chat template"),
    (["--chat", "--task", "cls"], "--chat is for --task lm"),
])
def test_bad_flags_are_one_clear_line(tiny_model_dir, tmp_path, capsys, args, message):
    data = _write(tmp_path / "train.jsonl", [GOOD_LM] * 4)
    argv = ["--method", "lora", "--data", str(data), *_run(tiny_model_dir, tmp_path), *args]
    if args[:2] == ["--data", "missing.jsonl"]:
        argv = ["--method", "lora", *_run(tiny_model_dir, tmp_path), "--data", str(tmp_path / "missing.jsonl")]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


def test_a_small_run_through_the_cli_exports_and_logs_metrics(tiny_model_dir, tmp_path, capsys):
    pairs = [{"prompt": f"{w}=", "completion": w[::-1]} for w in ("abc", "dog", "xyz")]
    data = _write(tmp_path / "a.jsonl", pairs * 4)
    text = _write(tmp_path / "b.jsonl", [{"text": "hello world"}] * 6)
    code = main(["--method", "ia3", "--data", f"{data}:0.7", "--data", f"{text}:0.3", "--max-steps", "3",
                 "--batch-size", "4", "--grad-accum", "2", *_run(tiny_model_dir, tmp_path)])
    assert code == 0
    assert "exported ia3 adapter" in capsys.readouterr().out
    out = tmp_path / "out"
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.jsonl"} <= {p.name for p in out.iterdir()}
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "eval_loss" in records[0]
    assert [r["step"] for r in records[1:]] == [1, 2, 3]
    assert all({"loss", "lr", "grad_norm", "tokens_per_s"} <= r.keys() for r in records[1:])


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_chat_examples_are_rendered_as_the_server_renders_a_chat(tiny_model_dir, tmp_path):
    """--chat: prompt ids = the chat template's rendering of one user message, encoded as the server
    encodes a chat request; the completion ends with the end-of-turn token; loss on the reply only."""
    from server.model.chat import load_chat_template
    from trainer.data import IGNORE, Tokens, load_datasets
    from trainer.methods import read_model_config
    from tests.unit.trainer_fixtures import config

    base = tmp_path / "chat-model"
    base.mkdir()
    for f in tiny_model_dir.iterdir():
        (base / f.name).symlink_to(f)
    (base / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    data = _write(tmp_path / "train.jsonl", [{"prompt": "What is 2 plus 2?", "completion": "four"}])
    tok = Tokens.load(base, read_model_config(base))
    chat = config(base, tmp_path / "out", data, None, chat=True)
    (ex,), = load_datasets(chat, tok).train
    (plain,), = load_datasets(config(base, tmp_path / "out", data, None), tok).train

    text = load_chat_template(base, tok.tokenizer).render([("user", "What is 2 plus 2?")])
    assert text.endswith("<|user|>\nWhat is 2 plus 2?</s>\n<|assistant|>\n")
    prompt = tok.tokenizer.encode(text, add_special_tokens=False).ids
    reply = tok.tokenizer.encode("four", add_special_tokens=False).ids
    assert ex.input_ids == prompt + reply + [tok.eos_id]
    assert ex.labels == [IGNORE] * len(prompt) + reply + [tok.eos_id]
    assert plain.input_ids != ex.input_ids  # without --chat the prompt is not wrapped
