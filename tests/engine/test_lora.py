"""Multi-LoRA serving against `peft` on tiny random checkpoints."""

import asyncio
import json
import random

import pytest
import torch

from engine import Engine, GenerationRequest, ModelNotFoundError, SamplingParams
from engine.errors import AdapterError

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
IDS = [1, 17, 33, 250, 9, 41, 77, 120, 5, 300, 211, 64, 8]


def make_adapter(base_dir, out_dir, *, seed, r=4, targets=("q_proj", "v_proj", "down_proj"), **kw):
    """A random PEFT LoRA adapter; returns the merged transformers model as the reference."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = peft.LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False, **kw
    )
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():  # make the deltas large enough to matter
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    pm.save_pretrained(out_dir)
    return pm.merge_and_unload().eval()


@pytest.fixture(scope="module")
def lora_setup(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    refs = {
        "a1": make_adapter(tiny_llama, root / "a1", seed=1),
        "a2": make_adapter(
            tiny_llama,
            root / "a2",
            seed=2,
            r=8,
            targets=("k_proj", "o_proj", "gate_proj", "up_proj"),
        ),
    }
    return tiny_llama, root, refs


@pytest.mark.parametrize("variant", ["llama", "qwen2", "mistral"])
def test_adapter_logits_match_peft_merged(variant, build_variant, tmp_path):
    base = build_variant(variant)
    ref = make_adapter(
        base,
        tmp_path / "a",
        seed=3,
        use_rslora=True,
        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    )
    with Engine() as eng:
        eng.load_model("tiny", base, dtype="float32")
        eng.load_adapter("tiny:a", tmp_path / "a")
        ours = eng.logits("tiny:a", IDS)
        base_logits = eng.logits("tiny", IDS)
    with torch.no_grad():
        theirs = ref(torch.tensor([IDS])).logits[0]
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (base_logits - theirs).abs().max().item() > 1e-2  # the adapter really changes them


def test_mixed_adapter_batch_matches_each_request_alone(lora_setup):
    base, root, _ = lora_setup
    rng = random.Random(0)
    prompts = [[rng.randrange(5, 400) for _ in range(rng.randrange(4, 30))] for _ in range(9)]
    models = ["tiny", "tiny:a1", "tiny:a2"] * 3
    with Engine() as eng:
        eng.load_model("tiny", base, dtype="float32")
        eng.load_adapter("tiny:a1", root / "a1")
        eng.load_adapter("tiny:a2", root / "a2")
        alone = [
            eng.generate([p], GREEDY, model=m)[0].token_ids
            for p, m in zip(prompts, models, strict=True)
        ]

        async def together():
            async def one(p, m):
                req = GenerationRequest(model=m, prompt_token_ids=p, params=GREEDY)
                return [t async for d in eng.stream(req) for t in d.token_ids]

            return await asyncio.gather(*(one(p, m) for p, m in zip(prompts, models, strict=True)))

        mixed = asyncio.run(together())
    assert mixed == alone
    assert alone[0] != alone[1] or alone[1] != alone[2]


def test_generate_with_adapter_matches_peft_greedy(lora_setup):
    base, root, refs = lora_setup
    with Engine() as eng:
        eng.load_model("tiny", base, dtype="float32")
        eng.load_adapter("tiny:a2", root / "a2")
        ours = eng.generate([IDS], GREEDY, model="tiny:a2")[0].token_ids
    ref = refs["a2"]
    ref.generation_config.eos_token_id = None
    out = ref.generate(torch.tensor([IDS]), do_sample=False, max_new_tokens=10)
    assert ours == out[0, len(IDS) :].tolist()


def test_slots_evict_lru_and_reload_from_cpu(lora_setup):
    base, root, _ = lora_setup
    with Engine() as eng:
        eng.load_model("tiny", base, dtype="float32", max_loaded_adapters=1)
        eng.load_adapter("tiny:a1", root / "a1")
        eng.load_adapter("tiny:a2", root / "a2")
        first = eng.generate([IDS], GREEDY, model="tiny:a1")[0].token_ids
        eng.generate([IDS], GREEDY, model="tiny:a2")
        residency = {a.name: a.resident for a in eng.adapters("tiny")}
        assert residency == {"tiny:a1": "cpu", "tiny:a2": "slot"}
        assert eng.generate([IDS], GREEDY, model="tiny:a1")[0].token_ids == first


def test_adapters_load_on_demand_from_the_adapter_dir(lora_setup):
    base, root, _ = lora_setup
    with Engine() as eng:
        eng.load_model("tiny", base, dtype="float32", adapter_dir=root)
        out = eng.generate([IDS], GREEDY, model="tiny:a1")[0]
        assert out.finish_reason == "length"
        assert [a.name for a in eng.adapters()] == ["tiny:a1"]
        with pytest.raises(ModelNotFoundError):
            eng.generate([IDS], GREEDY, model="tiny:nope")
        with pytest.raises(ModelNotFoundError):
            eng.generate([IDS], GREEDY, model="tiny:../a1")


def test_prefix_cache_is_keyed_by_adapter(lora_setup):
    base, root, _ = lora_setup
    prompt = list(range(10, 60))
    with Engine() as eng:
        eng.load_model("tiny", base, dtype="float32", block_size=8)
        eng.load_adapter("tiny:a1", root / "a1")
        plain = eng.generate([prompt], GREEDY, model="tiny")[0]
        adapted = eng.generate([prompt], GREEDY, model="tiny:a1")[0]
        again = eng.generate([prompt], GREEDY, model="tiny:a1")[0]
    assert adapted.num_cached_tokens == 0  # nothing shared with the base model's blocks
    assert again.num_cached_tokens == 48 and again.token_ids == adapted.token_ids
    assert plain.token_ids != adapted.token_ids


def test_unload_under_streaming_traffic_fails_no_request(lora_setup):
    base, root, _ = lora_setup
    params = SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True)
    with Engine() as eng:
        eng.load_model("tiny", base, dtype="float32")
        eng.load_adapter("tiny:a1", root / "a1")
        expected = eng.generate([IDS], params, model="tiny:a1")[0].token_ids

        async def traffic():
            started = [asyncio.Event() for _ in range(4)]

            async def one(ev):
                req = GenerationRequest(model="tiny:a1", prompt_token_ids=IDS, params=params)
                out = []
                async for d in eng.stream(req):
                    out.extend(d.token_ids)
                    ev.set()
                return out

            tasks = [asyncio.create_task(one(ev)) for ev in started]
            for ev in started:
                await ev.wait()
            freed = eng.unload_adapter("tiny:a1")  # in flight: they finish on the adapter
            eng.load_adapter("tiny:a2", root / "a2")  # loading never stalls them
            return freed, await asyncio.gather(*tasks)

        freed, outs = asyncio.run(traffic())
        assert not freed
        assert outs == [expected] * 4
        with pytest.raises(ModelNotFoundError):
            eng.generate([IDS], GREEDY, model="tiny:a1")
        assert [a.name for a in eng.adapters()] == ["tiny:a2"]


def test_bad_adapters_are_refused_and_nothing_is_disturbed(lora_setup, tiny_qwen2, tmp_path):
    base, root, _ = lora_setup
    make_adapter(tiny_qwen2, tmp_path / "other", seed=5, targets=("q_proj",))
    cfg = json.loads((tmp_path / "other" / "adapter_config.json").read_text())
    with Engine() as eng:
        eng.load_model("tiny", base, dtype="float32")
        eng.load_adapter("tiny:a1", root / "a1")
        before = eng.generate([IDS], GREEDY, model="tiny:a1")[0].token_ids
        (tmp_path / "broken").mkdir()
        (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
        with pytest.raises(AdapterError, match=r"adapter_config\.json"):
            eng.load_adapter("tiny:broken", tmp_path / "broken")
        (tmp_path / "other" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 0}))
        with pytest.raises(AdapterError) as e:
            eng.load_adapter("tiny:other", tmp_path / "other")
        assert e.value.field == "r"
        with pytest.raises(ModelNotFoundError):
            eng.load_adapter("nobase:x", root / "a1")
        assert eng.generate([IDS], GREEDY, model="tiny:a1")[0].token_ids == before
        assert [a.name for a in eng.adapters()] == ["tiny:a1"]
