"""`/v1/adapters` and adapters through the OpenAI endpoints, on a tiny checkpoint."""

from pathlib import Path

import pytest
import torch
from litestar.testing import TestClient

from engine import Engine
from server.app import create_app
from server.config import ServerConfig
from tests.engine.tiny_models import make_checkpoint

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def make_adapter(base: Path, out: Path, seed: int) -> None:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    pm.save_pretrained(out)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-api")
    base = make_checkpoint(root / "base", arch="llama")
    adapters = root / "adapters"
    make_adapter(base, adapters / "a1", seed=1)
    make_adapter(base, adapters / "a2", seed=2)
    (root / "outside").mkdir()
    eng = Engine(device="cpu")
    eng.load_model("tiny", base, dtype="float32", adapter_dir=adapters)
    config = ServerConfig(
        database_url=f"sqlite:///{root / 'db.sqlite'}", pipelines_dir=str(root / "pipelines")
    )
    with TestClient(create_app(config, eng)) as c:
        yield c
    eng.shutdown()


def complete(client, model: str) -> dict:
    body = {"model": model, "prompt": "the river", "max_tokens": 8, "temperature": 0}
    return client.post("/v1/completions", json=body)


def test_load_list_use_and_unload(client):
    r = client.post("/v1/adapters", json={"name": "a1", "base": "tiny"})
    assert r.status_code == 201, r.text
    assert r.json()["id"] == "tiny:a1" and r.json()["resident"] == "slot"
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert "tiny:a1" in ids
    base_text = complete(client, "tiny").json()["choices"][0]["text"]
    a1 = complete(client, "tiny:a1")
    assert a1.status_code == 200 and a1.json()["choices"][0]["text"] != base_text
    assert [a["id"] for a in client.get("/v1/adapters").json()["data"]] == ["tiny:a1"]
    r = client.delete("/v1/adapters/tiny:a1")
    assert r.status_code == 200 and r.json()["unloaded"] is True
    assert complete(client, "tiny:nope").status_code == 404


def test_adapters_load_on_demand_by_name(client):
    r = complete(client, "tiny:a2")
    assert r.status_code == 200
    assert "tiny:a2" in [a["id"] for a in client.get("/v1/adapters").json()["data"]]


def test_paths_outside_the_adapter_dir_are_refused(client):
    r = client.post("/v1/adapters", json={"name": "x", "base": "tiny", "path": "../outside"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "path"
    r = client.post("/v1/adapters", json={"name": "x", "base": "tiny", "path": "/etc"})
    assert r.status_code == 400


def test_bad_adapter_is_a_structured_400(client):
    r = client.post("/v1/adapters", json={"name": "missing", "base": "tiny"})
    assert r.status_code == 400
    body = r.json()["error"]
    assert body["code"] == "invalid_adapter" and "adapter_config.json" in body["message"]
    assert "/" not in body["message"].split(":")[0]  # no server folders in the message
    r = client.post("/v1/adapters", json={"name": "a1", "base": "nobase"})
    assert r.status_code == 404
