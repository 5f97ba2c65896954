"""LoRA adapters (workers/engine/lora.py): a request naming an adapter gets the greedy tokens HF transformers gives
with that adapter merged into the weights, while requests of other adapters and of the base model share its
batch, whether loaded at start or added to a running engine; KV computed under one adapter is never a cache hit
for another; adapters that cannot run are refused with the reason."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.engine.test_parity import assert_prompt_logprobs_match_hf
from tests.hf_reference import hf_embedding, hf_greedy
from tests.lora_adapters import ATTENTION, MLP, merged_model, write_adapter
from workers.engine.errors import InvalidRequestError, LoRAError
from workers.engine.llm import LLM
from workers.engine.lora_folder import AdapterConfig, read_folder
from workers.engine.sampling_params import SamplingParams

NEW = 16
PROMPTS = ["The three primary colors are", "def add(a, b):\n    return",
           "A long time ago, in a village by the sea, there lived an old fisherman who every morning walked down to "
           "the harbour, untied his boat and rowed out past the rocks where the gulls waited for him. One day"]


def greedy(lora: str | None = None) -> SamplingParams:
    return SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, lora=lora)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, smollm2_path):
    root = tmp_path_factory.mktemp("lora")
    return {
        "every-projection": write_adapter(root / "every", smollm2_path, ATTENTION + MLP, rank=8, alpha=16, seed=1),
        # rsLoRA's scaling, and layers the adapter leaves alone.
        "q-v-even-layers": write_adapter(root / "qv", smollm2_path, ("q_proj", "v_proj"), rank=4, alpha=8, seed=2,
                                         use_rslora=True, layers=range(0, 30, 2), std=0.08),
    }


@pytest.fixture(scope="module")
def merged(adapters, smollm2_path, tmp_path_factory):
    """Each adapter merged into a copy of the model: what HF transformers runs as the adapter's reference."""
    root = tmp_path_factory.mktemp("merged")
    return {name: merged_model(adapter, smollm2_path, root / name) for name, adapter in adapters.items()}


@pytest.fixture(scope="module")
def llm(adapters, smollm2_path):
    # A 32-token step budget prefills the long prompt in chunks.
    return LLM(str(smollm2_path), num_kv_blocks=512, max_num_batched_tokens=32,
               lora_modules={name: str(adapter.folder) for name, adapter in adapters.items()}, progress=False)


def token_ids(llm, prompt: str) -> list[int]:
    return llm.tokenizer(prompt)["input_ids"]


def test_each_adapter_gives_the_tokens_of_its_merged_weights_in_one_mixed_batch(llm, adapters, merged, smollm2_path):
    names = [None, *adapters]
    requests = [(prompt, name) for prompt in PROMPTS for name in names]
    outputs = llm.generate([token_ids(llm, p) for p, _ in requests], [greedy(name) for _, name in requests])
    got = {(p, name): out.outputs[0].token_ids for (p, name), out in zip(requests, outputs)}

    references = {None: smollm2_path} | merged
    for (prompt, name), tokens in got.items():
        assert tokens == hf_greedy(references[name], token_ids(llm, prompt), NEW), (name, prompt)
    for name in adapters:  # else the comparison could not tell an adapter from the base model
        assert any(got[p, name] != got[p, None] for p in PROMPTS), name


def test_an_embedding_under_an_adapter_is_that_of_its_merged_weights(llm, adapters, merged, smollm2_path):
    ids = token_ids(llm, PROMPTS[2])
    for name, reference in ({None: smollm2_path} | merged).items():
        [out] = llm.embed(ids, lora=name)
        torch.testing.assert_close(torch.tensor(out.embedding), hf_embedding(reference, ids), atol=2e-5, rtol=0)


