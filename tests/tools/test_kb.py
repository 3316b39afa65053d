"""The synthetic world and its knowledge base: size, names, determinism, lookups, search."""

from __future__ import annotations

import datetime
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest

from tools.errors import ToolArgumentError, UnknownEntity, UnknownField, WorldError
from tools.kb import SCHEMA, KnowledgeBase, World, build_database, generate_world
from tools.kb.builtin import register_kb_tools
from tools.kb.names import STOPLIST
from tools.kb.schema import CATEGORIES, template_words
from tools.kb.store import read_meta
from tools.registry import ToolRegistry


@pytest.fixture(scope="module")
def world() -> World:
    return generate_world(0)


@pytest.fixture(scope="module")
def kb(tmp_path_factory: pytest.TempPathFactory) -> KnowledgeBase:
    kb = KnowledgeBase(tmp_path_factory.mktemp("kb") / "kb.sqlite", seed=0)
    kb.ensure()
    return kb


def _first(world: World, entity_type: str) -> str:
    return world.of_type(entity_type)[0].name


def test_size_and_shape(world: World) -> None:
    counts = world.counts()
    assert sum(counts.values()) == len(world) >= 500
    assert len([t for t, n in counts.items() if n]) >= 4
    for entity in world.entities:
        assert len(entity.fields) >= 5
        assert list(entity.fields) == list(world.fields(entity.type))


def test_values_match_their_kinds(world: World) -> None:
    by_name = {e.name: e for e in world.entities}
    for entity in world.entities:
        for spec in SCHEMA[entity.type]:
            value = entity.fields[spec.name]
            if spec.kind == "ref":
                assert by_name[value].type == spec.ref, (entity.name, spec.name)
            elif spec.kind == "category":
                assert value in CATEGORIES[spec.name]
            elif spec.kind == "date":
                assert datetime.date.fromisoformat(value).year >= 1900
            elif spec.kind == "year":
                assert isinstance(value, int) and 700 <= value <= 2030
            elif spec.kind == "bool":
                assert isinstance(value, bool)
            else:
                expected = int if spec.kind == "int" else float
                assert type(value) is expected and value > 0, (entity.name, spec.name)


def test_references_agree(world: World) -> None:
    for country in world.of_type("country"):
        cities = [c for c in world.of_type("city") if c.fields["country"] == country.name]
        capital = max(cities, key=lambda c: c.fields["population"])
        assert country.fields["capital"] == capital.name
        assert country.fields["population"] > sum(c.fields["population"] for c in cities)
        assert world.lookup(country.fields["highest_point"], "country") == country.name
        assert world.lookup(country.fields["longest_river"], "country") == country.name
    for person in world.of_type("person"):
        birthplace = person.fields["birthplace"]
        assert person.fields["nationality"] == world.lookup(birthplace, "country")
    for company in world.of_type("company"):
        assert world.lookup(company.fields["ceo"], "employer") == company.name
        assert world.lookup(company.fields["ceo"], "occupation") == "executive"
    for river in world.of_type("river"):
        assert world.lookup(river.fields["source"], "country") == river.fields["country"]


def _within_one_edit(a: str, b: str) -> bool:
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) > len(b):
        a, b = b, a
    i = next((k for k in range(len(a)) if a[k] != b[k]), len(a))
    if len(a) == len(b):
        return a[i + 1 :] == b[i + 1 :]
    return a[i:] == b[i + 1 :]


def test_names_are_distinct_invented_words(world: World) -> None:
    names = world.names()
    lower = [n.lower() for n in names]
    assert len(set(lower)) == len(names)
    forbidden = template_words() | STOPLIST
    for name in names:
        assert name.isalpha() and name.isascii() and name == name.capitalize(), name
        assert 4 <= len(name) <= 9
        assert name.lower() not in forbidden
    for i, a in enumerate(lower):
        assert not any(_within_one_edit(a, b) for b in lower[i + 1 :]), a


