"""Trainer: each method learns, exports load in peft / the server's parser with the same outputs,
distillation, resume, data plumbing and clear errors. All on the tiny model (hidden 64, 2 layers).

Loss margins were measured first (30 steps of 16, seeds 0 and 1, held-out eval loss before -> after):
lora 11.42 -> 7.02, ia3 11.42 -> 10.78, bottleneck 11.42 -> 8.16 / 8.44, prefix (with projection)
11.32 -> 5.88 / 11.47 -> 6.10, prompt 11.07 -> 9.51 / 11.48 -> 9.59. Each test asserts about half
of the smaller measured drop.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from server.adapters.weights import AdapterKind
from server.model.shape import BaseModelShape
from server.adapters.validate import AdapterLimits, parse_files
from tests.unit.trainer_fixtures import cls_files, config, lm_files
from trainer.bottleneck import BottleneckAdapters, BottleneckModel
from trainer.config import TrainError
from trainer.data import BatchPlan, Tokens, shard
from trainer.loop import train
from trainer.methods import AdapterModule, load_adapter, load_base, read_model_config

MIN_DROP = {"lora": 2.0, "ia3": 0.3, "bottleneck": 1.5, "prefix": 2.5, "prompt": 0.75}
KIND = {"lora": AdapterKind.LORA, "ia3": AdapterKind.IA3, "bottleneck": AdapterKind.BOTTLENECK,
        "prefix": AdapterKind.PREFIX_TUNING, "prompt": AdapterKind.PROMPT_TUNING}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer-data")
    return {"lm": lm_files(root), "cls": cls_files(root)}


@pytest.fixture(scope="module")
def trained(tiny_model_dir, data, tmp_path_factory):
    """(method, task) -> TrainResult, each trained once per module."""
    cache: dict = {}

    def get(method: str, task: str = "lm"):
        if (method, task) not in cache:
            out = tmp_path_factory.mktemp(f"{method}-{task}")
            steps = 30 if task == "lm" else 60
            cache[(method, task)] = train(config(tiny_model_dir, out, *data[task], method=method, task=task,
                                                 max_steps=steps, prefix_projection=method == "prefix"))
        return cache[(method, task)]
    return get


def _batch(tokens: Tokens, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, T] ids and mask."""
    rows = [tokens.tokenizer.encode(t).ids for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokens.pad_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def _parse(out: Path, model_dir: Path):
    shape = BaseModelShape.from_hf_config(read_model_config(model_dir))
    return parse_files((out / "adapter_config.json").read_bytes(), (out / "adapter_model.safetensors").read_bytes(),
                       shape, AdapterLimits())


@pytest.mark.parametrize("method", list(MIN_DROP))
def test_each_method_lowers_held_out_loss(trained, method):
    r = trained(method)
    assert r.steps == 30
    drop = r.first_eval["eval_loss"] - r.eval["eval_loss"]
    assert drop > MIN_DROP[method], (r.first_eval, r.eval)


@pytest.mark.parametrize("method", ["lora", "ia3", "prefix", "prompt"])
def test_peft_export_loads_in_peft_with_the_same_logits(trained, tiny_model_dir, method):
    from peft import PeftModel

    r = trained(method)
    cfg = read_model_config(tiny_model_dir)
    tokens = Tokens.load(tiny_model_dir, cfg)
    ids, mask = _batch(tokens, ["abc=cba", "xyzw=", "q="])
    loaded = PeftModel.from_pretrained(load_base(tiny_model_dir, "lm", (), tokens.pad_id), str(r.out)).eval()
    with torch.no_grad():
        want = r.model.eval()(ids, mask)  # [B, T, vocab]
        got = loaded(input_ids=ids, attention_mask=mask).logits
    if method == "prompt":
        got = got[:, loaded.peft_config["default"].num_virtual_tokens:]
    assert want.shape == got.shape == (3, ids.shape[1], cfg["vocab_size"])
    base_logits = load_base(tiny_model_dir, "lm", (), tokens.pad_id)(input_ids=ids, attention_mask=mask).logits
    assert (want - base_logits).abs().max() > 1e-2  # the adapter really changes the output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", list(MIN_DROP))
def test_lm_export_parses_with_the_server_parser(trained, tiny_model_dir, method):
    r = trained(method)
    w = _parse(r.out, tiny_model_dir)
    assert w.kind is KIND[method] and w.head is None
    if method == "prefix":  # the projection MLP is folded away: one [n_virtual, L*2*kv*hd] table
        assert json.loads((r.out / "adapter_config.json").read_text())["prefix_projection"] is True
        assert w.prefix_kv.shape == (2, 2, 2, 8, 16)


def test_bottleneck_export_round_trips_through_the_server_parser(trained, tiny_model_dir):
    r = trained("bottleneck")
    cfg = json.loads((r.out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BOTTLENECK" and cfg["placement"] == ["attn", "mlp"] and cfg["activation"] == "relu"
    weights = _parse(r.out, tiny_model_dir)
    assert set(weights.bottleneck) == {(i, p) for i in range(2) for p in ("attn", "mlp")}
    shape = BaseModelShape.from_hf_config(read_model_config(tiny_model_dir))
    rebuilt = AdapterModule(BottleneckModel(load_base(tiny_model_dir, "lm", (), 0),
                                            BottleneckAdapters.from_weights(weights, shape)), "bottleneck", "lm")
    ids, mask = _batch(Tokens.load(tiny_model_dir, read_model_config(tiny_model_dir)), ["abc=cba", "q="])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids, mask), r.model.eval()(ids, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "bottleneck", "prompt"])
def test_classification_learns_and_exports_head_with_label_names(trained, tiny_model_dir, method):
    r = trained(method, "cls")
    assert r.labels == ("digit", "lower", "upper")
    assert r.first_eval["eval_loss"] - r.eval["eval_loss"] > 0.1 and r.eval["eval_accuracy"] > 0.5, r.eval
    cfg = json.loads((r.out / "adapter_config.json").read_text())
    assert cfg["lorafleet"] == {"labels": ["digit", "lower", "upper"]}
    if method != "prompt":  # see test below: prompt-learning heads are named differently
        w = _parse(r.out, tiny_model_dir)
        assert w.head.labels == ("digit", "lower", "upper") and w.head.weight.shape == (3, 64)
    names = load_file(str(r.out / "adapter_model.safetensors"))
    assert any(n.endswith("score.weight") for n in names)


@pytest.mark.filterwarnings("ignore:Unexpected keyword arguments")  # peft on {"lorafleet": {"labels"}}
def test_classification_export_gives_the_same_logits_after_reload(trained, tiny_model_dir):
    """LoRA through peft's own forward; prompt tuning through peft's forward on unpadded rows (peft pools
    at position -1), which checks the trainer's own last-real-token pooling."""
    from peft import PeftModel

    cfg = read_model_config(tiny_model_dir)
    tokens = Tokens.load(tiny_model_dir, cfg)
    texts = ["ab3", "Qwerty7", "zz"]
    for method in ("lora", "prompt"):
        r = trained(method, "cls")
        base = load_base(tiny_model_dir, "cls", r.labels, tokens.pad_id)
        loaded = PeftModel.from_pretrained(base, str(r.out)).eval()
        ids, mask = _batch(tokens, texts)
        with torch.no_grad():
            want = r.model.eval()(ids, mask)  # [3, 3]
            got = torch.cat([loaded(input_ids=_batch(tokens, [t])[0]).logits for t in texts])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_prefix_classification_round_trips(trained, tiny_model_dir):
    """peft 0.21 cannot run a prefix-tuned classifier on transformers 5 (it looks for `past_key_values`),
    so the check is: reload the export and run it through the trainer's forward."""
    r = trained("prefix", "cls")
    cfg = read_model_config(tiny_model_dir)
    tokens = Tokens.load(tiny_model_dir, cfg)
    reloaded = load_adapter(load_base(tiny_model_dir, "cls", r.labels, tokens.pad_id), r.out, "cls", cfg)
    ids, mask = _batch(tokens, ["ab3", "Qwerty7", "zz"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, mask), r.model.eval()(ids, mask), atol=1e-5, rtol=1e-5)


def test_distillation_lowers_kl_to_the_teacher(trained, tiny_model_dir, data, tmp_path):
    teacher = trained("lora")
    r = train(config(tiny_model_dir, tmp_path / "student", *data["lm"], method="bottleneck", max_steps=30,
                     teacher_adapter=teacher.out, distill_alpha=0.0, distill_temperature=2.0))
    assert r.first_eval["eval_kl"] - r.eval["eval_kl"] > 0.5, (r.first_eval, r.eval)


def test_resume_continues_the_same_loss_curve(tiny_model_dir, data, tmp_path):
    kw = dict(method="lora", max_steps=8, checkpoint_every=4, keep_checkpoints=5, dropout=0.1, eval_every=4)
    a = train(config(tiny_model_dir, tmp_path / "a", *data["lm"], **kw))
    b = train(config(tiny_model_dir, tmp_path / "b", *data["lm"], resume=str(a.out / "checkpoints" / "step-00000004"),
                     **kw))
    assert b.steps == 8 and b.first_eval == {}
    curve = [json.loads(x) for x in (a.out / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(x) for x in (b.out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in resumed] == [5, 6, 7, 8]
    for want, got in zip(curve[-4:], resumed):
        assert got["step"] == want["step"]
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6)
    wa, wb = load_file(str(a.out / "adapter_model.safetensors")), load_file(str(b.out / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=1e-6)


def test_resume_refuses_a_checkpoint_of_another_shape(tiny_model_dir, data, tmp_path):
    a = train(config(tiny_model_dir, tmp_path / "a", *data["lm"], max_steps=2, eval_path=None, eval_fraction=0.0))
    with pytest.raises(TrainError, match="checkpoint is for"):
        train(config(tiny_model_dir, tmp_path / "b", *data["lm"], rank=4, max_steps=4,
                     resume=str(a.out / "checkpoints" / "step-00000002")))


def test_batch_plan_is_deterministic_and_weights_the_mixture():
    a, b = BatchPlan([50, 10], [0.75, 0.25], 64, seed=3), BatchPlan([50, 10], [0.75, 0.25], 64, seed=3)
    batches = [a.next_batch() for _ in range(20)]
    assert batches == [b.next_batch() for _ in range(20)]
    picks = [d for batch in batches for d, _ in batch]
    assert 0.68 < picks.count(0) / len(picks) < 0.82
    one = BatchPlan([10], [1.0], 5, seed=0)  # one dataset: each epoch is a permutation
    assert sorted(i for _ in range(2) for _, i in one.next_batch()) == list(range(10))


def test_shard_splits_the_global_batch_over_ranks_and_micro_batches():
    items = list(range(11))
    parts = [shard(items, r, 2, 3) for r in range(2)]
    assert sorted(x for p in parts for m in p for x in m) == items
    assert all(len(p) == 3 and all(m for m in p) for p in parts)
    with pytest.raises(TrainError, match="raise --batch-size"):
        shard(list(range(3)), 1, 2, 2)  # rank 1 gets one item for two micro-batches


def test_teacher_model_must_share_the_tokenizer(tiny_model_dir, data, tmp_path):
    import shutil

    same = train(config(tiny_model_dir, tmp_path / "same", *data["lm"], max_steps=2, teacher_model=tiny_model_dir))
    assert same.first_eval["eval_kl"] == pytest.approx(0.0, abs=1e-6)  # fresh LoRA (B = 0) is the base
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(TrainError, match="different tokenizer"):
        train(config(tiny_model_dir, tmp_path / "x", *data["lm"], max_steps=2, teacher_model=other))


def test_early_stopping_exports_the_best_evaluation(tiny_model_dir, data, tmp_path):
    from trainer.objective import evaluate

    upper, _ = lm_files(tmp_path, "upper")  # train on one task, evaluate on another, with a large step:
    ev = data["lm"][1]  # measured eval losses every 2 steps: 15.8 12.7 10.3 7.95 8.30 8.15 -> stop at step 12
    r = train(config(tiny_model_dir, tmp_path / "es", upper, ev, lr=0.3, max_steps=40, eval_every=2,
                     early_stopping_patience=2))
    assert r.stopped_early and r.steps < 40, r
    evals = [json.loads(x) for x in (r.out / "metrics.jsonl").read_text().splitlines()]
    evals = [x["eval_loss"] for x in evals if "eval_loss" in x and x["step"] > 0]
    best = min(evals)
    assert r.best_eval_loss == best and evals[-1] > best and evals[-2] > best
    cfg = read_model_config(tiny_model_dir)
    tokens = Tokens.load(tiny_model_dir, cfg)
    reloaded = load_adapter(load_base(tiny_model_dir, "lm", (), tokens.pad_id), r.out, "lm", cfg)
    from trainer.data import load_datasets
    from trainer.dist import DistEnv

    examples = load_datasets(config(tiny_model_dir, r.out, upper, ev), tokens).eval
    got = evaluate(reloaded, None, examples, "lm", 0, 16, tokens.pad_id, 1.0, DistEnv(0, 1, 0, torch.device("cpu")))
    assert got["eval_loss"] == pytest.approx(best, abs=1e-5)


def test_the_server_serves_what_was_trained(trained, tiny_model_dir, tmp_path):
    """Each export uploaded to a real server on the tiny model: greedy text (lm, all five kinds) and class
    probabilities (cls) equal the trainer's own in-memory model. (Prefix / prompt classifiers are left
    out: the server's parser does not yet read peft's `base_model.score.weight` name for them.)"""
    from client import LoraFleetClient
    from server.config import ServerConfig
    from server.main import BackgroundServer, load
    from trainer.generate import greedy

    tokens = Tokens.load(tiny_model_dir, read_model_config(tiny_model_dir))
    prompts, texts = ["abc=", "hello=", "zq="], ["ab3", "Qwerty7", "zz"]
    cfg = ServerConfig(port=0, metrics_port=-1, model=str(tiny_model_dir), data_dir=tmp_path / "data")
    with BackgroundServer(cfg, load(cfg)) as running, LoraFleetClient(f"127.0.0.1:{running.port}") as client:
        for method in MIN_DROP:
            r = trained(method)
            client.upload_adapter(r.out, f"lm-{method}")
            want = greedy(r.model.eval(), tokens, prompts, 6)
            assert [client.generate(p, adapter=f"lm-{method}", max_new_tokens=6).text for p in prompts] == want
        for method in ("lora", "ia3", "bottleneck"):
            r = trained(method, "cls")
            client.upload_adapter(r.out, f"cls-{method}")
            got = client.classify(texts, adapter=f"cls-{method}")
            for text, row in zip(texts, got):
                ids = torch.tensor([tokens.tokenizer.encode(text).ids])
                with torch.no_grad():
                    p = torch.softmax(r.model.eval()(ids, torch.ones_like(ids))[0], -1)  # [3]
                assert [row["scores"][name] for name in r.labels] == pytest.approx(p.tolist(), abs=1e-4)


def test_prompt_init_text_and_bottleneck_options(tiny_model_dir, data, tmp_path):
    from trainer.methods import build_student

    cfg = config(tiny_model_dir, tmp_path / "p", *data["lm"], method="prompt", virtual_tokens=5,
                 prompt_init_text="ab")
    base = load_base(tiny_model_dir, "lm", (), 0)
    student = build_student(cfg, base, read_model_config(tiny_model_dir), [100, 101])
    table = student.inner.prompt_encoder["default"].embedding.weight  # [5, hidden]
    torch.testing.assert_close(table, base.get_input_embeddings().weight[[100, 101, 100, 101, 100]])
    r = train(config(tiny_model_dir, tmp_path / "b", *data["lm"], method="bottleneck", activation="gelu",
                     placement=("mlp",), bottleneck_size=4, max_steps=3))
    w = _parse(r.out, tiny_model_dir)
    assert set(w.bottleneck) == {(0, "mlp"), (1, "mlp")} and w.rank == 4
    assert {t.activation for t in w.bottleneck.values()} == {"gelu"}
