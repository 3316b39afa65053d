"""The synthetic world: fictional countries, cities, mountains, rivers, companies and people.

Everything is drawn from random sources seeded by `seed` (one per generation stage), so the same
seed gives the same world on every machine; `World.digest()` fingerprints it. Entities refer to
each other (a company's headquarters is a city, a person's employer a company, a country's
capital its most populous city), which is what multi-hop questions walk along:

    >>> world = generate_world(0)
    >>> city = world.lookup(world.of_type("company")[0].name, "headquarters")
    >>> world.lookup(city, "type")
    'city'
    >>> world.describe(city).startswith(f"{city} is a city in ")
    True
"""

from __future__ import annotations

import datetime
import difflib
import hashlib
import random
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import msgspec

from tools.errors import UnknownEntity, UnknownField, WorldError
from tools.kb.names import NameGenerator
from tools.kb.schema import (
    CLIMATES,
    ENTITY_TYPES,
    EXECUTIVE,
    GOVERNMENTS,
    INDUSTRIES,
    OCCUPATIONS,
    REGIONS,
    ROCKS,
    SCHEMA,
    FieldSpec,
    Value,
    field_names,
    resolve_field,
    template_words,
)

# Bump whenever generation changes: cached databases of another version are rebuilt.
WORLD_VERSION = 1
DEFAULT_SEED = 0
DEFAULT_SIZES: dict[str, int] = {
    "country": 12,
    "city": 150,
    "mountain": 50,
    "river": 45,
    "company": 120,
    "person": 250,
}
MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip

Record = dict[str, Any]


class Entity(msgspec.Struct, frozen=True):
    """One entity: its unique name, its type, and a value for every field of that type."""

    name: str
    type: str
    fields: dict[str, Value]


class World:
    """The generated entities with lookups by name, field lists per type, and descriptions."""

    def __init__(self, seed: int, entities: Iterable[Entity]) -> None:
        self.seed = seed
        self.entities: tuple[Entity, ...] = tuple(entities)
        self._by_name = {e.name.lower(): e for e in self.entities}
        if len(self._by_name) != len(self.entities):
            raise WorldError("entity names must be unique")

    def __len__(self) -> int:
        return len(self.entities)

    @property
    def types(self) -> tuple[str, ...]:
        """The entity types, in generation order."""
        return ENTITY_TYPES

    @staticmethod
    def fields(entity_type: str) -> tuple[str, ...]:
        """The fields every entity of `entity_type` has."""
        return field_names(entity_type)

    def names(self) -> list[str]:
        """Every entity name, in generation order."""
        return [e.name for e in self.entities]

    def of_type(self, entity_type: str) -> tuple[Entity, ...]:
        """The entities of one type, in generation order."""
        return tuple(e for e in self.entities if e.type == entity_type)

    def counts(self) -> dict[str, int]:
        """Number of entities per type."""
        return {t: len(self.of_type(t)) for t in ENTITY_TYPES}

    def entity(self, name: str) -> Entity:
        """The entity called `name` (case-insensitive); UnknownEntity with close matches if none."""
        found = self._by_name.get(name.strip().lower())
        if found is None:
            raise UnknownEntity(name, suggestions=close_names(name, self.names()))
        return found

    def lookup(self, entity: str, field: str) -> Value:
        """A field's value; `field` may omit its unit (`area`), and `type` gives the entity type."""
        found = self.entity(entity)
        if field.strip().lower() == "type":
            return found.type
        spec = resolve_field(found.type, field)
        if spec is None:
            valid = (*field_names(found.type), "type")
            raise UnknownField(found.name, found.type, field, valid=valid)
        return found.fields[spec.name]

    def describe(self, entity: str, *, variant: int = 0) -> str:
        """Plain sentences stating every field; variants > 0 paraphrase and reorder them."""
        return describe_entity(self.entity(entity), variant=variant)

    def facts(self) -> Iterator[tuple[str, str, Value]]:
        """Every (entity, field, value) triple, in generation and field order."""
        for e in self.entities:
            for field, value in e.fields.items():
                yield e.name, field, value

    def digest(self) -> str:
        """SHA-256 of the world's content: equal digests, equal worlds."""
        rows = [(e.name, e.type, e.fields) for e in self.entities]
        return hashlib.sha256(msgspec.json.encode([WORLD_VERSION, self.seed, rows])).hexdigest()