def test_same_seed_same_world_other_seed_other_world() -> None:
    assert generate_world(0).digest() == generate_world(0).digest()
    other = generate_world(1)
    assert other.digest() != generate_world(0).digest()
    assert other.names()[:10] != generate_world(0).names()[:10]


def test_sizes_can_be_changed() -> None:
    small = generate_world(3, sizes={"city": 20, "person": 130})
    assert small.counts()["city"] == 20
    with pytest.raises(WorldError, match="at least as many city"):
        generate_world(0, sizes={"city": 5})
    with pytest.raises(WorldError, match="unknown entity types"):
        generate_world(0, sizes={"planet": 5})


def test_world_lookup(world: World) -> None:
    city = world.of_type("city")[0]
    assert world.lookup(city.name.upper(), "Population") == city.fields["population"]
    assert world.lookup(city.name, "area") == city.fields["area_km2"]
    assert world.lookup(city.name, "type") == "city"
    with pytest.raises(UnknownEntity) as caught:
        world.lookup(city.name[:-1], "population")
    assert city.name in caught.value.suggestions
    with pytest.raises(UnknownField) as bad_field:
        world.lookup(city.name, "gdp")
    assert bad_field.value.valid == (*world.fields("city"), "type")
    assert "fields of a city: country, population" in str(bad_field.value)


def test_describe(world: World) -> None:
    person = world.of_type("person")[0]
    text = world.describe(person.name)
    for value in person.fields.values():
        assert str(value) in text
    assert text.startswith(f"{person.name} is a") and text.endswith(".")
    variants = {world.describe(person.name, variant=v) for v in range(1, 6)}
    assert text not in variants and len(variants) > 1
    assert all(v.startswith(person.name) for v in variants)
    assert world.describe(person.name, variant=2) == world.describe(person.name, variant=2)
    mountain = world.of_type("mountain")[0]
    glaciers = "has glaciers" if mountain.fields["glaciated"] else "has no glaciers"
    assert glaciers in world.describe(mountain.name)


def _rows(path: Path) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(path)) as db:
        entities = db.execute("SELECT * FROM entities ORDER BY id").fetchall()
        attributes = db.execute("SELECT * FROM attributes ORDER BY entity_id, field").fetchall()
        meta = db.execute("SELECT * FROM meta ORDER BY key").fetchall()
    return [*entities, *attributes, *meta]


def test_database_is_deterministic_and_fast(tmp_path: Path) -> None:
    started = time.perf_counter()
    build_database(tmp_path / "a.sqlite", generate_world(0))
    assert time.perf_counter() - started < 2.0
    build_database(tmp_path / "b.sqlite", generate_world(0))
    build_database(tmp_path / "c.sqlite", generate_world(1))
    assert _rows(tmp_path / "a.sqlite") == _rows(tmp_path / "b.sqlite")
    assert _rows(tmp_path / "a.sqlite") != _rows(tmp_path / "c.sqlite")
    assert len(list(tmp_path.iterdir())) == 3  # no temporary files left behind


def test_database_counts(kb: KnowledgeBase, world: World) -> None:
    with closing(sqlite3.connect(kb.path)) as db:
        per_type = dict(db.execute("SELECT type, count(*) FROM entities GROUP BY type"))
        fewest = db.execute(
            "SELECT min(n) FROM (SELECT count(*) AS n FROM attributes GROUP BY entity_id)"
        ).fetchone()[0]
    assert per_type == world.counts()
    assert fewest >= 5
    assert read_meta(kb.path)["digest"] == world.digest()


def test_lookup_agrees_with_the_world(kb: KnowledgeBase, world: World) -> None:
    for index, (entity, field, value) in enumerate(world.facts()):
        if index % 17 == 0:
            found = kb.lookup(entity, field)
            assert found == value and type(found) is type(value), (entity, field)


