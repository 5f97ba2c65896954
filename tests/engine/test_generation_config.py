"""A model's recommended sampling, its generation_config.json, is what a request that sets none runs, as HF's
generate and vLLM run it; generation_config "none" leaves it out. (The APIs apply it field by field, a request's
own values first: tests/router/test_openai_api.py.)"""

import json

import pytest
import torch

from tests.conftest import with_generation_config
from tests.hf_reference import hf_model
from workers.engine.llm import LLM
from workers.engine.sampling_params import SamplingParams, generation_config_defaults

# Greedy, so HF's generate checks it token for token (a tiny random model's near-flat logits hardly feel a penalty).
RECOMMENDED = {"temperature": 0.0, "max_new_tokens": 5, "repetition_penalty": 1.3}
PROMPT = [310, 1500, 2801, 47, 310, 1500, 2801, 47, 310, 1500, 2801, 47, 310, 1500]


@pytest.fixture(scope="module")
def model(tiny_model_factory, tmp_path_factory):
    return with_generation_config(tiny_model_factory("llama"), tmp_path_factory.mktemp("recommended"), RECOMMENDED)


def test_only_the_sampling_keys_are_read_under_the_engines_names(tmp_path):
    assert generation_config_defaults(tmp_path) == {}  # no generation_config.json
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": None, "repetition_penalty": 1.05,
        "max_new_tokens": 512, "max_length": 300, "bos_token_id": 1, "transformers_version": "4.37.0"}))
    assert generation_config_defaults(tmp_path) == {"temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                                    "repetition_penalty": 1.05, "max_tokens": 512}


def test_a_value_the_engine_refuses_fails_at_start_naming_the_file_and_key(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "max_new_tokens": 0}))
    with pytest.raises(ValueError, match=r"generation_config.json: max_new_tokens: must be a positive integer"):
        generation_config_defaults(tmp_path)
    (tmp_path / "generation_config.json").write_text("{temperature: 0.6")
    with pytest.raises(ValueError, match=r"generation_config.json is not JSON"):
        generation_config_defaults(tmp_path)


def test_generate_without_params_runs_the_recommended_sampling_as_hfs_generate_does(model):
    llm = LLM(str(model), num_kv_blocks=64, progress=False)
    assert llm.default_sampling_params == SamplingParams(max_tokens=5, temperature=0.0, repetition_penalty=1.3)
    ours = llm.generate(PROMPT)[0].outputs[0].token_ids
    ids = torch.tensor([PROMPT])
    with torch.no_grad():  # HF's generate reads the same file for its own defaults
        hf = hf_model(model).generate(ids, attention_mask=torch.ones_like(ids))[0, len(PROMPT):].tolist()
    assert ours == hf and len(ours) == 5
    # Params given are the whole of a request's sampling: here temperature 1.
    sampled = llm.generate(PROMPT, SamplingParams(max_tokens=5, seed=3))[0].outputs[0].token_ids
    assert sampled != ours


def test_generation_config_none_runs_the_engines_own_defaults(model):
    assert LLM(str(model), num_kv_blocks=64, progress=False, generation_config="none").default_sampling_params == \
        SamplingParams()
    with pytest.raises(ValueError, match="generation_config must be auto or none"):
        LLM(str(model), generation_config="vllm")