def test_padded_decode_steps_run_each_row_under_its_adapter(adapters, merged, smollm2_path):
    """The padded decode step a CUDA graph records (run eagerly on CPU): each row's adapter comes from a static
    buffer, so one graph serves any mix of adapters, padding rows none."""
    engine = LLM(str(smollm2_path), num_kv_blocks=256,
                 lora_modules={name: str(adapter.folder) for name, adapter in adapters.items()}, progress=False)
    engine.engine.runner.use_padded_decode(max_batch_size=4, capture=False)
    names = [None, "every-projection", "q-v-even-layers"]
    prompts = [token_ids(engine, p) for p in PROMPTS]
    outs = engine.generate(prompts, [greedy(name) for name in names])
    slots = engine.engine.runner.decode_graphs.adapter_slots.tolist()
    assert sorted(slots[:3]) == [-1, 0, 1] and slots[3] == -1  # the last step: three rows and a padding row
    references = [smollm2_path] + [merged[n] for n in names[1:]]
    for prompt, out, reference in zip(prompts, outs, references):
        assert out.outputs[0].token_ids == hf_greedy(reference, prompt, NEW)


def test_guesses_and_prompt_logprobs_run_under_the_adapter_too(adapters, merged, smollm2_path):
    """Speculative guesses are rows of the adapter's step like its next token's, and the prompt's logprobs come
    from the adapter's forward pass: the tokens and logprobs of HF on the merged weights."""
    engine = LLM(str(smollm2_path), num_kv_blocks=256, num_speculative_tokens=4,
                 lora_modules={"a": str(adapters["every-projection"].folder)}, progress=False)
    quote = "Repeat exactly: the quick fox jumps over the lazy dog, the slow fox jumps over the tired dog. " * 2
    prompt = token_ids(engine, quote)
    out = engine.generate(prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, lora="a",
                                                 prompt_logprobs=2))[0]
    assert out.outputs[0].token_ids == hf_greedy(merged["every-projection"], prompt, 24)
    assert engine.engine.num_accepted_guesses > 0
    assert_prompt_logprobs_match_hf(out.prompt_logprobs, prompt, merged["every-projection"], 2)


def test_kv_computed_under_one_adapter_is_no_cache_hit_for_another(llm):
    prompt = token_ids(llm, "Not yet cached: " + PROMPTS[2])
    first = llm.generate(prompt, greedy("every-projection"))[0]
    other = llm.generate(prompt, greedy("q-v-even-layers"))[0]
    base = llm.generate(prompt, greedy())[0]
    again = llm.generate(prompt, greedy("every-projection"))[0]
    full_blocks = (len(prompt) - 1) // 16 * 16
    assert first.num_cached_tokens == other.num_cached_tokens == base.num_cached_tokens == 0
    assert again.num_cached_tokens == full_blocks
    assert again.outputs[0].token_ids == first.outputs[0].token_ids


def test_a_request_naming_an_adapter_not_loaded_is_refused(llm):
    with pytest.raises(InvalidRequestError, match=r"no LoRA adapter 'sql' here; this engine serves "
                                                  r"'every-projection', 'q-v-even-layers'"):
        llm.generate("Hi", greedy("sql"))


def test_adapters_added_to_a_running_engine_give_the_tokens_of_their_merged_weights(adapters, merged, smollm2_path):
    """LLM.add_lora between steps, on an engine started without adapters: the adapter added first keeps its
    tokens once a second joins it, and the padded decode steps that CUDA graphs record run both."""
    engine = LLM(str(smollm2_path), num_kv_blocks=256, progress=False)
    engine.engine.runner.use_padded_decode(max_batch_size=4, capture=False)
    prompts = [token_ids(engine, p) for p in PROMPTS]
    engine.add_lora("first", str(adapters["every-projection"].folder))
    alone = engine.generate(prompts[1], greedy("first"))[0].outputs[0].token_ids
    engine.add_lora("second", str(adapters["q-v-even-layers"].folder))
    outs = engine.generate(prompts, [greedy(None), greedy("first"), greedy("second")])
    references = [smollm2_path, merged["every-projection"], merged["q-v-even-layers"]]
    for prompt, out, reference in zip(prompts, outs, references):
        assert out.outputs[0].token_ids == hf_greedy(reference, prompt, NEW)
    assert outs[1].outputs[0].token_ids == alone


