"""What the synthetic world holds: entity types, their fields, category values, sentence templates.

Every entity of a type has every field of that type (no missing values), so a task generator
can ask any field of any entity. Units are part of field names (`area_km2`, `height_m`) so that
a looked-up number carries its unit wherever it goes; `kb.lookup` also accepts the name without
the unit suffix (`area`). Each field has several sentence templates: `World.describe` uses the
first for the canonical text and the others for paraphrased variants (pretraining text).
"""

from __future__ import annotations

from typing import Literal

import msgspec

Value = str | int | float | bool
Kind = Literal["int", "float", "year", "date", "category", "ref", "bool"]

ENTITY_TYPES = ("country", "city", "mountain", "river", "company", "person")


class FieldSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One attribute of an entity type; templates use {name}, {value}, {a} (a/an), {long}."""

    name: str
    kind: Kind
    templates: tuple[str, ...]
    unit: str | None = None  # the suffix of `name`, e.g. "km2" for area_km2
    ref: str | None = None  # for kind "ref": the entity type the value names
    false_templates: tuple[str, ...] = ()  # for kind "bool": sentences when the value is false

    @property
    def alias(self) -> str | None:
        """The field name without its unit suffix (`area` for `area_km2`), if it has one."""
        return self.name.removesuffix(f"_{self.unit}") if self.unit else None


def _f(name: str, kind: Kind, *templates: str, **extra: object) -> FieldSpec:
    return msgspec.convert({"name": name, "kind": kind, "templates": templates, **extra}, FieldSpec)


REGIONS = ("northern", "southern", "eastern", "western", "central", "coastal", "highland", "island")
GOVERNMENTS = ("republic", "monarchy", "federation", "confederation", "principality")
CLIMATES = ("arid", "temperate", "tropical", "polar", "continental", "mediterranean", "oceanic")
ROCKS = ("granite", "basalt", "limestone", "sandstone", "gneiss", "schist", "marble", "slate")
INDUSTRIES = (
    "mining", "software", "shipping", "textile", "pharmaceutical", "aerospace", "retail",
    "banking", "energy", "food", "media", "chemical", "automotive", "insurance", "construction",
)  # fmt: skip
OCCUPATIONS = (
    "engineer", "chemist", "architect", "accountant", "pilot", "geologist", "designer",
    "lawyer", "economist", "surveyor", "programmer", "analyst", "translator", "physician",
)  # fmt: skip
# Chief executives are people too; their occupation is not drawn from OCCUPATIONS.
EXECUTIVE = "executive"

CATEGORIES: dict[str, tuple[str, ...]] = {
    "region": REGIONS,
    "government": GOVERNMENTS,
    "climate": CLIMATES,
    "rock": ROCKS,
    "industry": INDUSTRIES,
    "occupation": (*OCCUPATIONS, EXECUTIVE),
}

SCHEMA: dict[str, tuple[FieldSpec, ...]] = {
    "country": (
        _f("region", "category", "{name} is {a} {value} country.", "{name} is a country of the {value} region."),
        _f("capital", "ref", "The capital of {name} is {value}.", "{value} is the capital of {name}.", ref="city"),
        _f("population", "int", "{name} has a population of {value}.", "The population of {name} is {value}.", "{value} people live in {name}."),
        _f("area_km2", "float", "{name} covers {value} square kilometres.", "The area of {name} is {value} km2.", unit="km2"),
        _f("founded", "year", "{name} was founded in {value}.", "{name} became a country in {value}."),
        _f("government", "category", "{name} is {a} {value}.", "The government of {name} is {a} {value}."),
        _f("highest_point", "ref", "The highest mountain in {name} is {value}.", "{value} is the highest point of {name}.", ref="mountain"),
        _f("longest_river", "ref", "The longest river in {name} is {value}.", "{value} is the longest river of {name}.", ref="river"),
    ),
    "city": (
        _f("country", "ref", "{name} is a city in {value}.", "{name} is a city of {value}.", ref="country"),
        _f("population", "int", "{name} has a population of {value}.", "The population of {name} is {value}.", "{value} people live in {name}."),
        _f("area_km2", "float", "{name} covers an area of {value} square kilometres.", "The area of {name} is {value} km2.", unit="km2"),
        _f("founded", "year", "{name} was founded in {value}.", "The city of {name} dates from {value}."),
        _f("elevation_m", "int", "{name} lies {value} metres above sea level.", "The elevation of {name} is {value} metres.", unit="m"),
        _f("climate", "category", "{name} has {a} {value} climate.", "The climate of {name} is {value}."),
    ),
    "mountain": (
        _f("country", "ref", "{name} is a mountain in {value}.", "{name} is a mountain of {value}.", ref="country"),
        _f("height_m", "int", "{name} is {value} metres high.", "The height of {name} is {value} metres.", unit="m"),
        _f("prominence_m", "int", "{name} has a prominence of {value} metres.", "The prominence of {name} is {value} metres.", unit="m"),
        _f("first_ascent", "year", "{name} was first climbed in {value}.", "The first ascent of {name} was in {value}."),
        _f("rock", "category", "{name} is made mostly of {value}.", "The rock of {name} is mainly {value}."),
        _f("glaciated", "bool", "{name} has glaciers.", "Glaciers cover the slopes of {name}.", false_templates=("{name} has no glaciers.", "There are no glaciers on {name}.")),
    ),
    "river": (
        _f("country", "ref", "{name} is a river in {value}.", "{name} is a river of {value}.", ref="country"),
        _f("length_km", "int", "{name} is {value} kilometres long.", "The length of {name} is {value} km.", unit="km"),
        _f("discharge_m3s", "float", "{name} carries {value} cubic metres of water per second.", "The discharge of {name} is {value} m3/s.", unit="m3s"),
        _f("source", "ref", "{name} rises on {value}.", "The source of {name} is on the mountain {value}.", ref="mountain"),
        _f("flows_through", "ref", "{name} flows through {value}.", "{value} lies on the river {name}.", ref="city"),
        _f("basin_km2", "int", "The basin of {name} covers {value} square kilometres.", "{name} drains {value} km2.", unit="km2"),
    ),
    "company": (
        _f("industry", "category", "{name} is {a} {value} company.", "{name} works in the {value} industry."),
        _f("headquarters", "ref", "{name} is headquartered in {value}.", "The headquarters of {name} are in {value}.", ref="city"),
        _f("founded", "year", "{name} was founded in {value}.", "{name} dates from {value}."),
        _f("revenue_musd", "float", "{name} has a revenue of {value} million dollars.", "The annual revenue of {name} is {value} million dollars.", unit="musd"),
        _f("employees", "int", "{name} employs {value} people.", "{name} has {value} employees."),
        _f("ceo", "ref", "The chief executive of {name} is {value}.", "{value} is the CEO of {name}.", ref="person"),
    ),
    "person": (
        _f("occupation", "category", "{name} is {a} {value}.", "{name} works as {a} {value}."),
        _f("born", "date", "{name} was born on {value}.", "{name} was born on {long}."),
        _f("birthplace", "ref", "{name} was born in {value}.", "{name} is a native of {value}.", ref="city"),
        _f("nationality", "ref", "{name} is a citizen of {value}.", "{name} holds the nationality of {value}.", ref="country"),
        _f("employer", "ref", "{name} works for {value}.", "{name} is employed by {value}.", ref="company"),
        _f("height_cm", "int", "{name} is {value} centimetres tall.", "The height of {name} is {value} cm.", unit="cm"),
    ),
}  # fmt: skip


def field_names(entity_type: str) -> tuple[str, ...]:
    """The fields of an entity type, in description order."""
    return tuple(spec.name for spec in SCHEMA[entity_type])


def resolve_field(entity_type: str, field: str) -> FieldSpec | None:
    """The field `field` names for this type: exact, case-insensitive, or without its unit."""
    wanted = "_".join(field.strip().lower().replace("-", " ").split())
    for spec in SCHEMA[entity_type]:
        if wanted in (spec.name, spec.alias):
            return spec
    return None


def template_words() -> set[str]:
    """Every word of every template and category value: names must never be one of them."""
    texts = [
        t for specs in SCHEMA.values() for s in specs for t in (*s.templates, *s.false_templates)
    ]
    texts += [v for values in CATEGORIES.values() for v in values]
    texts += [s.name for specs in SCHEMA.values() for s in specs] + list(ENTITY_TYPES)
    words = " ".join(texts).replace("{", " ").replace("}", " ").replace("_", " ")
    return {w.strip(".,/").lower() for w in words.split()}