def close_names(name: str, names: list[str], *, n: int = 3) -> tuple[str, ...]:
    """Up to `n` names that look like `name`, best first (for 'did you mean' hints)."""
    by_lower = {x.lower(): x for x in names}
    matches = difflib.get_close_matches(name.strip().lower(), list(by_lower), n=n, cutoff=0.6)
    return tuple(by_lower[m] for m in matches)


def describe_entity(entity: Entity, *, variant: int = 0) -> str:
    """The entity as sentences: variant 0 is canonical, others pick templates and order by seed."""
    rng = random.Random(f"{entity.name}:{variant}") if variant else None
    sentences = [_sentence(entity, spec, rng) for spec in SCHEMA[entity.type]]
    if rng is not None:
        # The first sentence says what the entity is; keep it first.
        rest = sentences[1:]
        rng.shuffle(rest)
        sentences = [sentences[0], *rest]
    return " ".join(sentences)


def _sentence(entity: Entity, spec: FieldSpec, rng: random.Random | None) -> str:
    value = entity.fields[spec.name]
    templates = spec.false_templates if value is False else spec.templates
    template = rng.choice(templates) if rng is not None else templates[0]
    text = str(value)
    article = "an" if text[:1].lower() in "aeiou" else "a"
    return template.format(name=entity.name, value=text, a=article, long=_long_form(spec, text))


def _long_form(spec: FieldSpec, text: str) -> str:
    if spec.kind != "date":
        return text
    day = datetime.date.fromisoformat(text)
    return f"{day.day} {MONTHS[day.month - 1]} {day.year}"


def generate_world(seed: int = DEFAULT_SEED, *, sizes: Mapping[str, int] | None = None) -> World:
    """Generate the world for `seed`; `sizes` overrides entity counts per type (DEFAULT_SIZES)."""
    counts = _check_sizes({**DEFAULT_SIZES, **(sizes or {})})
    names = NameGenerator(random.Random(f"compound-world:{seed}:names"), reserved=template_words())

    def rng(stage: str) -> random.Random:
        # One source per stage: changing how one type is drawn leaves the others unchanged.
        return random.Random(f"compound-world:{seed}:{stage}")

    countries = _countries(rng("country"), names, counts["country"])
    cities = _cities(rng("city"), names, counts["city"], countries=countries)
    mountains = _mountains(rng("mountain"), names, counts["mountain"], countries=countries)
    rivers = _rivers(
        rng("river"),
        names,
        counts["river"],
        countries=countries,
        mountains=mountains,
        cities=cities,
    )
    companies = _companies(rng("company"), names, counts["company"], cities=cities)
    people = _people(rng("person"), names, counts["person"], companies=companies, cities=cities)
    _complete_countries(
        rng("country-totals"),
        countries=countries,
        cities=cities,
        mountains=mountains,
        rivers=rivers,
    )
    groups = zip(
        ENTITY_TYPES, (countries, cities, mountains, rivers, companies, people), strict=True
    )
    return World(seed, [_entity(t, record) for t, records in groups for record in records])


def _check_sizes(counts: dict[str, int]) -> dict[str, int]:
    unknown = set(counts) - set(ENTITY_TYPES)
    if unknown:
        raise WorldError(f"unknown entity types in sizes: {', '.join(sorted(unknown))}")
    # Every country needs a city, a mountain and a river; every company a chief executive.
    needs = {"city": "country", "mountain": "country", "river": "country", "person": "company"}
    for kind, per in needs.items():
        if counts[kind] < counts[per]:
            raise WorldError(f"sizes: need at least as many {kind} entities as {per} entities")
    if min(counts["country"], counts["company"]) < 1:
        raise WorldError("sizes: need at least one country and one company")
    return counts


def _entity(entity_type: str, record: Record) -> Entity:
    return Entity(record["name"], entity_type, {f: record[f] for f in field_names(entity_type)})


def _countries(rng: random.Random, names: NameGenerator, n: int) -> list[Record]:
    return [
        {
            "name": names.draw(),
            "region": rng.choice(REGIONS),
            "founded": rng.randint(1150, 1990),
            "government": rng.choice(GOVERNMENTS),
        }
        for _ in range(n)
    ]


def _cities(
    rng: random.Random, names: NameGenerator, n: int, *, countries: list[Record]
) -> list[Record]:
    cities = []
    for i in range(n):
        population = int(10 ** rng.uniform(3.6, 6.9))
        density = rng.uniform(300, 9000)  # people per km2
        cities.append(
            {
                "name": names.draw(),
                "country": countries[i % len(countries)]["name"],
                "population": population,
                "area_km2": round(max(population / density, 1.0), 1),
                "founded": rng.randint(700, 1950),
                "elevation_m": int(rng.triangular(0, 3200, 150)),
                "climate": rng.choice(CLIMATES),
            }
        )
    return cities