def test_lookup_spellings_and_errors(kb: KnowledgeBase, world: World) -> None:
    company = world.of_type("company")[0]
    assert kb.lookup(f"  {company.name.lower()} ", "revenue") == company.fields["revenue_musd"]
    assert kb.lookup(company.name, "type") == "company"
    assert kb.record(company.name) == company.fields
    assert kb.describe(company.name) == world.describe(company.name)
    with pytest.raises(UnknownEntity) as caught:
        kb.lookup(company.name + "x", "ceo")
    assert caught.value.suggestions[0] == company.name
    assert f"did you mean: {company.name}" in str(caught.value)
    with pytest.raises(UnknownField) as bad:
        kb.lookup(company.name, "population")
    assert "headquarters" in bad.value.valid
    with pytest.raises(UnknownEntity):
        kb.lookup("Atlantis", "population")


def test_search_ranks_the_named_entity_first(kb: KnowledgeBase, world: World) -> None:
    city = _first(world, "city")
    hits = kb.search(f"Which companies are headquartered in {city}?", limit=10)
    assert hits[0]["entity"] == city
    assert hits[0]["type"] == "city"
    assert hits[0]["fields"] == world.entity(city).fields
    assert city in hits[0]["snippet"]
    headquartered = {c.name for c in world.of_type("company") if c.fields["headquarters"] == city}
    assert headquartered <= {h["entity"] for h in hits}


def test_search_by_words(kb: KnowledgeBase) -> None:
    hits = kb.search("pharmaceutical company", limit=5)
    assert len(hits) == 5
    assert all(h["fields"]["industry"] == "pharmaceutical" for h in hits)
    assert len(kb.search("granite", limit=50)) <= 50
    assert kb.search("the of which?") == []
    assert kb.search("zzzzqqq") == []


def test_search_without_fts(tmp_path: Path, world: World) -> None:
    path = build_database(tmp_path / "plain.sqlite", world, fts=False)
    plain = KnowledgeBase(path, seed=0)
    city = _first(world, "city")
    hits = plain.search(f"companies in {city}", limit=5)
    assert hits[0]["entity"] == city
    assert city in hits[0]["snippet"]
    assert {h["fields"]["industry"] for h in plain.search("mining", limit=3)} == {"mining"}


def test_stale_database_is_rebuilt_and_foreign_files_refused(tmp_path: Path) -> None:
    path = build_database(tmp_path / "kb.sqlite", generate_world(1, sizes={"person": 120}))
    rebuilt = KnowledgeBase(path, seed=0)
    assert len(rebuilt.names()) == len(generate_world(0))
    assert read_meta(path)["seed"] == "0"
    foreign = tmp_path / "other.sqlite"
    with closing(sqlite3.connect(foreign)) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
    with pytest.raises(WorldError, match="not a knowledge-base database"):
        KnowledgeBase(foreign).ensure()
    assert read_meta(foreign) is None


async def test_kb_tools(kb: KnowledgeBase, world: World) -> None:
    registry = ToolRegistry()
    register_kb_tools(registry, kb)
    assert set(registry.names()) == {"kb.lookup", "kb.search", "kb.describe"}
    river = world.of_type("river")[0]
    length = await registry.call("kb.lookup", {"entity": river.name, "field": "length"})
    assert length == river.fields["length_km"]
    found = await registry.call("kb.search", {"query": river.name, "limit": 1})
    assert [h["entity"] for h in found["hits"]] == [river.name]
    text = await registry.call("kb.describe", {"entity": river.name})
    assert text.startswith(f"{river.name} is a river in ")
    with pytest.raises(ToolArgumentError) as caught:
        await registry.call("kb.search", {"query": "x", "limit": 0})
    assert caught.value.path == "/limit"
    with pytest.raises(UnknownField) as bad:
        await registry.call("kb.lookup", {"entity": river.name, "field": "height"})
    assert bad.value.tool == "kb.lookup"