def test_an_adapter_refused_while_the_engine_runs_leaves_the_others_as_they_were(adapters, merged, smollm2_path,
                                                                                 tmp_path):
    """The last layer's pair does not fit: every layer before it was read and checked, and none took its pair, so
    the next adapter gets the next slot and its own tokens."""
    engine = LLM(str(smollm2_path), num_kv_blocks=128, progress=False,
                 lora_modules={"first": str(adapters["every-projection"].folder)})
    bad = write_adapter(tmp_path / "bad", smollm2_path, ATTENTION, rank=4, alpha=8, seed=5).folder
    weights = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in weights if ".layers.29.self_attn.o_proj.lora_A" in k)
    weights[key] = weights[key][:, :100].contiguous()
    save_file(weights, bad / "adapter_model.safetensors")
    with pytest.raises(LoRAError, match=r"'bad': layer 29 o_proj has A \(4, 100\)"):
        engine.add_lora("bad", str(bad))
    with pytest.raises(LoRAError, match="'first' is loaded already"):
        engine.add_lora("first", str(adapters["q-v-even-layers"].folder))
    engine.add_lora("second", str(adapters["q-v-even-layers"].folder))
    prompts = [token_ids(engine, p) for p in PROMPTS[:2]]
    outs = engine.generate(prompts, [greedy("first"), greedy("second")])
    for prompt, out, name in zip(prompts, outs, ["every-projection", "q-v-even-layers"]):
        assert out.outputs[0].token_ids == hf_greedy(merged[name], prompt, NEW), name


def brought(name: str, adapter) -> SamplingParams:
    """A request that brings its adapter's folder, as a cluster that loads adapters while it runs sends it."""
    return SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, lora=name, lora_path=str(adapter.folder))


def test_a_request_that_brings_its_adapters_folder_loads_it_and_the_least_recently_used_beyond_max_loras_goes(
        adapters, merged, smollm2_path):
    """With max_loras=1, loading a second adapter drops the first, which no request runs; a request naming the
    first again reads it again. The adapter started with stays whatever happens, and the padded decode steps that
    CUDA graphs record keep every row under its own adapter as slots come and go."""
    engine = LLM(str(smollm2_path), num_kv_blocks=256, max_loras=1, progress=False,
                 lora_modules={"pinned": str(adapters["q-v-even-layers"].folder)})
    engine.engine.runner.use_padded_decode(max_batch_size=4, capture=False)
    runner = engine.engine.runner
    every, qv = adapters["every-projection"], adapters["q-v-even-layers"]
    prompts = [token_ids(engine, p) for p in PROMPTS]
    first = engine.generate(prompts[0], brought("a@1", every))[0].outputs[0].token_ids
    assert runner.lora.names == ("pinned", "a@1")
    engine.generate(prompts[0], brought("b@2", qv))
    assert runner.lora.names == ("pinned", "b@2")
    outs = engine.generate(prompts, [brought("a@1", every), greedy("pinned"), brought("b@2", qv)])
    # a@1's request came first: its load dropped b@2, idle then; b@2's load kept a@1, whose request was queued.
    assert runner.lora.names == ("pinned", "a@1", "b@2")
    assert outs[0].outputs[0].token_ids == first == hf_greedy(merged["every-projection"], prompts[0], NEW)
    for prompt, out in zip(prompts[1:], outs[1:]):
        assert out.outputs[0].token_ids == hf_greedy(merged["q-v-even-layers"], prompt, NEW)


def test_an_adapter_a_running_request_uses_is_not_dropped(adapters, merged, smollm2_path):
    """Past max_loras the adapters in use stay: more are loaded than max_loras for as long as they run."""
    engine = LLM(str(smollm2_path), num_kv_blocks=256, max_loras=1, progress=False)
    every, qv = adapters["every-projection"], adapters["q-v-even-layers"]
    prompts = [token_ids(engine, p) for p in PROMPTS[:2]]
    engine.engine.add_request(prompts[0], brought("a@1", every), "a")
    engine.engine.step()
    engine.engine.add_request(prompts[1], brought("b@2", qv), "b")
    assert engine.engine.runner.lora.names == ("a@1", "b@2")
    outs = {}
    while engine.engine.has_unfinished_requests():
        outs.update({out.request_id: out for out in engine.engine.step() if out.finished})
    assert outs["a"].outputs[0].token_ids == hf_greedy(merged["every-projection"], prompts[0], NEW)
    assert outs["b"].outputs[0].token_ids == hf_greedy(merged["q-v-even-layers"], prompts[1], NEW)