def _mountains(
    rng: random.Random, names: NameGenerator, n: int, *, countries: list[Record]
) -> list[Record]:
    mountains = []
    for i in range(n):
        height = rng.randint(900, 8600)
        mountains.append(
            {
                "name": names.draw(),
                "country": countries[i % len(countries)]["name"],
                "height_m": height,
                "prominence_m": int(height * rng.uniform(0.08, 0.85)),
                "first_ascent": rng.randint(1760, 2018),
                "rock": rng.choice(ROCKS),
                "glaciated": height >= 3500 and rng.random() < 0.85,
            }
        )
    return mountains


def _rivers(
    rng: random.Random,
    names: NameGenerator,
    n: int,
    *,
    countries: list[Record],
    mountains: list[Record],
    cities: list[Record],
) -> list[Record]:
    rivers = []
    for i in range(n):
        country = countries[i % len(countries)]["name"]
        length = rng.randint(40, 3600)
        rivers.append(
            {
                "name": names.draw(),
                "country": country,
                "length_km": length,
                "discharge_m3s": round(length * rng.uniform(0.05, 2.5), 1),
                "source": rng.choice(_in_country(mountains, country))["name"],
                "flows_through": rng.choice(_in_country(cities, country))["name"],
                "basin_km2": int(length * rng.uniform(40, 400)),
            }
        )
    return rivers


def _companies(
    rng: random.Random, names: NameGenerator, n: int, *, cities: list[Record]
) -> list[Record]:
    companies = []
    for _ in range(n):
        revenue = round(10 ** rng.uniform(0.5, 5.0), 1)  # million dollars
        companies.append(
            {
                "name": names.draw(),
                "industry": rng.choice(INDUSTRIES),
                "headquarters": rng.choice(cities)["name"],
                "founded": rng.randint(1820, 2021),
                "revenue_musd": revenue,
                "employees": max(5, int(revenue * rng.uniform(2, 12))),
            }
        )
    return companies


def _people(
    rng: random.Random,
    names: NameGenerator,
    n: int,
    *,
    companies: list[Record],
    cities: list[Record],
) -> list[Record]:
    people = []
    for i in range(n):
        # The first len(companies) people are the chief executives, one per company.
        ceo_of = companies[i] if i < len(companies) else None
        birthplace = rng.choice(cities)
        people.append(
            {
                "name": names.draw(),
                "occupation": EXECUTIVE if ceo_of else rng.choice(OCCUPATIONS),
                "born": _birthday(rng, 1940, 1985 if ceo_of else 2003),
                "birthplace": birthplace["name"],
                "nationality": birthplace["country"],
                "employer": (ceo_of or rng.choice(companies))["name"],
                "height_cm": int(rng.triangular(150, 205, 172)),
            }
        )
        if ceo_of:
            ceo_of["ceo"] = people[-1]["name"]
    rng.shuffle(people)
    return people


def _birthday(rng: random.Random, first_year: int, last_year: int) -> str:
    start = datetime.date(first_year, 1, 1).toordinal()
    end = datetime.date(last_year, 12, 31).toordinal()
    return datetime.date.fromordinal(rng.randint(start, end)).isoformat()


def _complete_countries(
    rng: random.Random,
    *,
    countries: list[Record],
    cities: list[Record],
    mountains: list[Record],
    rivers: list[Record],
) -> None:
    # Country figures follow from what lies inside them, so that lookups agree with each other.
    for country in countries:
        own_cities = _in_country(cities, country["name"])
        country["capital"] = max(own_cities, key=lambda c: c["population"])["name"]
        urban = sum(c["population"] for c in own_cities)
        country["population"] = int(urban * rng.uniform(1.3, 2.6))
        country["area_km2"] = round(sum(c["area_km2"] for c in own_cities) * rng.uniform(25, 90), 1)
        own_mountains = _in_country(mountains, country["name"])
        country["highest_point"] = max(own_mountains, key=lambda m: m["height_m"])["name"]
        own_rivers = _in_country(rivers, country["name"])
        country["longest_river"] = max(own_rivers, key=lambda r: r["length_km"])["name"]


def _in_country(records: list[Record], country: str) -> list[Record]:
    return [r for r in records if r["country"] == country]
