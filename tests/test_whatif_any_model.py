"""Parallel plans for any model: ``tierplan whatif`` and ``plan_model`` take a zoo name, a
``path/to/file.py:factory`` or a transformers ``config.json`` (built on the meta device, nothing
downloaded), with ``--seq-len``, ``--global-batch`` and ``--precision``; ``--layout`` prices the
best plan matching the fields it fixes beside the best plan of all, or says why none matches."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch

from tierplan.cli import main
from tierplan.parallel.search import plan_parallel
from tierplan.parallel.types import LayoutError, parse_layout
from tierplan.profiling import plan_model, profile_model
from tierplan.zoo import ZooError

transformers = pytest.importorskip("transformers")

# Megatron-LM's GPT 1.3B shape (24 layers, hidden 2048, 16 heads, seq 2048, vocab 51200).
MEGATRON_1B = {"n_layer": 24, "n_embd": 2048, "n_head": 16, "vocab_size": 51200, "n_positions": 2048}
JSON_FIELDS = ("plan", "step_s", "tokens_per_s", "mfu", "memory_gb")


@pytest.fixture(scope="module")
def megatron_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2-1.3b") / "config.json"
    transformers.GPT2Config(**MEGATRON_1B).to_json_file(path)
    return path


@pytest.fixture(scope="module")
def megatron_profile(megatron_config):
    return profile_model(str(megatron_config), seq_len=2048, precision="bf16", target="a100-80gb-sxm")


def _rows(path) -> tuple[dict, dict]:
    data = json.loads(path.read_text())
    best, mine = data["rows"]
    assert (best["kind"], mine["kind"]) == ("best", "layout")
    return best, mine


def test_config_json_with_a_layout(megatron_config, tmp_path, capsys) -> None:
    out = tmp_path / "out.json"
    assert main(["whatif", str(megatron_config), "--hardware", "a100-80gb-sxm", "--gpus", "64",
                 "--global-batch", "64", "--seq-len", "2048", "--layout", "dp1 tp8 pp8",
                 "--json", str(out)]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "1.3B parameters, seq 2048" in text
    assert "layout: dp1 tp8+sp pp8" in text and "best: " in text
    assert "memory per device (GB)" in text and "tp allgather+reducescatter" in text
    data = json.loads(out.read_text())
    assert (data["seq_len"], data["global_batch"], data["layout"]) == (2048, 64, "dp1 tp8 pp8")
    best, mine = _rows(out)
    for row in (best, mine):
        assert all(row[k] for k in JSON_FIELDS), row
        assert row["fits"] and 0 < row["mfu"] < 1 and row["memory_gb"] <= row["capacity_gb"]
        assert row["tokens_per_s"] == pytest.approx(64 * 2048 / row["step_s"])
        assert row["memory_breakdown_gb"]["total"] == pytest.approx(row["memory_gb"])
        assert row["time_breakdown_s"]["total"] == pytest.approx(row["step_s"])
    assert {k: mine["config"][k] for k in ("dp", "tp", "pp")} == {"dp": 1, "tp": 8, "pp": 8}
    assert mine["config"]["global_batch"] == 64
    assert best["step_s"] <= mine["step_s"]  # the best of all is no slower than the best of some


def test_config_directory_and_precision(tmp_path) -> None:
    cfg = transformers.LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                                   num_key_value_heads=2, intermediate_size=512, vocab_size=1000,
                                   max_position_embeddings=512, dtype="bfloat16")  # fmt: skip
    cfg.save_pretrained(tmp_path)  # a directory holding config.json
    own = profile_model(str(tmp_path))
    assert (own.param_bytes, own.seq_len, own.num_layers, own.kv_heads) == (2, 512, 4, 2)
    fp32 = profile_model(str(tmp_path / "config.json"), seq_len=128, precision="fp32")
    assert (fp32.param_bytes, fp32.seq_len) == (4, 128)
    assert fp32.total_params == own.total_params
    r = plan_model(str(tmp_path), "h100-sxm", 8, seq_len=128, global_batch=16, layout="tp2")
    assert r.best is not None and r.best.config["tp"] == 2 and r.layout == "tp2"
    with pytest.raises(ZooError, match="does not exist"):
        profile_model(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text('{"hidden_size": 8}')
    with pytest.raises(ZooError, match="names no model_type"):
        profile_model(str(tmp_path / "bad.json"))


@pytest.mark.parametrize("name", ["qwen2", "bert"])
def test_configs_of_other_architectures(name, tmp_path) -> None:
    """Qwen2 validates its per-layer ``layer_types`` against the layer count (cut with the
    layers); BERT, an encoder with a causal head too, trains as a masked LM."""
    small = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
             "intermediate_size": 256, "vocab_size": 1000}
    if name == "qwen2":
        cfg, cls = transformers.Qwen2Config(num_key_value_heads=2, **small), transformers.Qwen2ForCausalLM
    else:
        cfg, cls = transformers.BertConfig(**small), transformers.BertForMaskedLM
    cfg.save_pretrained(tmp_path)
    prof = profile_model(str(tmp_path), seq_len=64)
    with torch.device("meta"):
        real = cls(cfg)
    assert (prof.num_layers, prof.profiled_layers) == (4, 2)
    assert prof.total_params == sum(p.numel() for p in real.parameters())


def test_file_factory_model(tmp_path, capsys) -> None:
    src = tmp_path / "mymodel.py"
    src.write_text(textwrap.dedent("""
        import contextlib
        import torch
        import transformers

        def build(batch_size=1, seq_len=64, fake=False):
            cfg = transformers.LlamaConfig(hidden_size=128, num_hidden_layers=4,
                                           num_attention_heads=4, num_key_value_heads=4,
                                           intermediate_size=256, vocab_size=1000,
                                           max_position_embeddings=512)
            with torch.device("meta") if fake else contextlib.nullcontext():
                model = transformers.LlamaForCausalLM(cfg)
                ids = torch.randint(0, 1000, (batch_size, seq_len))
            return model, (), {"input_ids": ids, "labels": ids}
    """))
    out = tmp_path / "rows.json"
    assert main(["whatif", f"{src}:build", "--hardware", "h100-sxm", "--gpus", "8", "--seq-len", "128",
                 "--global-batch", "32", "--precision", "bf16", "--layout", "tp2 pp2 rc-full",
                 "--json", str(out)]) == 0  # fmt: skip
    assert "mymodel.py:build" in capsys.readouterr().out
    _, mine = _rows(out)
    c = mine["config"]
    assert (c["tp"], c["pp"], c["dp"], c["recompute"]) == (2, 2, 2, {"full": 2})
    assert json.loads(out.read_text())["precision"] == "bf16"
    prof = profile_model(f"{src}:build", seq_len=96)
    assert (prof.seq_len, prof.num_layers, prof.profiled_layers) == (96, 4, 4)


def test_zoo_model_with_a_full_layout(capsys) -> None:
    layout = "dp2 tp2+sp pp2 1F1B zero1 mb1x4 rc[full] offload[none]"
    assert main(["whatif", "llama-tiny", "--hardware", "h100-sxm", "--gpus", "8", "--global-batch", "8",
                 "--layout", layout]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "layout: dp2 tp2+sp pp2 1F1B zero1 mb1x4 rc[fullx1]" in text
    # A plan's own description, given back as a layout, finds that plan again.
    prof = profile_model("llama-tiny", target="h100-sxm")
    for best in plan_parallel(prof, "h100-sxm", 8, global_batch=8, top=5).plans:
        again = plan_parallel(prof, "h100-sxm", 8, global_batch=8, layout=best.describe()).best
        assert again is not None and again.describe() == best.describe()


def test_infeasible_layouts_say_why(megatron_profile) -> None:
    def why(layout: str, gpus: int = 64, hw: str = "a100-80gb-sxm", **kw) -> str:
        r = plan_parallel(megatron_profile, hw, gpus, global_batch=64, layout=layout, **kw)
        assert r.best is None and r.reason.startswith(f"layout {layout!r}")
        return r.reason

    assert "dp1 x tp8 x pp4 = 32 GPUs, not the 64 given" in why("dp1 tp8 pp4")
    assert "tp3 does not divide 64 GPUs" in why("tp3")
    assert "pp16 does not divide the model's 24 layers" in why("tp4 pp16")
    assert "zero1 shards over data parallelism" in why("dp1 tp8 pp8 zero1")
    assert "mb3 does not divide" in why("dp8 mb3")
    assert "needs at least 8 micro-batches" in why("dp1 tp8 pp8 mb16")
    assert "interleaved(v=2) with pp8" in why("dp1 tp8 pp8 interleaved(v=2)")
    # Memory: the closest miss priced over capacity, its breakdown kept.
    r = plan_parallel(megatron_profile, "rtx4090", 1, global_batch=64, layout="rc[none] offload[none]")
    assert r.best is None and "memory over capacity" in r.reason and "optimizer" in r.reason
    over = r.over_capacity
    assert over is not None and not over.fits and over.memory.total > over.capacity
    assert over.config["recompute"] == {"none": 24} and not over.config["offload_optimizer"]
    # Serving: the replicas, the batch.
    s = plan_parallel(megatron_profile, "a100-80gb-sxm", 8, serve=True, layout="replicas2 tp4 batch8")
    assert s.best is not None and (s.best.config["tp"], s.best.config["batch"]) == (4, 8)
    assert "= 16 GPUs" in plan_parallel(megatron_profile, "a100-80gb-sxm", 8, serve=True,
                                        layout="replicas2 tp4 pp2").reason  # fmt: skip


def test_bad_layout_is_a_usage_error(capsys) -> None:
    assert main(["whatif", "gpt2", "--hardware", "h100-sxm", "--gpus", "8", "--layout", "dp1 tq8 pp8"]) == 2
    err = capsys.readouterr().err
    assert "bad token 'tq8'" in err and "valid training forms" in err and "rc[OPT]" in err
    assert main(["whatif", "gpt2", "--hardware", "h100-sxm", "--gpus", "8", "--serve",
                 "--layout", "tp2 zero1"]) == 2  # fmt: skip
    assert "a training field in a serving layout: 'zero1'" in capsys.readouterr().err
    assert main(["whatif", "gpt2", "--hardware", "h100-sxm", "--gpus", "8", "--serve",
                 "--global-batch", "8"]) == 2  # fmt: skip
    assert "--global-batch is for training" in capsys.readouterr().err
    for bad, message in [("tp8 tp4", "tp given twice"), ("zero4", "ZeRO stages are 0-3"),
                         ("rc[fullx2,sometimes]", "unknown recompute option 'sometimes'"),
                         ("offload[params]", "only with the optimizer"),
                         ("zero2 offload[optimizer+params]", "need zero3"), ("", "is empty")]:  # fmt: skip
        with pytest.raises(LayoutError, match=message.replace("[", r"\[")):
            parse_layout(bad)
    lay = parse_layout("DP4 tp2+sp pp16 interleaved(v=2) zero2 mb1x512 rc[fullx5,selectivex3] offload-optimizer")
    assert (lay.dp, lay.tp, lay.sp, lay.pp, lay.schedule, lay.virtual, lay.zero) == (4, 2, True, 16, "interleaved", 2, 2)
    assert (lay.micro_batch, lay.num_micro, lay.offload_optimizer, lay.offload_params) == (1, 512, True, False)
    assert lay.recompute_mix(10) == {"full": 5, "selective": 3, "none": 2}