def test_a_request_bringing_a_folder_that_is_no_adapter_of_this_model_is_refused_and_loads_nothing(
        tmp_path, smollm2_path, tiny_model_factory, adapters):
    engine = LLM(str(smollm2_path), num_kv_blocks=16, max_loras=1, progress=False)
    other = write_adapter(tmp_path / "other", tiny_model_factory("llama"), ("q_proj",), rank=4, alpha=4, seed=3)
    with pytest.raises(LoRAError, match=r"'other@1': layer 0 q_proj has A \(4, \d+\) .* an adapter of another"):
        engine.generate("Hi", brought("other@1", other))
    with pytest.raises(LoRAError, match=r"'gone@2': cannot read .*adapter_config.json"):
        engine.generate("Hi", SamplingParams(lora="gone@2", lora_path=str(tmp_path / "gone")))
    assert engine.engine.runner.lora.names == () and not engine.engine.requests


def test_an_adapter_of_another_model_is_refused_at_start(tmp_path, smollm2_path, tiny_model_factory):
    other = write_adapter(tmp_path / "other", tiny_model_factory("llama"), ("q_proj",), rank=4, alpha=4, seed=3)
    with pytest.raises(LoRAError, match=r"'other': layer 0 q_proj has A \(4, \d+\) .* an adapter of another model"):
        LLM(str(smollm2_path), num_kv_blocks=16, lora_modules={"other": str(other.folder)}, progress=False)


@pytest.mark.parametrize("option, message", [
    ({"use_dora": True}, r"use_dora=True is not supported"),
    ({"fan_in_fan_out": True}, r"fan_in_fan_out=True is not supported"),
    ({"modules_to_save": ["lm_head"]}, r"modules_to_save=\['lm_head'\] is not supported"),
    ({"peft_type": "IA3"}, r"peft_type is 'IA3'; only LORA adapters run"),
    ({"r": 0}, r"r must be a positive integer"),
])
def test_adapter_options_that_change_the_arithmetic_otherwise_are_refused(tmp_path, adapters, option, message):
    config = json.loads((adapters["every-projection"].folder / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | option))
    with pytest.raises(LoRAError, match=message):
        AdapterConfig.read("bad", tmp_path)


def config_only(folder, adapter):
    """A folder holding the adapter's config and nothing else yet."""
    folder.mkdir()
    (folder / "adapter_config.json").write_text((adapter.folder / "adapter_config.json").read_text())
    return folder


def test_an_adapter_saved_as_a_pickle_is_refused_with_how_to_save_it(tmp_path, adapters):
    folder = config_only(tmp_path / "pickled", adapters["every-projection"])
    (folder / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(LoRAError, match=r"'pickled': .* holds adapter_model.bin, a pickle, which is not loaded"):
        read_folder("pickled", folder)


def test_an_adapter_changing_the_embeddings_is_refused_with_what_it_changes(tmp_path, adapters, smollm2_path):
    folder = config_only(tmp_path / "embeddings", adapters["every-projection"])
    save_file({"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 49152)},
              folder / "adapter_model.safetensors")
    with pytest.raises(LoRAError, match=r"embed_tokens.lora_embedding_A is not a LoRA weight of a decoder layer's "
                                        r"projection"):
        LLM(str(smollm2_path), num_kv_blocks=16, lora_modules={"embeddings": str(folder)}, progress=False)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft's call into HF
def test_an_adapter_as_peft_saves_it_gives_the_tokens_peft_gives(tmp_path, smollm2_path, llm):
    """PEFT's own adapter format (its key names, its config's many fields, "all-linear") against PEFT's own forward
    pass, unmerged as ours is."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    base.generation_config.eos_token_id = None  # exactly NEW tokens, as the engine's ignore_eos
    config = LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(base, config).eval()
    model.save_pretrained(tmp_path / "peft")
    prompt = token_ids(llm, PROMPTS[0])

    def generate() -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 do_sample=False, max_new_tokens=NEW)
        return out[0, len(prompt):].tolist()

    expected = generate()
    with model.disable_adapter():
        assert generate() != expected
    engine = LLM(str(smollm2_path), num_kv_blocks=64, lora_modules={"peft": str(tmp_path / "peft")}, progress=False)
    assert engine.generate(prompt, greedy("peft"))[0].outputs[0].token_ids == expected
